"""Stage ``bench_kl``: ``tools/bench_kl.py``: the Triton head beside the torch head and the materialising
reference, each with its ``torch.profiler`` kernel table and the GEMMs alone at the aligned and the old
unaligned block width, at the Qwen3-4B shape (with a chunk sweep, :data:`KL_SWEEP`) and one
Llama-3.3-70B TP8 shard; with ``--cpu`` the tiny shape, Triton under its interpreter. Last in the
check: a benchmark finds slowness, not wrong results, and gets what time is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdpg_mcore.audit.gpu_check import common

KL_SWEEP = "147,441,1024,2048"
"""Fused-head chunk sizes ``bench_kl`` also measures on the GPU at the Qwen3 shape (tokens; 147 = the
256 MiB default at Qwen3's vocabulary, 1024 = ``trainer.logprob_chunk_size``'s default);
``best_chunk`` is the fastest that keeps the peak at least 10x below the materialising reference's."""


def run(cpu: bool) -> dict:
    runs = [["--shape", "tiny", "--device", "cpu", "--chunk-sizes", "4,16"]] if cpu else [
        ["--shape", "qwen3-4b", "--chunk-sizes", KL_SWEEP], ["--shape", "llama70b-tp8"],
    ]  # fmt: skip
    env = os.environ | ({"TRITON_INTERPRET": "1"} if cpu else {})
    deadline = time.perf_counter() + common.stage_limit("bench_kl", cpu) - 10
    out: dict = {"ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        for args in runs:
            report = Path(tmp) / "kl.json"
            with common.phase(f"bench_kl {args[1]}"):
                proc = subprocess.run(
                    [sys.executable, str(common.TOOLS / "bench_kl.py"), *args, "--backends", "triton,torch",
                     "--profile", "--json", str(report)],
                    capture_output=True, text=True, timeout=max(1.0, deadline - time.perf_counter()), env=env,
                )  # fmt: skip
            if not report.exists():
                return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
            out[args[1]] = json.loads(report.read_text()) | {"table": proc.stdout[-3000:]}
            out["ok"] = out["ok"] and proc.returncode == 0
            common.save_partial(out)
            report.unlink()
    return out
