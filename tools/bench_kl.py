"""Benchmark the fused reverse-KL LM head against the materialising approach of the reference.

Both variants compute, for N tokens, the student and teacher logits of one output layer (teacher
no-grad), the reverse KL, the sampled-token log-prob and the student entropy, then backpropagate a
random per-token upstream gradient into the student hidden states and the weight.

* ``reference``: materialises ``[N, V]`` logits for student and teacher in the model dtype,
  ``log_softmax`` / KL / entropy in that dtype (the reference's bf16 KL), log-prob from an fp32
  ``log_softmax`` — autograd keeps every ``[N, V]`` temporary for the backward.
* ``fused``: ``sdpg_mcore.ops.fused_kl_head`` (chunked, custom backward, fp32 sums) with the first
  of ``--backends`` (default ``auto``: triton on CUDA, torch on CPU); ``fused_<backend>`` for each
  further one (``--backends triton,torch``: the Triton head beside the old torch one).

Each variant runs in a fresh subprocess (clean allocator, honest peak). Peak EXTRA memory is what
the step adds on top of its inputs (gradients included): on CUDA ``max_memory_allocated``; on CPU
the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``).
Time is forward + backward, median (and best) of ``--iters`` after one warm-up, over ``--rounds``
alternating pairs of processes.

    python tools/bench_kl.py                      # CPU shape N=1024 H=128 V=16000 fp32, ~15 s
    python tools/bench_kl.py --shape qwen3-4b     # N=8192, H=2560, V=151,936, bf16 (GPU)
    python tools/bench_kl.py --shape tiny --json /tmp/kl.json
    python tools/bench_kl.py --shape qwen3-4b --chunk-sizes 147,441,1024   # + a chunk sweep, best_chunk
    python tools/bench_kl.py --shape llama70b-tp8 --backends triton,torch  # one TP8 shard, both heads

Two checks of the GPU path that run on a CPU (no timing):

    python tools/bench_kl.py --count --json /tmp/count.json  # launches per vocab block, bytes per
        # (token, vocab) pair, GEMM FLOPs per N*V*H of both backends (ops.kl_head_traffic), ~30 s
    python tools/bench_kl.py --compile --json /tmp/compile.json  # both Triton kernels compiled for
        # sm_90 and sm_80 at the plan's block sizes: registers, spills, shared memory (ops.kl_head_compile)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One benchmark problem."""

    tokens: int
    """N: tokens (student and teacher each)."""
    hidden: int
    """H: hidden size."""
    vocab: int
    """V: real vocabulary; the weight is padded to a multiple of 128 like Megatron's."""
    dtype: str
    """Model dtype of hidden states and weight."""
    chunk_size: int | None
    """Tokens per chunk for the fused head (None: its 256 MiB default budget)."""


SHAPES = {
    # CPU: fp32 (bf16 matmuls have no fast path on most CPUs); chunk = N/16 so that the fused
    # head's temporaries stand in the same proportion to N as the 256 MiB default does at Qwen3 scale.
    "cpu": Shape(tokens=1024, hidden=128, vocab=16000, dtype="float32", chunk_size=64),
    "tiny": Shape(tokens=64, hidden=16, vocab=1000, dtype="float32", chunk_size=8),
    "qwen3-4b": Shape(tokens=8192, hidden=2560, vocab=151936, dtype="bfloat16", chunk_size=None),
    # Llama-3.3-70B's output layer as one TP8 rank sees it: 128,256 / 8 rows, H = 8192.
    "llama70b-tp8": Shape(tokens=8192, hidden=8192, vocab=16032, dtype="bfloat16", chunk_size=None),
}
GPU_SHAPES = ("qwen3-4b", "llama70b-tp8")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def _padded(vocab: int) -> int:
    return -(-vocab // 128) * 128


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMeter:
    """Peak extra memory of one region: CUDA allocator stats, or the RSS high-water mark on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def __enter__(self):
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:  # older kernels: the high-water mark then includes the small warm-up
                pass
        return self

    def __exit__(self, *exc):
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_bytes("VmHWM") - self.base


def _reference_step(h_s, h_t, weight, targets, upstream, vocab):
    import torch

    w_real = weight[:vocab]
    z_s = h_s @ w_real.t()
    with torch.no_grad():
        log_p_t = torch.log_softmax(h_t @ w_real.t(), dim=-1)
    log_p_s = torch.log_softmax(z_s, dim=-1)
    p_s = log_p_s.exp()
    kl = (p_s * (log_p_s - log_p_t)).sum(-1)
    entropy = -(p_s * log_p_s).sum(-1)
    logprob = torch.log_softmax(z_s.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return kl.float(), logprob, entropy.float()


def _fused_step(h_s, h_t, weight, targets, upstream, vocab, chunk_size, backend):
    from sdpg_mcore.ops import fused_kl_head

    return fused_kl_head(h_s, h_t, weight, targets, vocab_size=vocab, chunk_size=chunk_size, backend=backend)


def run_worker(
    variant: str,
    shape: Shape,
    iters: int,
    device_name: str,
    sweep: list | None = None,
    backend: str = "auto",
    profile: bool = False,
) -> dict:
    """Run one variant in this process and return its measurements (``sweep``: the fused head's
    peak and time at each of these chunk sizes too, same inputs, same process; on CPU the RSS
    high-water mark of a process that already ran the head can read low, on CUDA peaks are exact)."""
    import torch

    device = torch.device(device_name)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(n, h, v):
        h_s = (torch.randn(n, h, generator=gen) * 2).to(device, dtype).requires_grad_()
        h_t = (torch.randn(n, h, generator=gen) * 2).to(device, dtype)
        w = (torch.randn(_padded(v), h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
        tg = torch.randint(0, v, (n,), generator=gen).to(device)
        up = torch.randn(3, n, generator=gen).to(device)
        return h_s, h_t, w, tg, up

    def step(inputs, vocab, chunk_size):
        h_s, h_t, w, tg, up = inputs
        h_s.grad = w.grad = None
        if variant == "fused":
            outs = _fused_step(h_s, h_t, w, tg, up, vocab, chunk_size, backend)
        else:
            outs = _reference_step(h_s, h_t, w, tg, up, vocab)
        sum((o * g).sum() for o, g in zip(outs, up)).backward()
        return outs

    step(
        make(8, shape.hidden, 300), 300, shape.chunk_size
    )  # kernels and thread pools outside the measurement
    inputs = make(shape.tokens, shape.hidden, shape.vocab)
    out = _measure(step, inputs, shape.vocab, shape.chunk_size, iters, device)
    out["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out["threads"] = torch.get_num_threads()
    if variant == "fused":
        from sdpg_mcore.ops.kl_head_backends import resolve_backend

        out["backend"] = resolve_backend(backend, device, dtype)
    if variant == "fused" and sweep:
        out["sweep"] = [
            {"chunk_size": c} | _measure(step, inputs, shape.vocab, c, iters, device) for c in sweep
        ]
    if variant == "fused" and device.type == "cuda":
        out["gemm_probe"] = gemm_probe(inputs[0], inputs[2], shape.vocab, shape.chunk_size)
    if profile:
        from sdpg_mcore.audit.head_check import kernel_table

        out["profile"] = kernel_table(lambda: step(inputs, shape.vocab, shape.chunk_size))
    return out


def _measure(step, inputs, vocab: int, chunk_size: int | None, iters: int, device) -> dict:
    """Peak extra bytes of one step, then the median of ``iters`` timed steps."""
    import torch

    inputs[0].grad = inputs[2].grad = None  # the last run's gradients are not part of the baseline
    with PeakMeter(device) as meter:
        outs = step(inputs, vocab, chunk_size)
    summary = [float(o.detach().double().mean()) for o in outs]
    del outs
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(inputs, vocab, chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "peak_bytes": int(meter.peak),
        "seconds": statistics.median(times),
        "all_seconds": times,
        "means": {"kl": summary[0], "logprob": summary[1], "entropy": summary[2]},
    }


def gemm_probe(h_s, weight, vocab: int, chunk_size: int | None, iters: int = 10) -> dict:
    """TFLOP/s of the head's GEMMs alone (CUDA) at the plan's aligned block width and at the width
    the plan had before blocks were rounded to 128 rows (``unaligned``): the stacked
    ``[2N, H] x [H, B]`` logits GEMM with fp32 output (what the head runs) and with bf16 output, the
    ``dh += dz W_b`` GEMM (bf16 ``dz``, fp32 accumulator) and ``dW_b = dz^T h``; and the reference's
    ``[N, H] x [H, V]`` bf16 GEMM. Tells GEMM speed from elementwise cost."""
    import torch

    from sdpg_mcore.ops.kl_head_math import DEFAULT_CHUNK_BUDGET_BYTES, matmul_into, plan_chunks

    n, h = h_s.shape
    plan = plan_chunks(
        h_s, h_s, weight, torch.zeros(n, dtype=torch.long, device=h_s.device), vocab_size=vocab,
        temperature=1.0, teacher_temperature=1.0, chunk_size=chunk_size, tp_size=1, tp_rank=0,
    )  # fmt: skip
    chunk = chunk_size or DEFAULT_CHUNK_BUDGET_BYTES // (3 * plan.local_rows * 4)
    unaligned = min(plan.local_rows, chunk * plan.local_rows // plan.group_tokens)
    x = h_s.detach()[: plan.group_tokens]
    stacked, grad_h = torch.cat([x, x]), torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def rate(fn, flops: float) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return flops * iters / (time.perf_counter() - start) / 1e12

    def probe(rows: int) -> dict:
        block = weight.detach()[:rows]
        dz = torch.randn(x.shape[0], rows, device=x.device).to(x.dtype)
        flops = 2.0 * x.shape[0] * rows * h
        return {
            "block_rows": rows,
            "logits_fp32_out_tflops": rate(
                lambda: torch.mm(stacked, block.t(), out_dtype=torch.float32), 2 * flops
            ),
            "logits_bf16_out_tflops": rate(lambda: torch.mm(stacked, block.t()), 2 * flops),
            "grad_h_accumulate_tflops": rate(lambda: matmul_into(grad_h, dz, block, accumulate=True), flops),
            "grad_w_tflops": rate(lambda: torch.mm(dz.t(), x), flops),
        }

    return {
        "aligned": probe(plan.block_rows),
        "unaligned": probe(unaligned),
        "full_vocab_bf16_tflops": rate(
            lambda: torch.mm(x, weight.detach()[:vocab].t()), 2.0 * x.shape[0] * vocab * h
        ),
    }


def _spawn(
    variant: str,
    shape: Shape,
    iters: int,
    device: str,
    threads: int,
    sweep: list | None = None,
    profile: bool = False,
) -> dict:
    """One worker process; ``variant`` is ``reference`` or ``fused:<backend>``."""
    kind, _, backend = variant.partition(":")
    cmd = [sys.executable, __file__, "--worker", kind, "--shape-json", json.dumps(dataclasses.asdict(shape))]
    cmd += ["--iters", str(iters), "--device", device, "--threads", str(threads)]
    cmd += ["--backends", backend or "auto"] + (["--profile"] if profile else [])
    if sweep and kind == "fused":
        cmd += ["--chunk-sizes", ",".join("none" if c is None else str(c) for c in sweep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _matmul_flops(shape: Shape) -> tuple[float, float]:
    """(fused, reference) matmul FLOPs of one forward+backward: 12 vs 8 N*V*H."""
    nvh = 2.0 * shape.tokens * shape.vocab * shape.hidden
    return 6 * nvh, 4 * nvh


def _combine(runs: list[dict]) -> dict:
    """One variant over several processes: worst peak, median and best of all timed iterations."""
    times = [t for run in runs for t in run["all_seconds"]]
    return {
        **runs[0],
        "peak_bytes": max(run["peak_bytes"] for run in runs),
        "seconds": statistics.median(times),
        "min_seconds": min(times),
        "all_seconds": times,
    }


def benchmark(
    shape: Shape,
    shape_name: str,
    iters: int,
    device: str,
    rounds: int = 1,
    threads: int = 0,
    sweep: list | None = None,
    backends: tuple[str, ...] = ("auto",),
    profile: bool = False,
) -> dict:
    """Alternate fresh fused / reference processes ``rounds`` times (fair under a shared, noisy CPU);
    ``sweep``: chunk sizes also measured in the first fused process (``best_chunk``). The first of
    ``backends`` is ``fused``, each further one ``fused_<backend>``, all against one reference."""
    names = ["fused"] + [f"fused_{b}" for b in backends[1:]]
    variants = dict(zip(names, (f"fused:{b}" for b in backends))) | {"reference": "reference"}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, variant in variants.items():
            first = r == 0 and name == "fused"
            runs[name].append(
                _spawn(variant, shape, iters, device, threads, sweep if first else None, profile and r == 0)
            )
    combined = {name: _combine(rs) for name, rs in runs.items()}
    fused, reference = combined["fused"], combined["reference"]
    result = {
        "shape": {"name": shape_name, **dataclasses.asdict(shape), "padded_vocab": _padded(shape.vocab)},
        **combined,
        **_ratios(fused, reference, ""),
    }
    for name in names[1:]:
        result |= _ratios(combined[name], reference, f"_{name}")
    if "sweep" in fused:
        result["sweep"] = _sweep_table(fused.pop("sweep"), reference, shape)
        fits = [row for row in result["sweep"] if row["memory_ratio"] >= MIN_MEMORY_RATIO]
        result["best_chunk"] = min(fits or result["sweep"], key=lambda row: row["seconds"])
    if device.startswith("cuda"):
        fused_flops, ref_flops = _matmul_flops(shape)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in fused["device"]), None)
        result["tflops"] = {
            "fused_achieved": fused_flops / fused["seconds"] / 1e12,
            "reference_achieved": ref_flops / reference["seconds"] / 1e12,
            "fused_useful": ref_flops / fused["seconds"] / 1e12,
            "device_peak": peak,
        }
    return result


def _ratios(fused: dict, reference: dict, suffix: str) -> dict:
    """Memory and time of one fused variant against the reference (keys end in ``suffix``)."""
    return {
        f"memory_ratio{suffix}": reference["peak_bytes"] / max(fused["peak_bytes"], 1),
        f"time_ratio{suffix}": fused["seconds"] / reference["seconds"],
        f"time_ratio_best{suffix}": fused["min_seconds"] / reference["min_seconds"],
        f"max_mean_diff{suffix}": max(abs(fused["means"][k] - reference["means"][k]) for k in fused["means"]),
    }


MIN_MEMORY_RATIO = 10.0
"""The fused head must stay at least this many times below the reference's peak (``best_chunk``)."""


def _sweep_table(rows: list[dict], reference: dict, shape: Shape) -> list[dict]:
    fused_flops, _ = _matmul_flops(shape)
    return [
        {
            "chunk_size": row["chunk_size"],
            "seconds": row["seconds"],
            "peak_bytes": row["peak_bytes"],
            "memory_ratio": reference["peak_bytes"] / max(row["peak_bytes"], 1),
            "time_ratio": row["seconds"] / reference["seconds"],
            "tflops": fused_flops / row["seconds"] / 1e12,
        }
        for row in rows
    ]


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["shape"]
    title = f"fused KL head vs materialising reference — {s['name']}: N={s['tokens']} H={s['hidden']} "
    title += f"V={s['vocab']} (padded {s['padded_vocab']}) {s['dtype']} on {result['fused']['device']}"
    table = Table(title=title)
    for col in (
        "variant",
        "peak extra MiB",
        "fwd+bwd s",
        "best s",
        "mean kl",
        "mean logprob",
        "mean entropy",
    ):
        table.add_column(col, justify="right")
    names = [k for k in result if k.startswith("fused") and isinstance(result[k], dict)] + ["reference"]
    for name in names:
        r = result[name]
        m = r["means"]
        label = f"{name} ({r['backend']})" if "backend" in r else name
        table.add_row(
            label, f"{r['peak_bytes'] / 2**20:.1f}", f"{r['seconds']:.3f}", f"{r['min_seconds']:.3f}",
            f"{m['kl']:.5f}", f"{m['logprob']:.5f}", f"{m['entropy']:.5f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"CPU threads per worker: {result['fused']['threads']}")
    for name in names[:-1]:
        suffix = "" if name == "fused" else f"_{name}"
        console.print(
            f"{name}: memory_ratio (reference/fused) = {result['memory_ratio' + suffix]:.2f}   "
            f"time_ratio (fused/reference) = {result['time_ratio' + suffix]:.2f} "
            f"(best {result['time_ratio_best' + suffix]:.2f})   chunk_size = {s['chunk_size']}"
        )
    for row in result.get("sweep", []):
        console.print(
            f"  chunk_size {row['chunk_size']!s:>5}: {row['seconds']:.3f} s  "
            f"peak {row['peak_bytes'] / 2**20:8.1f} MiB  memory_ratio {row['memory_ratio']:5.1f}  "
            f"time_ratio {row['time_ratio']:.2f}  {row['tflops']:.0f} TFLOP/s"
        )
    if "best_chunk" in result:
        b = result["best_chunk"]
        console.print(
            f"best chunk (memory_ratio >= {MIN_MEMORY_RATIO:.0f}): {b['chunk_size']} ({b['seconds']:.3f} s)"
        )
    if "gemm_probe" in result["fused"]:
        g = result["fused"]["gemm_probe"]
        for kind in ("aligned", "unaligned"):
            p = g[kind]
            console.print(
                f"GEMMs alone (TFLOP/s), {kind} blocks of {p['block_rows']} rows: logits fp32-out "
                f"{p['logits_fp32_out_tflops']:.0f} (bf16-out {p['logits_bf16_out_tflops']:.0f}), "
                f"dh += dz W {p['grad_h_accumulate_tflops']:.0f}, dW {p['grad_w_tflops']:.0f}"
            )
        console.print(f"full-vocab bf16 GEMM: {g['full_vocab_bf16_tflops']:.0f} TFLOP/s")
    for name in names:
        for row in result[name].get("profile", {}).get("kernels", [])[:6]:
            console.print(
                f"  {name} kernel: {row['total_us']:10.0f} us  x{row['calls']:<4} {row['name'][:90]}"
            )
    if "tflops" in result:
        t = result["tflops"]
        console.print(
            f"TFLOP/s: fused {t['fused_achieved']:.0f} achieved ({t['fused_useful']:.0f} useful), "
            f"reference {t['reference_achieved']:.0f}; device peak {t['device_peak']}"
        )


def _chunk_list(text: str) -> list[int | None]:
    sizes = [
        None if part.strip().lower() == "none" else int(part) for part in text.split(",") if part.strip()
    ]
    if not sizes or any(c is not None and c < 1 for c in sizes):
        raise argparse.ArgumentTypeError(
            f"--chunk-sizes: positive ints or 'none', comma-separated; got {text!r}"
        )
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="problem size (default: cpu)")
    parser.add_argument("--chunk-size", type=int, default=None, help="override the shape's fused chunk size")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per process (median)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating fused/reference process pairs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per worker (default 1: on a shared CPU, OpenMP barriers of the fused "
        "head's many smaller ops make multi-thread timings measure the scheduler; 0 = torch default)",
    )
    parser.add_argument("--dtype", default=None, help="override the shape's dtype (float32, bfloat16, ...)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument(
        "--chunk-sizes",
        type=_chunk_list,
        default=None,
        help="comma list of fused chunk sizes to sweep ('none' = the default budget), e.g. 147,441,1024; "
        "measured in one process: peaks exact on CUDA (allocator stats), a lower bound on CPU (RSS)",
    )
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=("auto",),
        help="fused-head backends, comma-separated (auto, torch, triton): the first is 'fused', each "
        "further one 'fused_<backend>' (default auto: triton on CUDA, torch on CPU)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="each variant's torch.profiler kernel table for one step"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--count", action="store_true", help="count the GPU path's launches and bytes on CPU")
    mode.add_argument("--compile", action="store_true", help="compile the Triton kernels for sm_90/sm_80")
    parser.add_argument("--worker", choices=("fused", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)
    return parser


def _backend_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or any(n not in ("auto", "torch", "triton") for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"--backends: distinct names of auto, torch, triton; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO_ROOT))
        shape = Shape(**json.loads(args.shape_json))
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        result = run_worker(
            args.worker, shape, args.iters, args.device, args.chunk_sizes, args.backends[0], args.profile
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    if args.count or args.compile:
        result = count_gpu_path() if args.count else compile_gpu_kernels()
    else:
        result = _run_benchmark(parser, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _run_benchmark(parser: argparse.ArgumentParser, args) -> dict:
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[args.shape]
    if args.shape in GPU_SHAPES and not args.device.startswith("cuda"):
        parser.error(f"--shape {args.shape} needs a GPU: the reference variant materialises GBs of logits")
    if args.chunk_size is not None:
        shape = dataclasses.replace(shape, chunk_size=args.chunk_size)
    if args.dtype is not None:
        shape = dataclasses.replace(shape, dtype=args.dtype)
    result = benchmark(
        shape, args.shape, args.iters, args.device, args.rounds, args.threads, args.chunk_sizes,
        args.backends, args.profile,
    )  # fmt: skip
    print_table(result)
    return result


# ------------------------------------------------------------------ checks of the GPU path on CPU
def count_gpu_path() -> dict:
    """``--count``: both backends' GPU op sequence run on CPU (Triton under its interpreter)."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported (below)
    from sdpg_mcore.ops.kl_head_traffic import COUNT_SHAPES, count_head

    result = {backend: count_head(backend) for backend in ("triton", "torch")}
    _print_count(result, COUNT_SHAPES)
    return result


def _print_count(result: dict, shapes) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["triton"]["shape"]
    table = Table(
        title=f"fused KL head, GPU path counted on CPU (bf16, N={s['tokens']} H={s['hidden']}, "
        f"blocks of {s['block_rows']} rows; launches per block from {len(shapes)} calls of 4 and 8 blocks)"
    )
    rows = [
        ("launches per vocab block", "launches_per_block", "{:.1f}"),
        ("  of them Triton kernels", "triton_launches_per_block", "{:.1f}"),
        ("launches per call (fixed)", "launches_per_call", "{:.0f}"),
        ("bytes per (token, vocab) pair", "bytes_per_pair", "{:.1f}"),
        ("  Triton loads + stores", "kernel_bytes_per_pair", "{:.1f}"),
        ("  aten ops (GEMM outputs, dz operands, ...)", "aten_bytes_per_pair", "{:.1f}"),
        ("other bytes ([N, H], [V, H], [N]) per pair", "other_bytes_per_pair", "{:.1f}"),
        ("GEMM FLOPs / (N V H)", "gemm_flops_per_nvh", "{:.2f}"),
    ]
    table.add_column("")
    for backend in result:
        table.add_column(backend, justify="right")
    for label, key, fmt in rows:
        table.add_row(label, *(fmt.format(result[b][key]) for b in result))
    Console(width=120).print(table)


def compile_gpu_kernels() -> dict:
    """``--compile``: every Triton kernel variant compiled for sm_90 and sm_80 at the block widths the
    plan uses for the GPU shapes (and, for contrast, the unaligned width the plan used before)."""
    from sdpg_mcore.ops.kl_head_compile import compile_kernels

    result = {"targets": []}
    for name in GPU_SHAPES:
        aligned, unaligned = _plan_rows(SHAPES[name])
        for arch in (90, 80):
            result["targets"].append({"shape": name, "arch": f"sm_{arch}", "block_rows": aligned,
                                      "kernels": compile_kernels(arch, aligned)})  # fmt: skip
        result["targets"].append({"shape": name, "arch": "sm_90", "block_rows": unaligned, "unaligned": True,
                                  "kernels": compile_kernels(90, unaligned, aligned=False)})  # fmt: skip
    _print_compile(result)
    return result


def _plan_rows(shape: Shape) -> tuple[int, int]:
    """The plan's block rows for ``shape`` and the unaligned width of the split before it."""
    import torch

    from sdpg_mcore.ops.kl_head_math import DEFAULT_CHUNK_BUDGET_BYTES, plan_chunks

    hidden = torch.zeros(1, dtype=torch.bfloat16).expand(shape.tokens, shape.hidden)  # shapes only
    weight = torch.zeros(1, dtype=torch.bfloat16).expand(_padded(shape.vocab), shape.hidden)
    plan = plan_chunks(
        hidden, hidden, weight, torch.zeros(shape.tokens, dtype=torch.long), vocab_size=shape.vocab,
        temperature=1.0, teacher_temperature=1.0, chunk_size=shape.chunk_size, tp_size=1, tp_rank=0,
    )  # fmt: skip
    chunk = shape.chunk_size or DEFAULT_CHUNK_BUDGET_BYTES // (3 * plan.local_rows * 4)
    return plan.block_rows, min(plan.local_rows, chunk * plan.local_rows // plan.group_tokens)


def _print_compile(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Triton kernels of the fused KL head compiled without a GPU (bf16 dz, one token per program)"
    )
    for col in (
        "shape",
        "arch",
        "block rows",
        "kernel",
        "tile",
        "regs",
        "spill B",
        "smem B",
        "v4 / scalar loads",
    ):
        table.add_column(col, justify="right")
    for target in result["targets"]:
        rows = f"{target['block_rows']}" + (" unaligned" if target.get("unaligned") else "")
        for k in target["kernels"]:
            table.add_row(
                target["shape"], target["arch"], rows, k["kernel"], str(k["tile"]), str(k["registers"]),
                str(k["spill_bytes"]), str(k["shared_bytes"]),
                f"{k['global_loads_v4']} / {k['global_loads_scalar']}",
            )  # fmt: skip
    Console(width=150).print(table)


if __name__ == "__main__":
    sys.exit(main())
