"""tools/bench_kl.py runs both variants in fresh processes and writes the documented JSON."""

from __future__ import annotations

import json
import os
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


def _check_of_the_gpu_path(flag: str, tmp_path) -> tuple[dict, str]:
    """``bench_kl.py --count`` or ``--compile``: its JSON and table, in an environment without
    TRITON_INTERPRET (tests/ops sets it for its own tests; the tool decides for itself)."""
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "tools/bench_kl.py", flag, "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_count_measures_the_gpu_path_of_both_backends(tmp_path):
    """``--count``: the Triton path launches at most 8 kernels per vocabulary block and moves at
    most 40 bytes per (token, vocab) pair (the issue's floor), far below the torch path, with the
    same GEMM FLOPs (12 N V H: forward, recomputed logits, dh, dW; the Triton path's aligned ragged
    last block adds its 48 padding rows of 2,048)."""
    result, table = _check_of_the_gpu_path("--count", tmp_path)
    assert "launches per vocab block" in table
    assert set(result) == {"triton", "torch"}
    triton, torch_path = result["triton"], result["torch"]
    assert triton["launches_per_block"] <= 8 and triton["triton_launches_per_block"] == 2
    assert triton["bytes_per_pair"] <= 40
    assert torch_path["launches_per_block"] > 5 * triton["launches_per_block"]
    assert torch_path["bytes_per_pair"] > 3 * triton["bytes_per_pair"]
    assert torch_path["gemm_flops_per_nvh"] == 12.0
    assert triton["gemm_flops_per_nvh"] == 12.0 * 2048 / 2000


def test_compile_builds_both_kernels_for_hopper_and_ampere(tmp_path):
    """``--compile``: every kernel variant compiles for sm_90 and sm_80 at the plan's block widths,
    without spills; aligned blocks get 128-bit loads, the old unaligned width none."""
    result, table = _check_of_the_gpu_path("--compile", tmp_path)
    assert "block_state+teacher" in table
    targets = result["targets"]
    assert {(t["shape"], t["arch"]) for t in targets if not t.get("unaligned")} == {
        (shape, arch) for shape in ("qwen3-4b", "llama70b-tp8") for arch in ("sm_90", "sm_80")
    }
    for target in targets:
        assert len(target["kernels"]) == 6  # forward and backward, with and without teacher / one-hot
        assert target["block_rows"] % 128 == 0 or target.get("unaligned")
        for kernel in target["kernels"]:
            assert kernel["spill_bytes"] == 0 and kernel["stack_bytes"] == 0
            assert 0 < kernel["registers"] <= 64  # 4 warps/program: registers never limit occupancy
            if target.get("unaligned"):
                assert kernel["global_loads_v4"] == 0
            else:
                assert kernel["global_loads_v4"] >= 2
