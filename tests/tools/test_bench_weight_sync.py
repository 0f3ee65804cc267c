"""tools/bench_weight_sync.py end to end on a tiny model: every method runs and the table/JSON are complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "bench_weight_sync.py"
TINY = [
    "--layers",
    "1",
    "--hidden",
    "64",
    "--vocab",
    "301",
    "--repeats",
    "2",
    "--bucket-mb",
    "1",
    "--num-servers",
    "1,2",
]


def test_help():
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True)
    assert "--bucket-mb" in out.stdout and "--json" in out.stdout


@pytest.mark.slow  # a benchmark's plumbing; the syncs it times are tested in tests/rollout
def test_table_and_json_on_tiny_model(tmp_path):
    """One and two bf16 servers in one run: every method per server count, the table and the JSON agree."""
    shared, json_path = tmp_path / "shared", tmp_path / "result.json"
    shared.mkdir()
    cmd = [sys.executable, str(TOOL), *TINY, "--shared-dir", str(shared), "--json", str(json_path)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(json_path.read_text())
    assert result["dtype"] == "bfloat16" and result["num_tensors"] == 13  # 11 per layer + embed + norm
    assert result["model_gb"] == pytest.approx(2 * _num_params() / 1e9)
    for num_servers in (1, 2):
        rows = {r["method"]: r for r in result["rows"] if r["num_servers"] == num_servers}
        assert set(rows) == {
            "distributed/bucketed-flat",
            "distributed/bucketed",
            "distributed/per-tensor",
            "disk",
        }
        assert rows["distributed/per-tensor"]["requests"] == 13
        assert rows["distributed/bucketed"]["requests"] == rows["distributed/bucketed-flat"]["requests"] == 1
        assert rows["disk"]["requests"] == num_servers
        assert all(r["gb_per_s"] > 0 and r["seconds"] <= r["median_seconds"] for r in rows.values())
        speedup = result["bucketed_speedup_vs_per_tensor"][str(num_servers)]
        assert (
            f"{num_servers} server(s): best bucketed vs per-tensor requests: {speedup:.1f}x faster"
            in out.stdout
        )
    assert list(shared.iterdir()) == []  # the tool cleans up after itself


def _num_params() -> int:
    """Parameters of the TINY Qwen3 (hidden 64, 1 layer, vocab 301 tied, 16 heads and 8 KV heads of dim 4)."""
    hidden, vocab, inter, head_dim = 64, 301, 192, 4
    attn = 2 * hidden * 16 * head_dim + 2 * hidden * 8 * head_dim + 2 * head_dim  # q, o, k, v, q/k norms
    return vocab * hidden + attn + 3 * hidden * inter + 3 * hidden  # + mlp + 2 layer norms + final norm
