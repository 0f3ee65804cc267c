#!/usr/bin/env python
"""Convert Hugging Face safetensors <-> a Megatron-Core distributed checkpoint (streaming, one process).

    python tools/convert_hf.py to-mcore --hf DIR --out DIR --tp N --pp M
    python tools/convert_hf.py to-hf --mcore DIR --out DIR [--max-shard-gb 5]

``to-mcore`` writes a ``torch_dist`` checkpoint that ``megatron.core.dist_checkpointing.load``
reads at any TP/PP (``--tp`` fixes the vocabulary padding and, with ``--pp``, is checked against the
model), plus ``sdpg_convert.json`` and ``hf_assets/`` (config + tokenizer files). ``to-hf`` writes
config.json, tokenizer files and safetensors (sharded with an index above ``--max-shard-gb``).
Peak memory is about two of the largest tensor. Prints a table; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-mcore", help="HF directory -> Megatron distributed checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is padded for")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate against the model")
    a.add_argument("--json", default=None, help="write the conversion numbers as JSON to this path")
    b = sub.add_parser("to-hf", help="Megatron distributed checkpoint -> HF directory")
    b.add_argument("--mcore", required=True, help="checkpoint written by `to-mcore`")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (default 5 GB)"
    )
    b.add_argument("--json", default=None, help="write the conversion numbers as JSON to this path")
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since exec (``VmHWM``; ``ru_maxrss`` is inherited across
    fork+exec, so a child started by a big parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoints_convert.convert import hf_to_mcore, mcore_to_hf  # after --help: imports torch

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        if args.command == "to-mcore":
            stats = hf_to_mcore(args.hf, out, tp=args.tp, pp=args.pp)
        else:
            stats = mcore_to_hf(args.mcore, out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except ValueError as err:  # CheckpointError included: user mistakes, the message says the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    result = {
        "command": args.command,
        "out": str(out),
        "tensors": stats.num_tensors,
        "bytes": stats.total_bytes,
        "largest_tensor_bytes": stats.largest_tensor_bytes,
        "seconds": round(seconds, 3),
        "gb_per_s": round(stats.total_bytes / 1e9 / max(seconds, 1e-9), 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    for key, value in result.items():
        print(f"{key:<22} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
