"""The prepared GPU check (run through ``tools/gpu_check.sh``): one machine, one GPU, under 490 s.

Stages, each in its own subprocess with its own time limit (a CUDA error poisons a process; one
stage failing must not lose the others' results):

- ``env``: torch / CUDA / megatron-core versions, whether Transformer Engine imports (then the TE
  layer spec is used everywhere; without it the local spec — reported, not hidden).
- ``head_fp64``: both fused heads (Triton, torch) at bf16 on a Qwen3-sized vocabulary (151,936 rows)
  against an fp64 reference from the same bf16 inputs, within a FIXED 1e-4 (``audit.head_check``),
  and a head that rounds its logits to bf16 as a negative control that must fail; the logit-GEMM
  and softmax-reduction errors are reported beside (they explain the margin, decide nothing).
- ``parity``: Megatron vs ``transformers`` fp32 logits on tiny Llama and Qwen3 models.
- ``bench_kl``: ``tools/bench_kl.py --backends triton,torch --profile``: the Triton head, the torch
  head and the materialising reference at the Qwen3-4B shape (with a chunk sweep, ``KL_SWEEP``) and
  one Llama-3.3-70B TP8 shard (V/8 = 16,032, H = 8,192), each with its ``torch.profiler`` kernel
  table, and the GEMMs alone at the aligned and the old unaligned block width (``gemm_probe``).
- ``sdpg_step`` (last: a stall there cannot starve the others): two full SDPG steps (old/ref
  log-probs, teacher pass, fused head, loss, backward, optimizer) of a Qwen3-shaped random model at
  bf16 under the trainer's process-group setup (NCCL, world size 1), the reference weights swapped
  through pinned memory; some sampled ids lie past the tokenizer (``len(tokenizer) <
  config.vocab_size``).

Every stage writes timestamped progress lines to stderr, which go straight into the log (a timeout
reports the last of them). Prints one JSON summary line last; with ``$OUT`` set also writes
``$OUT/gpu_check.json`` and ``$OUT/gpu_check.log``. ``--cpu``: the same plumbing on CPU with small
shapes (tested in CI-less runs here before the GPU run).

    tools/gpu_check.sh            # on the GPU machine
    tools/gpu_check.sh --cpu      # here
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

TOTAL_BUDGET_S = 470.0
"""Whole check by default (``--budget-s``; the shell wrapper passes what is left of its 480 s after
installing the wheel, and kills at that plus 5 s): one device command may run 600 s."""
STAGES = {  # name -> own time limit (s); run in this order: the quick, informative ones first and
    # the SDPG step last, so a stall there cannot starve the others
    "env": 45,
    "head_fp64": 90,
    "parity": 90,
    "bench_kl": 180,
    "sdpg_step": 150,
}
CPU_SLOWDOWN = 4
"""``--cpu`` stage limits are this many times the GPU ones (a small, shared CPU machine)."""


def stage_limit(name: str, cpu: bool) -> float:
    return STAGES[name] * (CPU_SLOWDOWN if cpu else 1)


def _device(cpu: bool) -> str:
    return "cpu" if cpu else "cuda"


_STAGE_START = time.perf_counter()


def progress(message: str) -> None:
    """One timestamped line to stderr, flushed: the stage's log says where a timeout stopped it."""
    now = time.strftime("%H:%M:%S", time.gmtime())
    sys.stderr.write(f"[{now}Z +{time.perf_counter() - _STAGE_START:6.1f}s] {message}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------ stages
def stage_env(cpu: bool) -> dict:
    import torch

    from sdpg_mcore.models.spec import te_available

    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "te_spec": te_available()}
    try:
        import megatron.core

        out["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except ImportError as err:
        out["megatron_core"] = f"missing: {err}"
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
        out["mm_out_dtype_fp32"] = str(torch.mm(a, a, out_dtype=torch.float32).dtype)
    return out


def stage_head_fp64(cpu: bool) -> dict:
    """Both heads (triton: compiled on the GPU, under the interpreter with ``--cpu``; torch) and a
    bf16-logit control against fp64 with a fixed tolerance (``audit.head_check``)."""
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    from sdpg_mcore.audit.head_check import HEAD_TOL_CPU, HEAD_TOL_GPU, fused_head, head_fp64_report

    n, h, v = (64, 64, 4096) if cpu else (2048, 2560, 151936)
    heads = {backend: fused_head(backend) for backend in ("triton", "torch")}
    progress(f"head_fp64: {n} tokens, H={h}, V={v}; heads {', '.join(heads)} and the bf16-logit control")
    return head_fp64_report(heads, n, h, v, _device(cpu), HEAD_TOL_CPU if cpu else HEAD_TOL_GPU)


def _step_responses(vocab: int, lengths: tuple[int, int, int]) -> list:
    """4 groups of 4 synthetic responses (``sdpg_mcore.audit.synthetic``): prompts below a tokenizer
    300 ids shorter than ``vocab``, each response's last id the config's last row."""
    from sdpg_mcore.audit.synthetic import synthetic_responses

    prompt_len, context_len, response_len = lengths
    batch = synthetic_responses(
        4, 4, vocab_size=vocab, prompt_vocab_size=vocab - 300, prompt_len=prompt_len,
        context_len=context_len, response_len=response_len,
    )  # fmt: skip
    for response in batch:
        response.response_ids[-1] = (
            vocab - 1
        )  # a row past the tokenizer: the head must normalise over config rows
    return batch


def _sdpg_step_run(model_dir: str, cpu: bool, vocab: int) -> dict:
    """Two SDPG steps on this process's device, under the trainer's own process-group setup
    (``initialize_distributed``: NCCL on a GPU, gloo on CPU) with world size 1."""
    import torch

    from sdpg_mcore import algo
    from sdpg_mcore.audit.synthetic import synthetic_step_context
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.train.model_setup import build_policy
    from sdpg_mcore.train.step import run_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env = state.initialize_distributed(timeout_minutes=2)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    progress(f"process group up ({dist_backend()}, world {env.world_size})")
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.1, use_distributed_optimizer=True)
    policy = build_policy(  # the 70B recipe's communication settings, the trainer's default chunk
        model_dir, layout, dtype=torch.bfloat16, optim=optim, total_updates=10, chunk_size=1024,
        overlap_grad_reduce=True, overlap_param_gather=True, gradient_accumulation_fusion=True,
    )  # fmt: skip
    progress(f"policy built on {policy.device}")
    ctx = synthetic_step_context(  # the trainer's rule: the reference weights through pinned host memory
        policy, layout, algo.SDPGConfig(), reference_dir=model_dir, token_budget=2048 if cpu else 8192,
        mini_batch_groups=2, total_steps=10,
    )  # fmt: skip
    _sync(cpu)
    progress("reference weights in pinned host memory")
    lengths = (16, 8, 24) if cpu else (128, 64, 512)
    batch = _step_responses(vocab, lengths)
    out = {"device": str(policy.device), "head_causal_mask": policy.head.causal_mask, "steps": []}
    for step in (1, 2):
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        progress(f"step {step}: start ({len(batch)} responses of {sum(lengths)} tokens)")
        metrics = run_step(ctx, step, batch)
        policy.finish_param_sync()  # as the trainer's weight-sync phase does
        _sync(cpu)
        keep = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        keep["wall_s"] = time.perf_counter() - began
        if not cpu:
            keep["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        progress(f"step {step}: done in {keep['wall_s']:.1f}s, loss {keep.get('loss', float('nan')):.4f}")
        out["steps"].append(keep)
    state.destroy(process_group=True)
    return out


def dist_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())


def _sync(cpu: bool) -> None:
    if not cpu:
        import torch

        torch.cuda.synchronize()


def stage_sdpg_step(cpu: bool) -> dict:
    import math

    import torch

    from sdpg_mcore.models.tiny import save_tiny_hf_model

    # Qwen3-4B's attention and vocabulary (GQA 32/8 heads of 128, qk-norm, tied 151,936 rows), 2 layers.
    shape = (
        dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=192, max_position_embeddings=4096)
        if cpu
        else dict(hidden_size=2560, num_hidden_layers=2, vocab_size=151936, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, intermediate_size=9728, max_position_embeddings=4096)
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        progress("drawing and saving the random checkpoint")
        dtype = torch.float32 if cpu else torch.bfloat16  # halves the 1.2 GB checkpoint write at GPU shape
        model_dir = str(
            save_tiny_hf_model(
                Path(tmp) / "m", "qwen3", dtype=dtype, device=_device(cpu), tie_word_embeddings=True, **shape
            )
        )
        if not cpu:
            torch.cuda.empty_cache()
        progress("checkpoint saved")
        result = _sdpg_step_run(model_dir, cpu, shape["vocab_size"])
    finite = all(math.isfinite(v) for s in result["steps"] for v in s.values())
    return result | {"shape": shape, "ok": finite and len(result["steps"]) == 2}


def stage_parity(cpu: bool) -> dict:
    from sdpg_mcore.models.spec import te_available
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    out = {"spec": "transformer_engine" if te_available() else "local"}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen3"):
            model_dir = save_tiny_hf_model(Path(tmp) / arch, arch)
            report = Path(tmp) / f"{arch}.json"
            proc = subprocess.run(
                [sys.executable, str(REPO / "tools/check_parity.py"), "--hf", str(model_dir), "--json", str(report),
                 "--tol", "1e-3"],
                capture_output=True, text=True, timeout=stage_limit("parity", cpu) / 2 - 2,
            )  # fmt: skip
            out[arch] = json.loads(report.read_text()) if report.exists() else {"error": proc.stderr[-2000:]}
            out[arch]["returncode"] = proc.returncode
            progress(f"parity: {arch} rc={proc.returncode}")
    out["ok"] = all(out[a].get("returncode") == 0 for a in ("llama", "qwen3"))
    return out


KL_SWEEP = "147,441,1024,2048"
"""Fused-head chunk sizes ``bench_kl`` also measures on the GPU at the Qwen3 shape (tokens; 147 = the
256 MiB default at Qwen3's vocabulary, 1024 = ``trainer.logprob_chunk_size``'s default);
``best_chunk`` is the fastest that keeps the peak at least 10x below the materialising reference's."""


def stage_bench_kl(cpu: bool) -> dict:
    """``tools/bench_kl.py``: the Triton head beside the torch head and the materialising reference,
    each with its ``torch.profiler`` kernel table and the GEMMs alone at the aligned and the old
    unaligned block width, at the Qwen3-4B shape (with a chunk sweep) and one Llama-3.3-70B TP8
    shard; with ``--cpu`` the tiny shape, Triton under its interpreter."""
    runs = [["--shape", "tiny", "--device", "cpu", "--chunk-sizes", "4,16"]] if cpu else [
        ["--shape", "qwen3-4b", "--chunk-sizes", KL_SWEEP], ["--shape", "llama70b-tp8"],
    ]  # fmt: skip
    env = os.environ | ({"TRITON_INTERPRET": "1"} if cpu else {})
    deadline = time.perf_counter() + stage_limit("bench_kl", cpu) - 10
    out: dict = {"ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        for args in runs:
            report = Path(tmp) / "kl.json"
            proc = subprocess.run(
                [sys.executable, str(REPO / "tools/bench_kl.py"), *args, "--backends", "triton,torch",
                 "--profile", "--json", str(report)],
                capture_output=True, text=True, timeout=max(1.0, deadline - time.perf_counter()), env=env,
            )  # fmt: skip
            if not report.exists():
                return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
            out[args[1]] = json.loads(report.read_text()) | {"table": proc.stdout[-3000:]}
            out["ok"] = out["ok"] and proc.returncode == 0
            progress(f"bench_kl: {args[1]} done (rc {proc.returncode})")
            report.unlink()
    return out


# ------------------------------------------------------------------------------------------ driver
def run_stage(name: str, cpu: bool) -> int:
    """Child process: run one stage, print its JSON as the last stdout line."""
    progress(f"{name}: start")
    result = globals()[f"stage_{name}"](cpu)
    progress(f"{name}: done")
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")
    return 0


def _spawn_stage(name: str, cpu: bool, limit_s: float, log) -> dict:
    """Run one stage in its own process group; its stderr (the progress lines) goes straight into
    the log as it happens, so a kill of the whole check still leaves where each stage stopped.

    On a timeout the whole group is killed (a stage's own children, e.g. a parity subprocess, must
    not keep the GPU busy under the next stage) and the stage's last log lines join its result.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (["--cpu"] if cpu else [])
    log.write(f"===== {name} (limit {limit_s:.0f}s)\n")
    log.flush()
    start_offset = log.tell()
    began = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        log.flush()
        tail = _log_tail(log.name, start_offset)
        log.write(f"\n===== {name}: TIMEOUT after {limit_s:.0f}s\n{stdout or ''}\n")
        log.flush()
        return {
            "ok": False,
            "error": f"timeout after {limit_s:.0f}s; last progress: {tail}",
            "wall_s": time.perf_counter() - began,
        }
    log.write(f"\n----- {name} stdout (rc {proc.returncode})\n{stdout}\n")
    log.flush()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        error = stdout[-1500:] + "\n" + _log_tail(log.name, start_offset, lines=40)
        return {"ok": False, "error": error[-3000:], "wall_s": time.perf_counter() - began}
    result = json.loads(lines[-1])
    result.setdefault("ok", True)
    result["wall_s"] = time.perf_counter() - began
    return result


def _log_tail(path: str, offset: int, lines: int = 8) -> str:
    """The last progress lines (``[..Z +..s]``) a stage wrote, else its last lines of any kind."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read().splitlines()
    marked = [line for line in text if line.startswith("[") and "Z +" in line[:24]]
    return " | ".join((marked or text)[-lines:])[-2500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on CPU (plumbing test)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=sorted(STAGES), help="run only these stages")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="whole check (s)")
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, args.cpu)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_path = (out_dir or Path(tempfile.gettempdir())) / "gpu_check.log"
    began = time.perf_counter()
    summary: dict = {"mode": "cpu" if args.cpu else "gpu", "stages": {}}
    log_path.write_text("")
    with open(log_path, "a") as log:  # append: the stages' own stderr writes share this file
        for name in STAGES:
            if args.only and name not in args.only:
                continue
            left = args.budget_s - (time.perf_counter() - began)
            if left < 20:
                summary["stages"][name] = {"ok": False, "error": "skipped: out of time"}
                continue
            limit = stage_limit(name, args.cpu)
            summary["stages"][name] = _spawn_stage(name, args.cpu, min(limit, left - 5), log)
            stage = summary["stages"][name]
            progress(f"[gpu_check] {name}: ok={stage.get('ok')} in {stage.get('wall_s', 0):.0f}s")
            if out_dir is not None:  # partial results survive a kill of the whole check
                (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["ok"] = all(s.get("ok") for s in summary["stages"].values())
    summary["wall_s"] = time.perf_counter() - began
    if out_dir is not None:
        (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    sys.stdout.write(json.dumps(_compact(summary), default=str) + "\n")
    return 0 if summary["ok"] else 1


def _compact(summary: dict) -> dict:
    """The summary line: long texts (tables, tracebacks) cut to their last 400 characters."""
    stages = {
        name: {
            k: (v[-400:] if isinstance(v, str) and len(v) > 400 else v)
            for k, v in stage.items()
            if k != "table"
        }
        for name, stage in summary["stages"].items()
    }
    return summary | {"stages": stages}


if __name__ == "__main__":
    sys.exit(main())
