"""A tiny linear "policy" and a mini-batch for split-invariance tests (single process and gloo DP).

The model is ``logits_NV = X_NH @ W_HV``; log-prob, entropy and reverse KL to a fixed teacher are
computed naively from full softmaxes, so gradients reach ``W`` through every loss term.
"""

from __future__ import annotations

import torch

from sdpg_mcore.algo import (
    TokenInputs,
    get_algorithm,
    grpo_advantages,
    loss_counts,
    micro_batch_loss,
    normalisers_from_counts,
)
from sdpg_mcore.algo.metrics import MetricSums

LENGTHS = [5, 1, 7, 3, 2, 6, 4, 3]  # 8 responses, uneven lengths so a wrong normaliser shows
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
H, V = 6, 11


def make_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    x = torch.randn(n, H, generator=gen, dtype=torch.float64)
    w0 = torch.randn(H, V, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (n,), generator=gen)
    teacher_logits = torch.randn(n, V, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        lp0 = torch.log_softmax(x @ w0, -1).gather(1, targets[:, None])[:, 0]
    old = lp0 + torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    ref = lp0 + torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(1, targets[:, None])[:, 0]
    adv_B = grpo_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    return dict(x=x, w0=w0, targets=targets, teacher_logits=teacher_logits, old=old, ref=ref,
                teacher_lp=teacher_lp, adv_B=adv_B)  # fmt: skip


def token_slice(seqs: list[int]) -> torch.Tensor:
    """Indices of the flat tokens of the given sequences, in order."""
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    return torch.cat([torch.arange(starts[s], starts[s] + LENGTHS[s]) for s in seqs])


def micro_inputs(batch: dict, w: torch.Tensor, seqs: list[int]) -> TokenInputs:
    idx = token_slice(seqs)
    logits = batch["x"][idx] @ w
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    t_logp = torch.log_softmax(batch["teacher_logits"][idx], -1)
    seq_index = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([LENGTHS[s] for s in seqs]))
    return TokenInputs(
        logprob_N=logp.gather(1, batch["targets"][idx, None])[:, 0],
        old_logprob_N=batch["old"][idx],
        advantages_N=batch["adv_B"][torch.tensor(seqs)][seq_index],
        seq_index_N=seq_index,
        num_seqs=len(seqs),
        kl_N=(p * (logp - t_logp)).sum(-1),
        entropy_N=-(p * logp).sum(-1),
        ref_logprob_N=batch["ref"][idx],
        teacher_logprob_N=batch["teacher_lp"][idx],
    )


def run_mini_batch(name, cfg, batch, micro_batches, *, group=None, dp_size=1, mini_batch_rows=None):
    """Loss and grad of ``W`` for one mini-batch split as given (a list of sequence lists on this rank).

    Follows the trainer's convention: counts summed locally and all-reduced once, per micro-batch
    ``backward(contribution * dp_size)``, then gradients all-reduced and averaged like DDP.
    """
    import torch.distributed as dist

    algo = get_algorithm(name)
    w = batch["w0"].clone().requires_grad_(True)
    counts = torch.zeros(4, dtype=torch.float64)
    for seqs in micro_batches:
        inp = micro_inputs(batch, w.detach(), seqs)
        counts += loss_counts(algo, cfg, inp.advantages_N, inp.seq_index_N, inp.num_seqs)
    if dp_size > 1:
        dist.all_reduce(counts, group=group)
    rows = mini_batch_rows or sum(len(s) for s in micro_batches)
    norms = normalisers_from_counts(counts, cfg.loss_agg_mode, mini_batch_rows=rows, dp_size=dp_size)
    metrics = MetricSums()
    for seqs in micro_batches:
        out = micro_batch_loss(algo, cfg, micro_inputs(batch, w, seqs), norms, step=3, total_steps=10)
        (out.loss * dp_size).backward()
        metrics += out.metrics
    grad = w.grad.clone()
    if dp_size > 1:
        dist.all_reduce(grad, group=group)
        grad /= dp_size
    reduced = metrics.reduce(group)
    return reduced["loss"], grad, reduced
