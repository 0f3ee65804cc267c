"""Weight-sync throughput on loopback: bucketed broadcast vs one request per tensor vs disk, in one run.

    python tools/bench_weight_sync.py                       # ~0.5 GB, 400 tensors (Qwen3-4B's count), 1 dev server
    python tools/bench_weight_sync.py --layers 2 --json     # smaller, machine-readable

Builds a random Qwen3-shaped HF model of the requested size, starts dev server(s) on it, and pushes
its tensors with each method (``--repeats`` times, best run reported):

- ``distributed/bucketed-flat``: one ``/update_weights_from_distributed`` request and one flattened
  broadcast per bucket (``--bucket-mb``, default 512; ``load_format="flattened_bucket"``);
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
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def build_model(out_dir: Path, layers: int, hidden: int, vocab: int) -> Path:
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    return save_tiny_hf_model(
        out_dir,
        arch="qwen3",
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
    return [(n, t.mul(1.001)) for n, t in tensors.items()]  # new values, same names and shapes


def run_bench(args: argparse.Namespace) -> dict:
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig
    from sdpg_mcore.rollout.weight_sync import DiskWeightSync, DistributedWeightSync

    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    model_dir = build_model(work / "model", args.layers, args.hidden, args.vocab)
    tensors = load_tensors(model_dir)
    total_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    config = ServerConfig(
        model_path=str(model_dir),
        num_servers=args.num_servers,
        log_dir=str(work / "logs"),
        router=False,
        health_timeout_s=300,
    )
    rows = []
    with RolloutServers(config) as servers:
        urls = servers.worker_urls
        methods = {
            "distributed/bucketed-flat": dict(bucket_bytes=args.bucket_mb << 20, flatten=True),
            "distributed/bucketed": dict(bucket_bytes=args.bucket_mb << 20, flatten=False),
            "distributed/per-tensor": dict(bucket_bytes=0, flatten=False),
        }
        for label, kwargs in methods.items():
            sync = DistributedWeightSync(urls, master_port=find_free_port(), **kwargs)
            sync.connect()
            best = None
            for rep in range(args.repeats):
                stats = sync.push(tensors, f"{label}-{rep}")
                best = stats if best is None or stats.seconds < best.seconds else best
            sync.close()
            rows.append(
                {
                    "method": label,
                    "requests": best.num_requests,
                    "seconds": best.seconds,
                    "gb_per_s": best.gb_per_s,
                }
            )
        disk = DiskWeightSync(urls, Path(args.shared_dir) / work.name, hf_config_dir=model_dir)
        best = None
        for rep in range(args.repeats):
            stats = disk.push(tensors, f"disk-{rep}")
            best = stats if best is None or stats.seconds < best.seconds else best
        rows.append(
            {
                "method": "disk",
                "requests": best.num_requests,
                "seconds": best.seconds,
                "gb_per_s": best.gb_per_s,
            }
        )
    import shutil

    shutil.rmtree(Path(args.shared_dir) / work.name, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    by_method = {r["method"]: r for r in rows}
    best_bucketed = min(
        by_method[m]["seconds"] for m in ("distributed/bucketed", "distributed/bucketed-flat")
    )
    speedup = by_method["distributed/per-tensor"]["seconds"] / best_bucketed
    return {
        "model_gb": total_bytes / 1e9,
        "num_tensors": len(tensors),
        "num_servers": args.num_servers,
        "bucket_mb": args.bucket_mb,
        "rows": rows,
        "bucketed_speedup_vs_per_tensor": speedup,
        "torch_threads": torch.get_num_threads(),
    }


def format_table(result: dict) -> str:
    lines = [
        f"model {result['model_gb']:.3f} GB in {result['num_tensors']} tensors -> {result['num_servers']} dev server(s), "
        f"bucket {result['bucket_mb']} MB",
        f"{'method':<24}{'requests':>10}{'seconds':>10}{'GB/s':>8}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['method']:<24}{row['requests']:>10}{row['seconds']:>10.3f}{row['gb_per_s']:>8.2f}"
        )
    lines.append(
        f"best bucketed vs per-tensor requests: {result['bucketed_speedup_vs_per_tensor']:.1f}x faster"
    )
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
    parser.add_argument("--num-servers", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="pushes per method; the fastest is reported")
    parser.add_argument("--shared-dir", default="/dev/shm", help="where the disk method writes safetensors")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.hidden % 16 or args.layers < 1 or args.repeats < 1:
        parser.error("--hidden must be a multiple of 16; --layers and --repeats >= 1")
    logging.basicConfig(level=logging.WARNING)
    result = run_bench(args)
    sys.stdout.write((json.dumps(result, indent=2) if args.json else format_table(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
