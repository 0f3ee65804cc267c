"""Shared by the fused-head tests: the naive full-softmax fp64 reference and seeded cases."""

from __future__ import annotations

import torch

F64 = torch.float64


def naive_reference(
    h_s, h_t, weight, targets, vocab_size, temperature=1.0, teacher_temperature=1.0, teacher_weight=None
):
    """Full [N, V] logits, full log_softmax, autograd; the teacher path is detached (no grad) and
    uses ``teacher_weight`` when given (a teacher with its own output layer), else ``weight``."""
    w_real = weight[:vocab_size]
    w_teacher = w_real if teacher_weight is None else teacher_weight[:vocab_size]
    log_p_s = torch.log_softmax((h_s @ w_real.t()) / temperature, dim=-1)
    p_s = log_p_s.exp()
    logprob = log_p_s.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(p_s * log_p_s).sum(-1)
    if h_t is None:
        kl = torch.zeros_like(entropy)
    else:
        with torch.no_grad():
            log_p_t = torch.log_softmax((h_t @ w_teacher.t()) / teacher_temperature, dim=-1)
        kl = (p_s * (log_p_s - log_p_t)).sum(-1)
    return kl, logprob, entropy


def make_case(num_tokens, hidden, vocab_size, padded_vocab, dtype=F64, seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    h_s = (scale * torch.randn(num_tokens, hidden, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    h_t = (scale * torch.randn(num_tokens, hidden, generator=gen, dtype=F64)).to(dtype)
    weight = torch.randn(padded_vocab, hidden, generator=gen, dtype=F64).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    if num_tokens:
        targets[-1] = vocab_size - 1  # the last real row, next to the padding
    upstream = [torch.randn(num_tokens, generator=gen, dtype=F64) for _ in range(3)]
    return h_s, h_t, weight, targets, upstream


def values_and_grads(fn, h_s, weight, upstream):
    outs = fn()
    loss = sum((o.to(F64) * g).sum() for o, g in zip(outs, upstream))
    grads = torch.autograd.grad(loss, (h_s, weight), allow_unused=True)
    return [o.detach() for o in outs], grads


def teacher_weight_like(weight, seed=7, spread=0.5):
    """A teacher's own output layer near ``weight`` (as an EMA or the initial policy is): ``weight``
    plus ``spread`` standard-normal noise, same shape and dtype, no grad."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(weight.shape, generator=gen, dtype=F64)
    return (weight.detach().double() + spread * noise).to(weight.dtype).to(weight.device)
