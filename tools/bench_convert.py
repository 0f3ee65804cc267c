#!/usr/bin/env python
"""Benchmark the streaming HF <-> Megatron conversion: throughput and peak memory vs checkpoint size.

Generates a synthetic Llama-shaped bf16 checkpoint of ``--size-gb`` (written tensor by tensor, so
generating it needs no more memory than converting it), then runs ``tools/convert_hf.py to-mcore``
and ``to-hf`` as child processes. Each child reports its own peak RSS (``VmHWM``, which unlike
``ru_maxrss`` does not inherit the parent's peak across fork+exec); the parent adds the child's CPU
time. The target is peak RSS <= 2 x largest tensor + 1 GB. ``--verify`` (default on) checks that
the exported tensors equal the generated ones bit for bit.

    python tools/bench_convert.py                     # 2 GB, table
    python tools/bench_convert.py --size-gb 0.5 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from checkpoints_convert.hf_io import HfCheckpointReader, SafetensorsShardWriter  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
CONVERT = Path(__file__).resolve().parent / "convert_hf.py"


def synthetic_plan(size_gb: float) -> tuple[dict, list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """A Llama config with as many layers as fit ``size_gb`` in bf16, and its tensor list in HF order."""
    head_dim = HIDDEN // HEADS
    layer = [
        ("input_layernorm.weight", (HIDDEN,)),
        ("self_attn.q_proj.weight", (HEADS * head_dim, HIDDEN)),
        ("self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        ("self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        ("self_attn.o_proj.weight", (HIDDEN, HEADS * head_dim)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
        ("mlp.gate_proj.weight", (FFN, HIDDEN)),
        ("mlp.up_proj.weight", (FFN, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, FFN)),
    ]
    per_layer = sum(torch.Size(s).numel() for _, s in layer) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    num_layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    plan = [("model.embed_tokens.weight", (VOCAB, HIDDEN), torch.bfloat16)]
    for i in range(num_layers):
        plan += [(f"model.layers.{i}.{n}", s, torch.bfloat16) for n, s in layer]
    plan += [
        ("model.norm.weight", (HIDDEN,), torch.bfloat16),
        ("lm_head.weight", (VOCAB, HIDDEN), torch.bfloat16),
    ]
    return config, plan


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)


def generate(out_dir: Path, size_gb: float, shard_gb: float = 1.0) -> dict:
    config, plan = synthetic_plan(size_gb)
    writer = SafetensorsShardWriter(out_dir, plan, max_shard_bytes=int(shard_gb * 1e9))
    for name, shape, _ in plan:
        writer.write(name, _tensor(name, shape))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    largest = max(torch.Size(s).numel() * 2 for _, s, _ in plan)
    return {
        "bytes": writer.total_bytes,
        "largest_tensor_bytes": largest,
        "layers": config["num_hidden_layers"],
    }


def run_child(args: list[str], json_path: Path) -> tuple[float, float, float, int]:
    """Run ``convert_hf.py args`` in a child; (wall seconds incl. start-up, conversion seconds as the
    child measured them, CPU seconds of the child, peak RSS bytes of the child). CPU seconds are
    reported because wall time on a shared machine mostly measures the neighbours."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(CONVERT), *args, "--json", str(json_path)], stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf.py {' '.join(args)} failed with exit code {proc.returncode}")
    report = json.loads(json_path.read_text())
    # The child's own VmHWM: wait4's ru_maxrss would include this (large) parent's RSS at fork time.
    return wall, report["seconds"], usage.ru_utime + usage.ru_stime, report["peak_rss_bytes"]


def verify(src: Path, dst: Path) -> int:
    a, b = HfCheckpointReader(src), HfCheckpointReader(dst)
    if sorted(a.names()) != sorted(b.names()):
        raise AssertionError("exported tensor names differ from the source")
    for name in a.names():
        if not torch.equal(a.read(name), b.read(name)):
            raise AssertionError(f"{name} differs after the round trip")
    return len(a.names())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size in GB (default 2)")
    p.add_argument("--tp", type=int, default=1, help="--tp passed to to-mcore (default 1)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exact round-trip check")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, mcore, back = work / "hf", work / "mcore", work / "hf_back"
    for d in (hf, mcore, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        info = generate(hf, args.size_gb)
        gen_s = time.perf_counter() - t0
        target = 2 * info["largest_tensor_bytes"] + (1 << 30)
        rows = []
        for direction, child_args in (
            ("to-mcore", ["to-mcore", "--hf", str(hf), "--out", str(mcore), "--tp", str(args.tp)]),
            ("to-hf", ["to-hf", "--mcore", str(mcore), "--out", str(back)]),
        ):
            wall, seconds, cpu, peak = run_child(child_args, work / f"{direction}.json")
            rows.append(
                {
                    "direction": direction,
                    "checkpoint_gb": info["bytes"] / 1e9,
                    "largest_tensor_gb": info["largest_tensor_bytes"] / 1e9,
                    "seconds": seconds,
                    "wall_seconds_with_startup": wall,
                    "cpu_seconds": cpu,
                    "gb_per_s": info["bytes"] / 1e9 / seconds,
                    "peak_rss_gb": peak / 1e9,
                    "target_rss_gb": target / 1e9,
                    "within_target": peak <= target,
                }
            )
        verified = None if args.no_verify else verify(hf, back)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        f"{'direction':<10} {'ckpt GB':>8} {'largest GB':>10} {'s':>7} {'wall s':>7} {'CPU s':>6} {'GB/s':>6} "
        f"{'peak RSS GB':>11} {'target GB':>9} ok"
    )
    print(
        f"synthetic llama: {info['layers']} layers, generated in {gen_s:.1f}s; tensors verified: {verified}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['direction']:<10} {r['checkpoint_gb']:>8.3f} {r['largest_tensor_gb']:>10.3f} {r['seconds']:>7.1f} "
            f"{r['wall_seconds_with_startup']:>7.1f} {r['cpu_seconds']:>6.1f} "
            f"{r['gb_per_s']:>6.3f} {r['peak_rss_gb']:>11.3f} {r['target_rss_gb']:>9.3f} "
            f"{'yes' if r['within_target'] else 'NO'}"
        )
    result = {"layers": info["layers"], "generate_seconds": gen_s, "verified_tensors": verified, "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["within_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
