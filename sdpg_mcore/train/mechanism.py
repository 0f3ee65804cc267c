"""Held-out probe of the self-distillation mechanism: is the teacher better, and is the student moving to it?

SDPG only helps if the teacher (the policy shown the answer) knows more than the student and the
reverse KL carries that knowledge into the student's own samples, including groups where every
sample is wrong and the policy gradient is zero. The step's metrics cannot show this (they mix the
training prompts and the update), so at evaluation steps this probe measures, on held-out prompts:

- ``student_acc`` / ``teacher_acc``: accuracy of ``k`` samples per prompt at the eval temperature,
  from the student prompt and from the teacher prompt (the same servers, the current weights);
- ``all_wrong_share``: the share of prompts whose ``k`` student samples are all wrong (with
  ``k = rollout.n`` the share of groups that give GRPO no signal);
- ``student_logp_ref`` / ``teacher_logp_ref``: log-probability (nats, summed over the response, at
  temperature 1) of the record's reference response ``extra_info.reference_response`` after the
  student prompt and after the teacher prompt (skipped when records have none);
- ``kl_correct`` / ``kl_incorrect``: the per-token reverse KL(student at the eval temperature ||
  teacher untempered) — the quantity SDPG's loss pulls down — averaged over the tokens of the
  correct and of the incorrect student samples.
- ``kl_grad_cos_student`` / ``kl_grad_cos_teacher``: cosine, over all parameters, between the
  gradient of that KL and the gradient of ``-log p(reference)`` after the student / teacher prompt:
  whether the distillation gradient points toward the correct answer (:func:`gradient_alignment`).

The model runs on rank 0 alone, with full-vocabulary logits (small eval batches), so the probe needs
TP = PP = CP = 1; it is an implementation independent of the fused head, not a copy of it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.train.forward import causal_mask
from sdpg_mcore.train.rollout_io import accuracy_at_k

#: Rows per probe forward: bounds the ``[rows, T, V]`` logits.
PROBE_ROWS = 64


@torch.no_grad()
def response_logprobs(
    model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], vocab_size: int, temperature: float
) -> list[torch.Tensor]:
    """Per ``(prompt_ids, response_ids)`` row: ``[len(response), vocab]`` fp32 ``log_softmax(z / T)`` at the
    positions that predict the response tokens."""
    return _response_logprobs(model, rows, vocab_size, temperature)


def _response_logprobs(model, rows, vocab_size: int, temperature: float) -> list[torch.Tensor]:
    """:func:`response_logprobs` with autograd (for :func:`gradient_alignment`)."""
    gpt = unwrap_model(model)
    device = next(gpt.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), PROBE_ROWS):
        chunk = rows[start : start + PROBE_ROWS]
        length = max(len(p) + len(r) for p, r in chunk)
        ids_BT = torch.zeros((len(chunk), length), dtype=torch.long)
        for b, (p, r) in enumerate(chunk):
            ids_BT[b, : len(p) + len(r)] = torch.tensor([*p, *r])
        ids_BT = ids_BT.to(device)
        positions_BT = torch.arange(length, device=device).expand(len(chunk), length)
        logits_BTV = gpt(ids_BT, positions_BT, causal_mask(length, device))[..., :vocab_size].float()
        for b, (p, r) in enumerate(chunk):
            z_RV = logits_BTV[b, len(p) - 1 : len(p) + len(r) - 1] / temperature
            out.append(torch.log_softmax(z_RV, dim=-1))
    return out


def reverse_kl(student_logp_RV: torch.Tensor, teacher_logp_RV: torch.Tensor) -> torch.Tensor:
    """``[R]`` per-token KL(student || teacher) = sum_v p_s (log p_s - log p_t)."""
    return (student_logp_RV.exp() * (student_logp_RV - teacher_logp_RV)).sum(-1)


def sampled_kl(model, prompts, groups, correct, vocab_size: int, temperature: float) -> dict[str, float]:
    """Token-mean reverse KL on the student's samples, split by correctness (NaN where there are none)."""
    samples = [(p, s, ok) for p, g, oks in zip(prompts, groups, correct) for s, ok in zip(g, oks)]
    samples = [x for x in samples if x[1].output_ids]
    student = response_logprobs(
        model, [(p.student_ids, s.output_ids) for p, s, _ in samples], vocab_size, temperature
    )
    teacher = response_logprobs(
        model, [(p.teacher_ids, s.output_ids) for p, s, _ in samples], vocab_size, 1.0
    )
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    for (_, _, ok), s_RV, t_RV in zip(samples, student, teacher):
        sums[bool(ok)] += float(reverse_kl(s_RV, t_RV).sum())
        counts[bool(ok)] += s_RV.shape[0]
    return {
        "kl_correct": sums[True] / counts[True] if counts[True] else math.nan,
        "kl_incorrect": sums[False] / counts[False] if counts[False] else math.nan,
    }


def reference_logprobs(model, prompts, tokenizer, vocab_size: int) -> dict[str, float]:
    """Mean over prompts of log p(reference response) after the student and after the teacher prompt."""
    refs = [p.extra_info.get("reference_response") for p in prompts]
    if not refs or any(not isinstance(r, str) for r in refs):
        return {}
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in refs]
    out = {}
    for key, side in (("student_logp_ref", "student_ids"), ("teacher_logp_ref", "teacher_ids")):
        logp = response_logprobs(
            model, [(getattr(p, side), r) for p, r in zip(prompts, ids)], vocab_size, 1.0
        )
        picked = [lp.gather(1, torch.tensor(r)[:, None]).sum() for lp, r in zip(logp, ids)]
        out[key] = float(torch.stack(picked).mean())
    return out


def gradient_alignment(model, prompts, groups, tokenizer, vocab_size: int, temperature: float) -> dict:
    """Does a step down the distillation KL move the student toward the correct answer, and the teacher?

    ``g_kl``: gradient of the token-mean KL(student || teacher, teacher detached, as in training) on
    one student sample per prompt; ``g_s`` / ``g_t``: gradients of the mean ``-log p(reference)``
    after the student / the teacher prompt. ``kl_grad_cos_student = cos(g_kl, g_s) > 0`` means a KL
    step raises the student's log-probability of the correct response; ``kl_grad_cos_teacher < 0``
    means it lowers the teacher's (the weights are shared). Gradients are taken with
    ``torch.autograd.grad`` and never reach the parameters' ``.grad`` or Megatron's grad buffers.
    """
    refs = [p.extra_info.get("reference_response") for p in prompts]
    if not refs or any(not isinstance(r, str) for r in refs):
        return {}
    params = [p for p in unwrap_model(model).parameters() if p.requires_grad]
    picked = [(p, g[0].output_ids) for p, g in zip(prompts, groups) if g and g[0].output_ids]
    student = _response_logprobs(model, [(p.student_ids, y) for p, y in picked], vocab_size, temperature)
    with torch.no_grad():
        teacher = _response_logprobs(model, [(p.teacher_ids, y) for p, y in picked], vocab_size, 1.0)
    kl = torch.cat([reverse_kl(s, t) for s, t in zip(student, teacher)]).mean()
    g_kl = torch.autograd.grad(kl, params)
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in refs]
    out = {}
    for key, side in (("kl_grad_cos_student", "student_ids"), ("kl_grad_cos_teacher", "teacher_ids")):
        logp = _response_logprobs(
            model, [(getattr(p, side), r) for p, r in zip(prompts, ids)], vocab_size, 1.0
        )
        nll = -torch.stack([lp.gather(1, torch.tensor(r)[:, None]).sum() for lp, r in zip(logp, ids)]).mean()
        g = torch.autograd.grad(nll, params)
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_kl, g))
        norms = [math.sqrt(sum(float(x.double().square().sum()) for x in v)) for v in (g_kl, g)]
        out[key] = dot / (norms[0] * norms[1]) if norms[0] * norms[1] > 0 else math.nan
    return out


def probe_mechanism(
    session, model, tokenizer, name: str, prompts, k: int, temperature: float, seed: int, vocab_size: int
) -> dict[str, float]:
    """The eval metrics (``eval/NAME/avg@k``, ``pass@k``) plus the mechanism metrics (``mech/NAME/...``)."""

    def sample(side: str, offset: int):
        groups = session.sample_groups([getattr(p, side) for p in prompts], k, temperature, seed + offset)
        return groups, [[session.score(p, s)[1] > 0 for s in g] for p, g in zip(prompts, groups)]

    groups, correct = sample("student_ids", 0)
    _, teacher_correct = sample("teacher_ids", 7919)
    flat = [c for g in correct for c in g]
    mech = {
        "student_acc": sum(flat) / len(flat),
        "teacher_acc": sum(c for g in teacher_correct for c in g) / len(flat),
        "all_wrong_share": sum(not any(g) for g in correct) / len(correct),
        **reference_logprobs(model, prompts, tokenizer, vocab_size),
        **sampled_kl(model, prompts, groups, correct, vocab_size, temperature),
        **gradient_alignment(model, prompts, groups, tokenizer, vocab_size, temperature),
    }
    return {**{f"mech/{name}/{key}": value for key, value in mech.items()}, **accuracy_at_k(name, k, correct)}


@functools.cache
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def probe(session, policy, model_path: str, name: str, prompts, ev, step: int) -> dict[str, float]:
    """The trainer's hook (``eval.mechanism``): :func:`probe_mechanism` with the run's policy and eval settings."""
    return probe_mechanism(
        session,
        policy.chunks[0],
        _tokenizer(model_path),
        name,
        prompts,
        ev.n_samples,
        ev.temperature,
        step,
        policy.head.vocab_size,
    )
