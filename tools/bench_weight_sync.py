"""Weight-sync throughput on loopback: bucketed broadcast vs one request per tensor vs disk, in one run.

    python tools/bench_weight_sync.py                           # 0.26 GB bf16, 398 tensors (Qwen3-4B's count)
    python tools/bench_weight_sync.py --num-servers 1 --json ws.json   # one server, JSON too

Builds a random Qwen3-shaped HF model of the requested size, starts dev server(s) on it (for each
``--num-servers`` count), and pushes its tensors with each method (``--repeats`` times, best run
reported, median beside it):

- ``distributed/bucketed-flat``: one ``/update_weights_from_distributed`` request and one flattened
  broadcast per bucket (``--bucket-mb``, default 512; ``load_format="flattened_bucket"``), which the
  dev server receives straight into its weights from the second push on (``rollout/flat_weights.py``);
- ``distributed/bucketed``: one request per bucket, its tensors broadcast one by one, all in
  flight at once, received straight into the server's weights (no flatten copy on either side);
- ``distributed/per-tensor``: one request and one broadcast per tensor (the slow pattern);
- ``disk``: safetensors into ``--shared-dir`` (default ``/dev/shm``) + ``/update_weights_from_disk``.

GB/s counts the tensor bytes over the wall time of the whole push, HTTP and server-side loads included.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DISTRIBUTED_METHODS = {
    "distributed/bucketed-flat": dict(flatten=True),
    "distributed/bucketed": dict(flatten=False),
    "distributed/per-tensor": dict(bucket_bytes=0, flatten=False),
}


def build_model(out_dir: Path, layers: int, hidden: int, vocab: int, dtype: torch.dtype) -> Path:
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    return save_tiny_hf_model(
        out_dir,
        arch="qwen3",
        dtype=dtype,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=hidden // 16,
        vocab_size=vocab,
        max_position_embeddings=512,
    )


def load_tensors(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    return [(n, t.mul(1.001)) for n, t in tensors.items()]  # new values, same names, shapes and dtype


def _timed(push, repeats: int) -> dict:
    """Push ``repeats`` times; the fastest run is the method's number, the median shows the spread."""
    runs = sorted((push(rep) for rep in range(repeats)), key=lambda stats: stats.seconds)
    best = runs[0]
    return {
        "requests": best.num_requests,
        "seconds": best.seconds,
        "median_seconds": runs[len(runs) // 2].seconds,
        "gb_per_s": best.gb_per_s,
    }


def bench_servers(
    args: argparse.Namespace, model_dir: Path, tensors, num_servers: int, work: Path
) -> list[dict]:
    """Every method against ``num_servers`` dev servers, one after another on the same servers."""
    from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig
    from sdpg_mcore.rollout.weight_sync import DiskWeightSync, DistributedWeightSync

    config = ServerConfig(
        model_path=str(model_dir),
        num_servers=num_servers,
        log_dir=str(work / f"logs_{num_servers}"),
        router=False,
        health_timeout_s=300,
        extra_args=["--dtype", args.dtype],
    )
    rows = []
    with RolloutServers(config) as servers:
        urls = servers.worker_urls
        for label, kwargs in DISTRIBUTED_METHODS.items():
            sync = DistributedWeightSync(
                urls, api_key=servers.api_key, **{"bucket_bytes": args.bucket_mb << 20, **kwargs}
            )
            sync.connect()
            rows.append(
                {
                    "method": label,
                    **_timed(
                        lambda rep, sync=sync, label=label: sync.push(tensors, f"{label}-{rep}"), args.repeats
                    ),
                }
            )
            sync.close()
        disk = DiskWeightSync(
            urls, Path(args.shared_dir) / work.name, hf_config_dir=model_dir, api_key=servers.api_key
        )
        rows.append({"method": "disk", **_timed(lambda rep: disk.push(tensors, f"disk-{rep}"), args.repeats)})
    for row in rows:
        row["num_servers"] = num_servers
    return rows


def run_bench(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    try:
        model_dir = build_model(work / "model", args.layers, args.hidden, args.vocab, DTYPES[args.dtype])
        tensors = load_tensors(model_dir)
        rows = [row for n in args.num_servers for row in bench_servers(args, model_dir, tensors, n, work)]
    finally:
        shutil.rmtree(Path(args.shared_dir) / work.name, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    speedups = {}
    for n in args.num_servers:
        by_method = {r["method"]: r for r in rows if r["num_servers"] == n}
        best_bucketed = min(
            by_method[m]["seconds"] for m in ("distributed/bucketed", "distributed/bucketed-flat")
        )
        speedups[str(n)] = by_method["distributed/per-tensor"]["seconds"] / best_bucketed
    return {
        "model_gb": sum(t.numel() * t.element_size() for _, t in tensors) / 1e9,
        "num_tensors": len(tensors),
        "dtype": args.dtype,
        "bucket_mb": args.bucket_mb,
        "repeats": args.repeats,
        "rows": rows,
        "bucketed_speedup_vs_per_tensor": speedups,
        "torch_threads": torch.get_num_threads(),
    }


def format_table(result: dict) -> str:
    lines = [
        f"model {result['model_gb']:.3f} GB ({result['dtype']}) in {result['num_tensors']} tensors, "
        f"bucket {result['bucket_mb']} MB, best of {result['repeats']} pushes",
        f"{'servers':>7}  {'method':<26}{'requests':>9}{'seconds':>9}{'median':>9}{'GB/s':>7}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['num_servers']:>7}  {row['method']:<26}{row['requests']:>9}{row['seconds']:>9.3f}"
            f"{row['median_seconds']:>9.3f}{row['gb_per_s']:>7.2f}"
        )
    for n, speedup in result["bucketed_speedup_vs_per_tensor"].items():
        lines.append(f"{n} server(s): best bucketed vs per-tensor requests: {speedup:.1f}x faster")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=36, help="decoder layers, 11 tensors each (Qwen3-4B has 36)"
    )
    parser.add_argument(
        "--hidden", type=int, default=512, help="hidden size (multiple of 16); ~12.6 MB/layer at 512"
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--num-servers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2],
        help="comma-separated server counts, each measured in the same run (default 1,2)",
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight dtype (servers run bf16 weights)"
    )
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="pushes per method; the fastest is reported")
    parser.add_argument("--shared-dir", default="/dev/shm", help="where the disk method writes safetensors")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    if args.hidden % 16 or args.layers < 1 or args.repeats < 1 or min(args.num_servers) < 1:
        parser.error("--hidden must be a multiple of 16; --layers, --repeats and --num-servers >= 1")
    logging.basicConfig(level=logging.WARNING)
    result = run_bench(args)
    sys.stdout.write(format_table(result) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
