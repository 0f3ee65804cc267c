"""tools/bench_kl.py runs both variants in fresh processes and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_kl_tiny_writes_json(tmp_path):
    out = tmp_path / "kl.json"
    cmd = [sys.executable, "tools/bench_kl.py", "--shape", "tiny", "--iters", "1", "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory_ratio" in proc.stdout  # the human-readable table
    result = json.loads(out.read_text())
    assert result["shape"]["tokens"] == 64 and result["shape"]["vocab"] == 1000
    for variant in ("fused", "reference"):
        assert result[variant]["peak_bytes"] > 0 and result[variant]["seconds"] > 0
    assert result["memory_ratio"] == result["reference"]["peak_bytes"] / result["fused"]["peak_bytes"]
    assert result["time_ratio"] == result["fused"]["seconds"] / result["reference"]["seconds"]
    assert result["memory_ratio"] > 1  # the reference materialises [N, V] several times over
    assert result["max_mean_diff"] < 1e-4  # both variants compute the same kl / logprob / entropy


def test_bench_kl_chunk_sweep_reports_each_size_and_the_best(tmp_path):
    """``--chunk-sizes``: every size measured on the same inputs (same means as the main run, each
    its own peak), and ``best_chunk`` the fastest among those 10x below the reference's peak."""
    out = tmp_path / "kl.json"
    cmd = [sys.executable, "tools/bench_kl.py", "--shape", "tiny", "--iters", "1", "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, "--chunk-sizes", "4,none,64", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    sweep = result["sweep"]
    assert [row["chunk_size"] for row in sweep] == [4, None, 64]
    for row in sweep:
        assert row["seconds"] > 0
        assert row["memory_ratio"] == result["reference"]["peak_bytes"] / max(row["peak_bytes"], 1)
    fits = [row for row in sweep if row["memory_ratio"] >= 10] or sweep
    assert result["best_chunk"] == min(fits, key=lambda row: row["seconds"])
    assert "best chunk" in proc.stdout
    bad = subprocess.run([*cmd, "--chunk-sizes", "0,4"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--chunk-sizes" in bad.stderr
