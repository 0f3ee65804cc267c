"""The prepared GPU check (run through ``tools/gpu_check.sh``): one machine, one GPU, under 8 minutes.

Stages, each in its own subprocess with its own time limit (a CUDA error poisons a process; one
stage failing must not lose the others' results):

- ``env``: torch / CUDA / megatron-core versions, whether Transformer Engine imports (then the TE
  layer spec is used everywhere; without it the local spec — reported, not hidden).
- ``head_fp64``: the fused head at bf16 on a Qwen3-sized vocabulary (151,936 rows) against an fp64
  reference computed chunk by chunk from the same bf16 inputs: KL, log-prob and entropy must agree
  to 1e-5 absolute (fp32 accumulation; a bf16-rounded logit would miss by ~1e-2).
- ``sdpg_step``: two full SDPG steps (old/ref log-probs, teacher pass, fused head, loss, backward,
  optimizer) of a Qwen3-shaped random model at bf16, the reference weights swapped through pinned
  memory; some sampled ids lie past the tokenizer (``len(tokenizer) < config.vocab_size``).
- ``parity``: Megatron vs ``transformers`` fp32 logits on tiny Llama and Qwen3 models.
- ``bench_kl``: ``tools/bench_kl.py --shape qwen3-4b`` (fused head vs the materialising reference).

Prints one JSON summary line last; with ``$OUT`` set also writes ``$OUT/gpu_check.json`` and
``$OUT/gpu_check.log``. ``--cpu``: the same plumbing on CPU with small shapes (tested in CI-less
runs here before the GPU run).

    tools/gpu_check.sh            # on the GPU machine
    tools/gpu_check.sh --cpu      # here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOTAL_BUDGET_S = 460.0
"""Whole check, start-up included (the shell wrapper kills at 470 s; the issue asks for < 8 min)."""
STAGES = {  # name -> own time limit (s); run in this order, most informative first
    "env": 60,
    "head_fp64": 90,
    "sdpg_step": 150,
    "parity": 120,
    "bench_kl": 150,
}
HEAD_TOL = 1e-5


def _device(cpu: bool) -> str:
    return "cpu" if cpu else "cuda"


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
    """KL(s||t), log p_s(target), H(p_s) in fp64 from the same bf16 inputs, ``chunk`` tokens at a time."""
    import torch

    w = weight.double()
    outs = ([], [], [])
    for i in range(0, student.shape[0], chunk):
        log_s = torch.log_softmax(student[i : i + chunk].double() @ w.t(), dim=-1)
        log_t = torch.log_softmax(teacher[i : i + chunk].double() @ w.t(), dim=-1)
        p_s = log_s.exp()
        outs[0].append((p_s * (log_s - log_t)).sum(-1))
        outs[1].append(log_s.gather(1, targets[i : i + chunk, None])[:, 0])
        outs[2].append(-(p_s * log_s).sum(-1))
    return [torch.cat(o) for o in outs]


def stage_head_fp64(cpu: bool) -> dict:
    import torch

    from sdpg_mcore.ops import fused_kl_head

    n, h, v = (64, 64, 4096) if cpu else (2048, 2560, 151936)
    device = _device(cpu)
    student, teacher, weight, targets = _head_inputs(n, h, v, device)
    began = time.perf_counter()
    with torch.no_grad():
        got = fused_kl_head(student, teacher, weight, targets, vocab_size=v)
    if not cpu:
        torch.cuda.synchronize()
    head_s = time.perf_counter() - began
    want = _fp64_reference(student, teacher, weight, targets, chunk=64 if cpu else 256)
    with torch.no_grad():  # what a bf16-logit head would do: the error the fused head exists to avoid
        z = (student[:256] @ weight.t()).float()
        bf16_logprob = torch.log_softmax(z, -1).gather(1, targets[:256, None])[:, 0]
    errors = {
        name: float((g.double() - w).abs().max())
        for name, g, w in zip(("kl", "logprob", "entropy"), got, want)
    }
    return {
        "shape": {"tokens": n, "hidden": h, "vocab": v},
        "dtypes": [str(g.dtype) for g in got],
        "max_abs_err": errors,
        "tol": HEAD_TOL,
        "ok": all(e <= HEAD_TOL for e in errors.values()),
        "bf16_logits_logprob_err": float((bf16_logprob.double() - want[1][:256]).abs().max()),
        "kl_mean": float(want[0].mean()),
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


def _sdpg_step_rank(rank, world_size, model_dir: str, cpu: bool, vocab: int) -> dict:
    import torch

    from sdpg_mcore import algo
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import ReferenceWeights, build_policy
    from sdpg_mcore.train.step import StepContext, run_step

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.1, use_distributed_optimizer=True)
    policy = build_policy(  # with the 70B recipe's communication settings
        model_dir, layout, dtype=torch.bfloat16, optim=optim, total_updates=10, chunk_size=256,
        overlap_grad_reduce=True, overlap_param_gather=True, gradient_accumulation_fusion=True,
    )  # fmt: skip
    algorithm = algo.get_algorithm("sdpg")
    ctx = StepContext(
        policy=policy,
        reference=ReferenceWeights(policy, "cpu_swap", model_dir, layout, torch.bfloat16),
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
    batch = _step_responses(vocab, vocab - 300, prompts=4, n=4 if cpu else 8, lengths=lengths)
    out = {"device": str(policy.device), "head_causal_mask": policy.head.causal_mask, "steps": []}
    for step in (1, 2):
        if not cpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        metrics = run_step(ctx, step, batch)
        if not cpu:
            torch.cuda.synchronize()
        keep = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        keep["wall_s"] = time.perf_counter() - began
        if not cpu:
            keep["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["steps"].append(keep)
    state.destroy()
    return out


def stage_sdpg_step(cpu: bool) -> dict:
    import math

    import torch

    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.parallel.spawn import spawn_ranks

    # Qwen3-4B's attention and vocabulary (GQA 32/8 heads of 128, qk-norm, tied 151,936 rows), 2 layers.
    shape = (
        dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=192, max_position_embeddings=4096)
        if cpu
        else dict(hidden_size=2560, num_hidden_layers=2, vocab_size=151936, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, intermediate_size=9728, max_position_embeddings=4096)
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dtype = torch.float32 if cpu else torch.bfloat16  # halves the 1.6 GB checkpoint write at GPU shape
        model_dir = str(
            save_tiny_hf_model(Path(tmp) / "m", "qwen3", dtype=dtype, tie_word_embeddings=True, **shape)
        )
        result = spawn_ranks(_sdpg_step_rank, 1, args=(model_dir, cpu, shape["vocab_size"]), timeout_s=600)[0]
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
                capture_output=True, text=True, timeout=100,
            )  # fmt: skip
            out[arch] = json.loads(report.read_text()) if report.exists() else {"error": proc.stderr[-2000:]}
            out[arch]["returncode"] = proc.returncode
    out["ok"] = all(out[a].get("returncode") == 0 for a in ("llama", "qwen3"))
    return out


def stage_bench_kl(cpu: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "kl.json"
        shape = ["--shape", "tiny", "--device", "cpu"] if cpu else ["--shape", "qwen3-4b"]
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools/bench_kl.py"), *shape, "--json", str(report)],
            capture_output=True, text=True, timeout=140,
        )  # fmt: skip
        if not report.exists():
            return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
        return json.loads(report.read_text()) | {"ok": proc.returncode == 0, "table": proc.stdout[-3000:]}


# ------------------------------------------------------------------------------------------ driver
def run_stage(name: str, cpu: bool) -> int:
    """Child process: run one stage, print its JSON as the last stdout line."""
    result = globals()[f"stage_{name}"](cpu)
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")
    return 0


def _spawn_stage(name: str, cpu: bool, limit_s: float, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name] + (["--cpu"] if cpu else [])
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=REPO)
    except subprocess.TimeoutExpired as err:
        text = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
        log.write(f"===== {name}: TIMEOUT after {limit_s:.0f}s\n{text}\n")
        return {"ok": False, "error": f"timeout after {limit_s:.0f}s", "wall_s": time.perf_counter() - began}
    log.write(f"===== {name} (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "ok": False,
            "error": proc.stderr[-3000:] or proc.stdout[-3000:],
            "wall_s": time.perf_counter() - began,
        }
    result = json.loads(lines[-1])
    result.setdefault("ok", True)
    result["wall_s"] = time.perf_counter() - began
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on CPU (plumbing test)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=sorted(STAGES), help="run only these stages")
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, args.cpu)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_path = (out_dir or Path(tempfile.gettempdir())) / "gpu_check.log"
    began = time.perf_counter()
    summary: dict = {"mode": "cpu" if args.cpu else "gpu", "stages": {}}
    with open(log_path, "w") as log:
        for name, limit in STAGES.items():
            if args.only and name not in args.only:
                continue
            left = TOTAL_BUDGET_S - (time.perf_counter() - began)
            if left < 20:
                summary["stages"][name] = {"ok": False, "error": "skipped: out of time"}
                continue
            summary["stages"][name] = _spawn_stage(name, args.cpu, min(limit, left - 5), log)
            sys.stderr.write(f"[gpu_check] {name}: ok={summary['stages'][name].get('ok')}\n")
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
