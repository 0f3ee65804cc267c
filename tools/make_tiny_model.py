"""Make the tiny CPU example's policy: a Qwen3-architecture model + tokenizer, warm-started on arithmetic.

    python tools/make_tiny_model.py --out examples/tiny/model            # ~1-2 min on 2 CPU cores
    python tools/make_tiny_model.py --out /tmp/m --sft-steps 20 --json   # quick smoke run

A random model never writes ``\\boxed{N}``, so every reward would be 0 and RL would have nothing to
learn from: the warm start (``sdpg_mcore.train.warm_start``) is a short supervised run on the
synthetic arithmetic task, half of its rows under the teacher prompt by default. It stops early, on
purpose: the example needs accuracy at temperature 1 well between 0 and 1 so that groups have reward
variance. Deterministic for a given ``--seed`` (one torch thread, seeded sampling). The accuracy
reached and the time taken are written to ``OUT/warmstart.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=400, help="warm-start optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--teacher-fraction",
        type=float,
        default=0.5,
        help="share of warm-start rows under the teacher prompt",
    )
    parser.add_argument("--max-operand", type=int, default=9, help="largest operand of the arithmetic task")
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out problems for the accuracy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps results bit-exact)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    import torch  # after --help

    from sdpg_mcore.train.warm_start import warm_start_tiny_model

    torch.set_num_threads(args.threads)
    stats = warm_start_tiny_model(
        args.out,
        seed=args.seed,
        sft_steps=args.sft_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_prompts=args.eval_prompts,
        teacher_fraction=args.teacher_fraction,
        max_operand=args.max_operand,
    )
    if args.json:
        sys.stdout.write(json.dumps(stats) + "\n")
    else:
        for key, value in stats.items():
            sys.stdout.write(f"{key:>16}  {value}\n")
        sys.stdout.write(f"{'saved':>16}  {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
