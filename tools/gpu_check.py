"""The prepared GPU check (run through ``tools/gpu_check.sh``): one machine, one GPU, within 8 minutes.

Stages (``sdpg_mcore.audit.gpu_check``, one module each), in this order, each held to fixed limits
that can fail (each shown failing on a broken input in ``tests/audit/test_gpu_check.py``, the
head's in ``tests/ops/test_head_check.py``):
``env`` (versions, the layer spec and why, the device binding), ``nccl`` (the trainer's process
groups on every visible GPU), ``sdpg_step`` (two SDPG steps of a Qwen3-width model against an fp64
``transformers`` reference, the planner, the colocated offload, a step after it), ``llama70b_layer``
(one step at Llama-3.3-70B's layer shape, TE spec when present), ``head_fp64`` (both fused heads at
bf16 against fp64 at a fixed tolerance, a bf16-logit head as the control that must fail), ``parity``
(Megatron vs ``transformers`` logits at 1e-4) and ``bench_kl`` (Triton, torch and the materialising
heads with kernel tables; last, with the time left). Each
runs in its own subprocess with its own time limit (a CUDA error poisons a process; one stage
failing must not lose the others' results), logs each phase as it starts and ends, writes every
thread's stack a few seconds before its limit, and leaves its JSON in ``$OUT/<stage>.json``.

Prints one JSON summary line last; with ``$OUT`` set also writes ``$OUT/gpu_check.json`` (after every
stage) and ``$OUT/gpu_check.log``. ``--cpu``: the same plumbing on CPU with small shapes.

    tools/gpu_check.sh            # on the GPU machine
    tools/gpu_check.sh --cpu      # here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sdpg_mcore.audit.gpu_check import common, driver  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    stages = list(common.STAGE_LIMITS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on CPU (plumbing test)")
    parser.add_argument("--stage", choices=stages, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=stages, help="run only these stages")
    parser.add_argument("--budget-s", type=float, default=common.TOTAL_BUDGET_S, help="whole check (s)")
    args = parser.parse_args(argv)
    if args.stage:
        return driver.run_stage(args.stage, args.cpu)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    def stage_command(name: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (
            ["--cpu"] if args.cpu else []
        )

    summary = driver.run_check(
        stage_command, cpu=args.cpu, only=args.only, budget_s=args.budget_s, out_dir=out_dir,
        log_path=(out_dir or Path(tempfile.gettempdir())) / "gpu_check.log",
    )  # fmt: skip
    sys.stdout.write(json.dumps(driver.compact(summary), default=str) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
