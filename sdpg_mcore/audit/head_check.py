"""The fused KL head against fp64, with a fixed tolerance that a wrong head cannot pass.

``check_head_fp64`` runs any head (a callable with ``fused_kl_head``'s positional arguments) on bf16
inputs and compares KL, log-prob and entropy with an fp64 reference computed chunk by chunk from
the same bf16 values. The tolerance is fixed per shape before anything runs
(``HEAD_TOL_GPU`` / ``HEAD_TOL_CPU``), never widened by what the head itself measures; so a head
that rounds its logits to bf16 (``bf16_logit_head``, error ~2**-9 |z|, ~1e-2 here) fails, and the
GPU check runs that control beside the real heads (``head_fp64_report``). The logit-GEMM error,
the fp32 softmax reduction's error and the first-order bound they imply are reported too, to
explain the margin, but decide nothing.

``kernel_table`` profiles one call and lists its GPU kernels (``torch.profiler``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

HEAD_TOL_CPU = 1e-5
"""H = 64: every bf16 x bf16 product is exact in fp32 and an fp32 sum of 64 of them errs ~1e-6
relative; fp32 softmax sums over 4,096 rows err ~1e-6."""
HEAD_TOL_GPU = 1e-4
"""H = 2,560 on tensor cores: fp32 accumulation with truncating alignment errs up to
(H / 16) * 2**-24 |z| ~ 1e-5 |z| per logit (|z| <= ~12 here), so log-prob (2 x the logit error)
may reach ~2e-4 in the worst case; the one H200 run measured 4.1e-5 (README), a bf16-rounded logit
1.5e-2. 1e-4 passes the fp32 GEMM with a margin and fails bf16 logits by 100x."""

Head = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fused_head(backend: str) -> Head:
    """``ops.fused_kl_head`` with one backend, in this module's calling convention."""
    from sdpg_mcore.ops import fused_kl_head

    def head(student, teacher, weight, targets, vocab_size, **kwargs):
        return fused_kl_head(
            student, teacher, weight, targets, vocab_size=vocab_size, backend=backend, **kwargs
        )

    return head


def head_inputs(n: int, h: int, v: int, device: str, seed: int = 0):
    """bf16 student/teacher hidden states, weight (logits ~ N(0, 4)) and targets."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(n, h, device=device, generator=g)
    teacher = student + 0.5 * torch.randn(n, h, device=device, generator=g)
    weight = torch.randn(v, h, device=device, generator=g) * (2.0 / h**0.5)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    return student.bfloat16(), teacher.bfloat16(), weight.bfloat16(), targets


def fp64_reference(student, teacher, weight, targets, chunk: int):
    """KL(s||t), log p_s(target), H(p_s) in fp64 from the same bf16 inputs, ``chunk`` tokens at a time,
    and each token's first-order sensitivity of KL and entropy to logit errors (``derived_bounds``)."""
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


def bf16_logit_head(student, teacher, weight, targets, vocab_size: int, chunk: int = 256):
    """A deliberately wrong head, the check's negative control: fp32 softmax statistics of logits
    rounded to bf16 (what a bf16-output GEMM hands over)."""
    outs = ([], [], [])
    for i in range(0, student.shape[0], chunk):
        z_s = (student[i : i + chunk] @ weight[:vocab_size].t()).bfloat16().float()
        z_t = (teacher[i : i + chunk] @ weight[:vocab_size].t()).bfloat16().float()
        log_s, log_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
        outs[0].append((log_s.exp() * (log_s - log_t)).sum(-1))
        outs[1].append(log_s.gather(1, targets[i : i + chunk, None])[:, 0])
        outs[2].append(-(log_s.exp() * log_s).sum(-1))
    return tuple(torch.cat(o) for o in outs)


def check_head_fp64(head: Head, inputs, reference, vocab_size: int, tol: float) -> dict:
    """Run ``head`` on ``inputs`` and compare with ``reference`` (``fp64_reference``): ok when
    every KL, log-prob and entropy is within ``tol`` absolute."""
    student, teacher, weight, targets = inputs
    began = time.perf_counter()
    with torch.no_grad():
        got = head(student, teacher, weight, targets, vocab_size)
    if student.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    errors = {
        name: float((g.double() - w).abs().max())
        for name, g, w in zip(("kl", "logprob", "entropy"), got, reference[:3])
    }
    return {
        "max_abs_err": errors,
        "tol": tol,
        "ok": all(e <= tol for e in errors.values()),
        "dtypes": [str(g.dtype) for g in got],
        "seconds": seconds,
    }


GRAD_TOL = 1e-5
"""Gradients of fp32 inputs at H = 64 against fp64, relative to their largest entry."""


def check_head_grads(head: Head, device: str, n: int = 64, h: int = 64, v: int = 4096) -> dict:
    """Gradients of ``student_hidden`` and ``weight`` from fp32 inputs against a materialised fp64
    autograd reference (temperatures 0.7 / 1.3, random upstream gradients on all three outputs):
    ok when both are within ``GRAD_TOL`` of fp64 relative to their largest entry."""
    g = torch.Generator(device=device).manual_seed(1)
    student = torch.randn(n, h, device=device, generator=g, dtype=torch.float64) * 0.3
    teacher = student + 0.1 * torch.randn(n, h, device=device, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, device=device, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    upstream = torch.randn(3, n, device=device, generator=g, dtype=torch.float64)
    s32, w32 = (x.float().requires_grad_() for x in (student, weight))
    got = head(s32, teacher.float(), w32, targets, v, temperature=0.7, teacher_temperature=1.3)
    torch.autograd.backward([o.double() for o in got], list(upstream))
    s64, w64 = (x.requires_grad_() for x in (student, weight))
    log_s = torch.log_softmax(s64 @ w64.t() / 0.7, -1)
    log_t = torch.log_softmax(teacher @ w64.detach().t() / 1.3, -1)
    want = (
        (log_s.exp() * (log_s - log_t)).sum(-1),
        log_s.gather(1, targets[:, None])[:, 0],
        -(log_s.exp() * log_s).sum(-1),
    )
    torch.autograd.backward(list(want), list(upstream))
    errors = {
        name: float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max())
        for name, a, b in (("student_hidden", s32, s64), ("weight", w32, w64))
    }
    return {"max_rel_err": errors, "tol": GRAD_TOL, "ok": all(e <= GRAD_TOL for e in errors.values())}


def kernel_table(fn: Callable[[], object], rows: int = 15) -> dict:
    """One call of ``fn`` under ``torch.profiler``: the ``rows`` costliest GPU kernels (on CPU: ops)
    by self time (name, calls, total microseconds) and the profiler's own text table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted(kernels, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "kernels": [{"name": e.key, "calls": e.count, "total_us": getattr(e, key)} for e in kernels],
        "table": events.table(sort_by=key, row_limit=rows),
    }


def head_fp64_report(heads: dict[str, Head], n: int, h: int, v: int, device: str, tol: float) -> dict:
    """Every head in ``heads`` and the bf16-logit control against fp64 on one input, and each head's
    gradients from fp32 inputs (``check_head_grads``): ok when all heads pass and the control fails
    (the check can fail); plus the diagnostics that explain the margin (``logit_diagnostics``)."""
    inputs = head_inputs(n, h, v, device)
    reference = fp64_reference(*inputs, chunk=256)
    results = {name: check_head_fp64(head, inputs, reference, v, tol) for name, head in heads.items()}
    for name, head in heads.items():
        results[name]["grads"] = check_head_grads(head, device)
        results[name]["ok"] = results[name]["ok"] and results[name]["grads"]["ok"]
    control = check_head_fp64(bf16_logit_head, inputs, reference, v, tol)
    gemms = gemm_capabilities(torch.device(device))
    return {
        "shape": {"tokens": n, "hidden": h, "vocab": v},
        "tol": tol,
        "heads": results,
        "control_bf16_logits": control,
        "diagnostics": logit_diagnostics(inputs, reference, v, rows=min(n, 256)),
        "gemm_capabilities": gemms,
        "kl_mean": float(reference[0].mean()),
        "ok": all(r["ok"] for r in results.values()) and not control["ok"] and gemms["ok"],
    }


def gemm_capabilities(device: torch.device) -> dict:
    """What the head assumes of this torch build's mixed-precision GEMMs on ``device``
    (``kl_head_math.fp32_output_gemm_on`` / ``fp32_accumulating_gemm_on``) against what the ops
    do on small operands: ok when every assumption holds (an op assumed absent may exist)."""
    from sdpg_mcore.ops.kl_head_math import fp32_accumulating_gemm_on, fp32_output_gemm_on

    a = torch.randn(8, 16, device=device).bfloat16()
    b = torch.randn(16, 8, device=device).bfloat16()
    want = a.double() @ b.double()

    def accumulate():
        ones = torch.ones(8, 8, device=device)
        return torch.addmm(ones, a, b, out_dtype=torch.float32, out=ones) - 1

    found = {}
    for name, op in (
        ("mm_fp32_out", lambda: torch.mm(a, b, out_dtype=torch.float32)),
        ("addmm_fp32_accumulator", accumulate),
    ):
        try:  # a probe: an error here is an answer, not a failure
            found[name] = bool((op().double() - want).abs().max() < 1e-4)
        except (RuntimeError, NotImplementedError) as err:
            found[name] = f"no: {str(err).splitlines()[0][:200]}"
    assumed = {
        "mm_fp32_out": fp32_output_gemm_on(device),
        "addmm_fp32_accumulator": fp32_accumulating_gemm_on(device),
    }
    ok = all(found[name] is True for name, yes in assumed.items() if yes)
    return {"assumed": assumed, "found": found, "ok": ok}


# ------------------------------------------------------------------------ diagnostics (no verdict)
def logit_diagnostics(inputs, reference, vocab_size: int, rows: int) -> dict:
    """Where the head's error comes from: the logit GEMM (the head's own blocks and a probe with
    ``allow_bf16_reduced_precision_reduction`` both ways on CUDA), the fp32 softmax reduction on
    exact logits, and the first-order bounds they imply (``derived_bounds``)."""
    student, teacher, weight, targets = inputs
    logits = {
        "student": _logit_errors(student[:rows], weight),
        "teacher": _logit_errors(teacher[:rows], weight),
    }
    logits["head_blocks_max_abs"] = head_gemm_error(student, teacher, weight, targets, vocab_size)
    delta = max(
        logits["head_blocks_max_abs"],
        *(p["fp32_gemm"]["max_abs"] for p in logits.values() if isinstance(p, dict)),
    )
    reduction = reduction_error(student, weight, targets, rows)
    _, _, _, kl_sens, ent_sens = reference
    h = student.shape[1]
    return {
        "logits": logits,
        "logit_delta": delta,
        "softmax_reduction_err": reduction,
        "derived_bound": derived_bounds(delta, kl_sens, ent_sens, reduction),
        "dominant": "logit GEMM" if 2 * delta > reduction else "fp32 softmax reduction",
        "arithmetic": (
            f"fp32 accumulation of H={h} bf16 products: round-to-nearest ~ sqrt(H)*2^-24*|z| = "
            f"{h**0.5 * 2**-24:.1e}*|z|; truncating alignment (tensor cores) up to (H/16)*2^-24*|z| = "
            f"{h / 16 * 2**-24:.1e}*|z|, |z| <= {logits['student']['max_abs_logit']:.1f} here"
        ),
    }


def _error_stats(z: torch.Tensor, want: torch.Tensor) -> dict:
    """``max_abs``/``rms`` of ``z - want``; ``bias_toward_zero`` (mean of ``-dz sign(z)`` over the rms:
    ~0 for round-to-nearest, positive when accumulation truncates); ``per_abs_logit`` (largest
    ``|dz| / |z|`` where ``|z| > 1``: the truncation signature)."""
    err = z.double() - want
    big = want.abs() > 1
    rms = err.pow(2).mean().sqrt()
    return {
        "max_abs": float(err.abs().max()),
        "rms": float(rms),
        "bias_toward_zero": float(-(err * want.sign()).mean() / rms.clamp_min(1e-30)),
        "per_abs_logit": float((err.abs()[big] / want.abs()[big]).max()) if bool(big.any()) else 0.0,
    }


def _logit_errors(hidden, weight) -> dict:
    """The fp32-output GEMM of ``hidden`` x every weight row against fp64 (CPU: operands up-cast)."""
    want = hidden.double() @ weight.double().t()
    out = {"max_abs_logit": float(want.abs().max())}
    if not hidden.is_cuda:
        return out | {"fp32_gemm": _error_stats(hidden.float() @ weight.float().t(), want)}
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    try:
        for allow in (True, False):
            matmul.allow_bf16_reduced_precision_reduction = allow
            key = "fp32_gemm" if allow == saved else f"fp32_gemm_reduced_precision_reduction_{allow}"
            out[key] = _error_stats(torch.mm(hidden, weight.t(), out_dtype=torch.float32), want)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved
    return out | {"bf16_gemm": _error_stats(hidden @ weight.t(), want)}


def head_gemm_error(student, teacher, weight, targets, vocab_size: int) -> float:
    """Largest error of every logit the head computes, against fp64: its own plan and its own GEMM
    call (``kl_head_math.raw_logits`` over ``[student; teacher]``, blocks of ``block_rows``)."""
    from sdpg_mcore.ops import kl_head_math as M

    plan = M.plan_chunks(
        student, teacher, weight, targets, vocab_size=vocab_size, temperature=1.0, teacher_temperature=1.0,
        chunk_size=None, tp_size=1, tp_rank=0,
    )  # fmt: skip
    worst = 0.0
    with torch.no_grad():
        for g0 in range(0, student.shape[0], plan.group_tokens):
            g1 = min(g0 + plan.group_tokens, student.shape[0])
            pair = [plan.as_matmul_operand(x[g0:g1]) for x in (student, teacher)]
            exact = torch.cat([student[g0:g1], teacher[g0:g1]]).double()
            workspace = M.Workspace(g1 - g0, plan.block_rows, plan, student.device, True, None)
            for v0 in plan.blocks():
                w_block = weight[v0 : plan.block_end(v0)]
                out, _ = workspace.views(g1 - g0, w_block.shape[0])
                z = M.raw_logits(M.stack_hidden(*pair), plan.as_matmul_operand(w_block), out)
                worst = max(worst, float((z.double() - exact @ w_block.double().t()).abs().max()))
    return worst


def derived_bounds(logit_delta: float, kl_sens, ent_sens, reduction_err: float) -> dict:
    """First-order bounds on the head's errors from a logit error ``logit_delta``: ``logprob =
    z_t - logsumexp(z)`` moves by ``dz_t - sum p dz`` (at most ``2 delta``), the entropy by
    ``sum p (log p + H) dz``, the KL by the student and teacher terms (``fp64_reference``); plus the
    fp32 softmax reduction's own error (``reduction_err``, measured on exact logits)."""
    return {
        "kl": logit_delta * float(kl_sens.max()) + reduction_err,
        "logprob": 2 * logit_delta + reduction_err,
        "entropy": logit_delta * float(ent_sens.max()) + reduction_err,
    }


def reduction_error(student, weight, targets, rows: int) -> float:
    """The fp32 log-softmax's own error: exact (fp64) logits rounded to fp32, reduced in fp32."""
    z64 = student[:rows].double() @ weight.double().t()
    lp32 = torch.log_softmax(z64.float(), -1).gather(1, targets[:rows, None])[:, 0]
    lp64 = torch.log_softmax(z64, -1).gather(1, targets[:rows, None])[:, 0]
    return float((lp32.double() - lp64).abs().max())
