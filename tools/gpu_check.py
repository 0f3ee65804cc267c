"""The prepared GPU check (run through ``tools/gpu_check.sh``): one machine, one GPU, under 330 s.

Stages, each in its own subprocess with its own time limit (a CUDA error poisons a process; one
stage failing must not lose the others' results):

- ``env``: torch / CUDA / megatron-core versions, whether Transformer Engine imports (then the TE
  layer spec is used everywhere; without it the local spec — reported, not hidden).
- ``head_fp64``: the fused head at bf16 on a Qwen3-sized vocabulary (151,936 rows) against an fp64
  reference computed chunk by chunk from the same bf16 inputs: KL, log-prob and entropy within
  1e-5 absolute, or within the first-order bound the GEMM's own logit error implies (reported:
  the logits alone vs fp64, with ``allow_bf16_reduced_precision_reduction`` both ways, and the
  fp32 softmax reduction's error on exact logits; a bf16-rounded logit would miss by ~1e-2).
- ``parity``: Megatron vs ``transformers`` fp32 logits on tiny Llama and Qwen3 models.
- ``bench_kl``: ``tools/bench_kl.py --shape qwen3-4b`` (fused head vs the materialising reference),
  with a chunk-size sweep (``KL_SWEEP``; ``best_chunk``) and the GEMMs alone (``gemm_probe``).
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
sys.path.insert(0, str(REPO))

TOTAL_BUDGET_S = 310.0
"""Whole check by default (``--budget-s``; the shell wrapper passes what is left of its 320 s after
installing the wheel, and kills at that plus 5 s): the GPU run has 330 s in all."""
STAGES = {  # name -> own time limit (s); run in this order: the quick, informative ones first and
    # the SDPG step last, so a stall there cannot starve the others
    "env": 45,
    "head_fp64": 60,
    "parity": 90,
    "bench_kl": 90,
    "sdpg_step": 150,
}
HEAD_TOL = 1e-5
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


def _head_inputs(n: int, h: int, v: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(n, h, device=device, generator=g)
    teacher = student + 0.5 * torch.randn(n, h, device=device, generator=g)
    weight = torch.randn(v, h, device=device, generator=g) * (2.0 / h**0.5)  # logits ~ N(0, 4)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    return student.bfloat16(), teacher.bfloat16(), weight.bfloat16(), targets


def _fp64_reference(student, teacher, weight, targets, chunk: int):
    """KL(s||t), log p_s(target), H(p_s) in fp64 from the same bf16 inputs, ``chunk`` tokens at a time,
    and each token's first-order sensitivity of KL and entropy to logit errors (``_head_bounds``)."""
    import torch

    w = weight.double()
    outs = ([], [], [], [], [])
    for i in range(0, student.shape[0], chunk):
        log_s = torch.log_softmax(student[i : i + chunk].double() @ w.t(), dim=-1)
        log_t = torch.log_softmax(teacher[i : i + chunk].double() @ w.t(), dim=-1)
        p_s, p_t = log_s.exp(), log_t.exp()
        kl = (p_s * (log_s - log_t)).sum(-1)
        entropy = -(p_s * log_s).sum(-1)
        outs[0].append(kl)
        outs[1].append(log_s.gather(1, targets[i : i + chunk, None])[:, 0])
        outs[2].append(entropy)
        # |dKL| <= delta * (sum p_s |log p_s - log p_t - KL| + sum |p_s - p_t|); |dH| <= delta * sum p_s |log p_s + H|
        outs[3].append((p_s * (log_s - log_t - kl[:, None]).abs()).sum(-1) + (p_s - p_t).abs().sum(-1))
        outs[4].append((p_s * (log_s + entropy[:, None]).abs()).sum(-1))
    return [torch.cat(o) for o in outs]


def _logit_errors(student, weight, rows: int, cpu: bool) -> dict:
    """The head's GEMM alone on ``rows`` tokens x every vocabulary row, against fp64.

    ``max_abs``/``rms``: the fp32-output GEMM's error; ``bias_toward_zero``: mean of ``-dz * sign(z)``
    over the rms (near 0 for round-to-nearest; positive when the accumulation truncates, which
    shrinks magnitudes); ``per_abs_logit``: the largest ``|dz| / |z|`` where ``|z| > 1`` (a relative,
    ``|z|``-proportional error is the truncation signature). On CUDA the GEMM runs with
    ``allow_bf16_reduced_precision_reduction`` both ways, and the bf16-output GEMM for scale.
    """
    import torch

    s, w = student[:rows], weight
    want = s.double() @ w.double().t()

    def stats(z) -> dict:
        err = z.double() - want
        big = want.abs() > 1
        return {
            "max_abs": float(err.abs().max()),
            "rms": float(err.pow(2).mean().sqrt()),
            "bias_toward_zero": float(
                -(err * want.sign()).mean() / err.pow(2).mean().sqrt().clamp_min(1e-30)
            ),
            "per_abs_logit": float((err.abs()[big] / want.abs()[big]).max()) if bool(big.any()) else 0.0,
        }

    if cpu:
        return {"fp32_gemm": stats(s.float() @ w.float().t()), "max_abs_logit": float(want.abs().max())}
    out = {"max_abs_logit": float(want.abs().max())}
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    try:
        for allow in (True, False):
            matmul.allow_bf16_reduced_precision_reduction = allow
            key = "fp32_gemm" if allow == saved else f"fp32_gemm_reduced_precision_reduction_{allow}"
            out[key] = stats(torch.mm(s, w.t(), out_dtype=torch.float32))
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved
    out["bf16_gemm"] = stats(s @ w.t())
    return out


def _head_gemm_error(student, teacher, weight, targets, vocab: int) -> float:
    """Largest error of every logit the head itself computes, against fp64: the head's own plan
    (blocks of ``block_rows`` vocabulary rows over all tokens, ``[student; teacher]`` stacked) and
    its own GEMM call (``kl_head_math._stacked_logits``), so kernel choice and split match the run."""
    import torch

    from sdpg_mcore.ops import kl_head_math as M

    plan = M.plan_chunks(
        student, teacher, weight, targets, vocab_size=vocab, temperature=1.0, teacher_temperature=1.0,
        chunk_size=None, tp_size=1, tp_rank=0,
    )  # fmt: skip
    worst = 0.0
    with torch.no_grad():
        for g0 in range(0, student.shape[0], plan.group_tokens):
            g1 = min(g0 + plan.group_tokens, student.shape[0])
            hidden = M.stack_hidden(
                plan.as_matmul_operand(student[g0:g1]), plan.as_matmul_operand(teacher[g0:g1])
            )
            exact = torch.cat([student[g0:g1], teacher[g0:g1]]).double()
            workspace = M.Workspace(g1 - g0, plan.block_rows, plan, student.device, True)
            for v0 in range(0, plan.real_rows, plan.block_rows):
                w_block = weight[v0 : min(v0 + plan.block_rows, plan.real_rows)]
                out, _ = workspace.views(g1 - g0, w_block.shape[0])
                z = M._stacked_logits(hidden, plan.as_matmul_operand(w_block), g1 - g0, plan, out)
                worst = max(worst, float((z.double() - exact @ w_block.double().t()).abs().max()))
    return worst


def _head_bounds(logit_delta: float, kl_sens, ent_sens, reduction_err: float) -> dict:
    """Derived first-order bounds on the head's errors from a logit error ``logit_delta``.

    ``logprob = z_t - logsumexp(z)`` moves by ``dz_t - sum p dz``: at most ``2 * delta``; the entropy
    by ``sum p (log p + H) dz`` and the KL by the student and teacher terms (``_fp64_reference``);
    plus the fp32 softmax reduction's own error (``reduction_err``, measured on exact logits).
    """
    return {
        "kl": logit_delta * float(kl_sens.max()) + reduction_err,
        "logprob": 2 * logit_delta + reduction_err,
        "entropy": logit_delta * float(ent_sens.max()) + reduction_err,
    }


def _reduction_error(student, weight, targets, rows: int) -> float:
    """The fp32 log-softmax's own error: exact (fp64) logits rounded to fp32, reduced in fp32."""
    import torch

    z64 = student[:rows].double() @ weight.double().t()
    lp32 = torch.log_softmax(z64.float(), -1).gather(1, targets[:rows, None])[:, 0]
    lp64 = torch.log_softmax(z64, -1).gather(1, targets[:rows, None])[:, 0]
    return float((lp32.double() - lp64).abs().max())


def stage_head_fp64(cpu: bool) -> dict:
    import torch

    from sdpg_mcore.ops import fused_kl_head

    n, h, v = (64, 64, 4096) if cpu else (2048, 2560, 151936)
    rows = 64 if cpu else 256
    device = _device(cpu)
    student, teacher, weight, targets = _head_inputs(n, h, v, device)
    began = time.perf_counter()
    with torch.no_grad():
        got = fused_kl_head(student, teacher, weight, targets, vocab_size=v)
    _sync(cpu)
    head_s = time.perf_counter() - began
    progress("head_fp64: fused head done; fp64 reference")
    kl, logprob, entropy, kl_sens, ent_sens = _fp64_reference(
        student, teacher, weight, targets, chunk=64 if cpu else 256
    )
    errors = {
        name: float((g.double() - w).abs().max())
        for name, g, w in zip(("kl", "logprob", "entropy"), got, (kl, logprob, entropy))
    }
    progress("head_fp64: logits alone")
    logits = {
        "student": _logit_errors(student, weight, rows, cpu),
        "teacher": _logit_errors(teacher, weight, rows, cpu),
    }
    logits["head_blocks_max_abs"] = _head_gemm_error(student, teacher, weight, targets, v)
    delta = max(
        [
            logits["head_blocks_max_abs"],
            *(part["fp32_gemm"]["max_abs"] for part in logits.values() if isinstance(part, dict)),
        ]
    )
    reduction = _reduction_error(student, weight, targets, rows)
    bounds = _head_bounds(delta, kl_sens, ent_sens, reduction)
    # Pass: within 1e-5, or within what the GEMM's own logit error implies to first order. The
    # bound is conservative: the largest error of all the head's logits taken for every logit.
    limits = {k: max(HEAD_TOL, b) for k, b in bounds.items()}
    return {
        "shape": {"tokens": n, "hidden": h, "vocab": v},
        "dtypes": [str(g.dtype) for g in got],
        "max_abs_err": errors,
        "tol": HEAD_TOL,
        "logits": logits,
        "logit_delta": delta,
        "softmax_reduction_err": reduction,
        "derived_bound": bounds,
        "limit": limits,
        "dominant": "logit GEMM" if 2 * delta > reduction else "fp32 softmax reduction",
        "arithmetic": (
            f"fp32 accumulation of H={h} bf16 products: round-to-nearest ~ sqrt(H)*2^-24*|z| = "
            f"{h**0.5 * 2**-24:.1e}*|z|; truncating alignment (tensor cores) up to (H/16)*2^-24*|z| = "
            f"{h / 16 * 2**-24:.1e}*|z|, |z| <= {logits['student']['max_abs_logit']:.1f} here"
        ),
        "ok": all(errors[k] <= limits[k] for k in errors),
        "kl_mean": float(kl.mean()),
        "head_forward_s": head_s,
    }


def _step_responses(vocab: int, tokenizer_len: int, prompts: int, n: int, lengths: tuple[int, int, int]):
    import torch

    from sdpg_mcore.train.batch import Response

    prompt_len, context_len, response_len = lengths
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(prompts * n):
        prompt = torch.randint(5, tokenizer_len, (prompt_len,), generator=g).tolist()
        context = torch.randint(5, tokenizer_len, (context_len,), generator=g).tolist()
        response = torch.randint(5, vocab, (response_len,), generator=g).tolist()
        response[-1] = vocab - 1  # a row past the tokenizer: the head must normalise over config rows
        out.append(
            Response(
                group=i // n,
                prompt_ids=prompt,
                teacher_prompt_ids=prompt + context,
                response_ids=response,
                rollout_logprobs=[-1.0] * response_len,
                reward=float(i % 3 == 0),
                acc=float(i % 3 == 0),
            )
        )
    return out


def _sdpg_step_run(model_dir: str, cpu: bool, vocab: int) -> dict:
    """Two SDPG steps on this process's device, under the trainer's own process-group setup
    (``initialize_distributed``: NCCL on a GPU, gloo on CPU) with world size 1."""
    import torch

    from sdpg_mcore import algo
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.train.model_setup import ReferenceWeights, build_policy
    from sdpg_mcore.train.step import StepContext, run_step

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
    algorithm = algo.get_algorithm("sdpg")
    reference = ReferenceWeights(policy, "cpu_swap", model_dir, layout, torch.bfloat16)
    _sync(cpu)
    progress("reference weights in pinned host memory")
    ctx = StepContext(
        policy=policy,
        reference=reference,
        algorithm=algorithm,
        loss_cfg=algorithm.config_cls(),
        layout=layout,
        temperature=1.0,
        token_budget=2048 if cpu else 8192,
        mini_batch_groups=2,
        total_steps=10,
        pad_id=0,
    )
    lengths = (16, 8, 24) if cpu else (128, 64, 512)
    batch = _step_responses(vocab, vocab - 300, prompts=4, n=4, lengths=lengths)
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


KL_SWEEP = "64,147,256,441,1024,2048"
"""Fused-head chunk sizes ``bench_kl`` also measures on the GPU (tokens; 147 = the 256 MiB default at
Qwen3's vocabulary, 1024 = ``trainer.logprob_chunk_size``'s default); ``best_chunk`` is the fastest
that keeps the peak at least 10x below the materialising reference's."""


def stage_bench_kl(cpu: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "kl.json"
        shape = (
            ["--shape", "tiny", "--device", "cpu", "--chunk-sizes", "4,16"]
            if cpu
            else ["--shape", "qwen3-4b"]
        )
        if not cpu:
            shape += ["--chunk-sizes", KL_SWEEP]
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools/bench_kl.py"), *shape, "--json", str(report)],
            capture_output=True, text=True, timeout=stage_limit("bench_kl", cpu) - 5,
        )  # fmt: skip
        if not report.exists():
            return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
        return json.loads(report.read_text()) | {"ok": proc.returncode == 0, "table": proc.stdout[-3000:]}


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
