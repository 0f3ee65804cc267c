#!/usr/bin/env python
"""Logits parity of the Megatron-Core model vs ``transformers`` on the same weights.

Builds the Megatron model at TP x PP from the HF directory (or loads a converted checkpoint with
``--mcore``), runs a fixed batch, compares the fp32 logits with the HF model's, and prints a table
and, as its last line, a JSON object (``max_abs_logit_diff``, ``tokens``, ...). Exit status 1 when
the difference exceeds ``--tol``.

    python tools/check_parity.py --hf ckpt/qwen3 --tp 2 --pp 2                  # spawns 4 gloo ranks
    python tools/check_parity.py --hf ckpt/qwen3 --tp 2 --pp 1 --mcore ckpt/qwen3_mcore
    torchrun --nproc-per-node 4 tools/check_parity.py --hf ckpt/qwen3 --tp 2 --pp 2   # uses the given ranks
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--hf", required=True, help="HF model directory (config.json + safetensors); the reference"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument(
        "--mcore", default=None, help="load weights from this converted Megatron checkpoint instead"
    )
    p.add_argument("--batch", type=int, default=2, help="sequences in the fixed batch (default 2)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed token batch (default 0)")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (default 1e-4)")
    p.add_argument("--json", default=None, help="also write the JSON report to this path")
    return p.parse_args(argv)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoints_convert.arch_maps import ModelDims, validate_parallel
    from checkpoints_convert.convert import check_mcore_matches_config
    from checkpoints_convert.hf_io import HfCheckpointReader
    from checkpoints_convert.parity import compare_with_hf, parity_rank  # after --help: heavy imports

    try:  # user mistakes fail here with one clear line, not inside a spawned rank
        config = HfCheckpointReader(args.hf).config
        validate_parallel(ModelDims.from_hf_config(config), args.tp, args.pp)
        if args.mcore:
            check_mcore_matches_config(args.mcore, config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    run_args = (str(Path(args.hf)), args.tp, args.pp, args.mcore, args.batch, args.seq_len, args.seed)
    if _under_launcher():
        import torch.distributed as dist

        from sdpg_mcore.parallel.state import initialize_distributed

        env = initialize_distributed()
        mine = parity_rank(env.rank, env.world_size, *run_args)
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        if env.rank != 0:
            return 0
    elif args.tp * args.pp == 1:  # one rank: run here, on a free port, instead of paying a second start-up
        from sdpg_mcore.parallel.spawn import find_free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        gathered = [parity_rank(0, 1, *run_args)]
    else:
        from sdpg_mcore.parallel.spawn import spawn_ranks

        gathered = spawn_ranks(parity_rank, args.tp * args.pp, args=run_args)
    logits = next(x for x in gathered if x is not None)
    report = compare_with_hf(
        args.hf,
        logits,
        tp=args.tp,
        pp=args.pp,
        source="mcore" if args.mcore else "hf",
        batch=args.batch,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    ok = report.max_abs_logit_diff <= args.tol
    rows = [
        ("arch", report.arch),
        ("layout", f"TP{report.tp} x PP{report.pp}"),
        ("weights from", args.mcore or args.hf),
        ("tokens", str(report.tokens)),
        ("max |logit diff|", f"{report.max_abs_logit_diff:.3e}"),
        ("mean |logit diff|", f"{report.mean_abs_logit_diff:.3e}"),
        ("within tol", f"{'yes' if ok else 'NO'} (tol {args.tol:g})"),
    ]
    for key, value in rows:
        print(f"{key:<18} {value}")
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    print(report.to_json())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
