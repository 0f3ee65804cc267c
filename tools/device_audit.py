"""Device audit: one full SDPG step with the model on a fake GPU, on this CPU-only machine.

Runs the trainer's step (``train.step.run_step``: old and reference log-prob passes, teacher pass,
train pass with the fused head, the head's backward, the mini-batch all-reduces) with every model
parameter a fake ``cuda:0`` tensor, after building the model the trainer's way with the fake GPU
"available", then the colocated turn (``train/colocate.py`` offloads the trainer's device state and
brings it back; ``sdpg_mcore.audit.device_audit`` has the details). Prints the violations (host meets
device, collectives on host tensors, data-dependent device shapes) and every host sync with the line
that asked; ``!`` marks one the step does not need. Exit 0 only when there is no violation and no
such host sync.

    python tools/device_audit.py                 # ~30 s on 2 cores
    python tools/device_audit.py --json audit.json
    python tools/device_audit.py --teacher-states host   # trainer.teacher_states=host: via pinned host memory
    python tools/device_audit.py --teacher ema --ema-weights host   # algorithm.teacher (policy | ema | initial)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def print_report(result: dict) -> None:
    from sdpg_mcore.audit.device_audit import is_allowed_sync

    out = sys.stdout
    ema = f", EMA on the {result['ema_weights']}" if result.get("ema_weights") else ""
    out.write(
        f"device audit of one {result['algorithm']} step on a fake GPU "
        f"(teacher {result['teacher']}{ema}; teacher states on the {result['teacher_states']})\n"
    )
    if "stopped_at" in result:
        out.write(f"STOPPED: {result['stopped_at']}\n")
    built = result.get("construction", {})
    out.write(
        f"model construction: {len(built.get('off_device', []))} of {built.get('tensors')} tensors off the GPU\n"
    )
    colocated = result.get("colocated")
    if colocated:
        out.write(
            f"colocated turn: {colocated['offloaded_bytes']:,} bytes offloaded and restored on the GPU\n"
        )
    out.write(f"violations: {len(result['violations'])}\n")
    for v in result["violations"]:
        out.write(f"  {v}\n")
    out.write("host syncs (count, what, where):\n")
    for sync, count in sorted(result["host_syncs"].items(), key=lambda kv: -kv[1]):
        mark = "  " if is_allowed_sync(sync) else "! "
        out.write(f"  {mark}{count:3d}  {sync}\n")
    if result["setup_host_syncs"]:
        out.write(f"(setup, not per step: {len(result['setup_host_syncs'])} host syncs)\n")
    out.write("CLEAN\n" if result["clean"] else "NOT CLEAN ('!' = a host sync the step does not need)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="sdpg", help="algorithm whose step is audited (default sdpg)")
    parser.add_argument(
        "--teacher-states",
        choices=("device", "host"),
        default="device",
        help="trainer.teacher_states of the audited step (default device)",
    )
    parser.add_argument(
        "--head-backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="trainer.logprob_backend of the audited step (default auto: triton when it imports)",
    )
    parser.add_argument(
        "--teacher",
        choices=("policy", "ema", "initial"),
        default="policy",
        help="sdpg's algorithm.teacher: the weights of the teacher pass (default policy)",
    )
    parser.add_argument(
        "--ema-weights",
        choices=("device", "host"),
        default="host",
        help="trainer.ema_weights of the audited step, with --teacher ema (default host)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    from sdpg_mcore.audit.device_audit import run_audit

    result = run_audit(args.algorithm, args.teacher_states, args.head_backend, args.teacher, args.ema_weights)
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
