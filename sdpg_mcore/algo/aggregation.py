"""Loss aggregation (`loss_agg_mode`, ``algo/README.md``) that does not depend on how a mini-batch is split.

Convention (the one thing the trainer must get right):

    The function :func:`aggregate` returns one micro-batch's *contribution*. The sum of the
    contributions over every micro-batch of the mini-batch on every DP×CP rank is exactly the
    mini-batch loss L, so back-propagating every contribution into gradients that are *summed*
    over micro-batches and ranks gives exactly ∇L.

    The trainer (``train/forward.py``) sets ``calculate_per_token_loss=True`` and calls Megatron's
    grad finaliser without a token count, and its ``loss_func`` returns three values: then
    Megatron-Core 0.16 back-propagates the loss unscaled and DDP sums gradients over DP×CP instead
    of averaging, so the contribution is returned as is. Without Megatron's schedule, under a
    DDP that averages: ``(contribution * dp_size * cp_size).backward()``.

The global denominators come from :func:`local_counts` (per micro-batch, before any forward),
summed over the rank's micro-batches, all-reduced once per mini-batch over DP×CP, and turned
into :class:`Normaliser` s by :func:`normalisers_from_counts`.

Modes (``mask`` = the tokens that count, ``S`` = sequences with at least one such token):
- ``token-mean``: ``Σ_t loss_t / #tokens`` over the whole mini-batch.
- ``seq-mean-token-sum``: ``Σ_s Σ_t loss_t / #S``.
- ``seq-mean-token-mean``: ``Σ_s (Σ_t loss_t / #tokens_s) / #S``.
- ``token-mean-legacy``: the reference's flaw, reproduced on request: each micro-batch's own token
  mean, scaled by ``micro_batch_rows / mini_batch_rows`` (rows of this rank's mini-batch), summed
  over micro-batches and averaged over ranks (``/ dp_size``) — the value depends on the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-mean-legacy")


def check_loss_agg_mode(mode: str) -> None:
    """Raise ``ValueError`` naming ``loss_agg_mode`` and the valid choices."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r} is not one of {list(LOSS_AGG_MODES)}")


@dataclass(frozen=True)
class Normaliser:
    """Denominators of one mask for one mini-batch (global over micro-batches and DP×CP ranks)."""

    mode: str
    """One of ``LOSS_AGG_MODES``."""
    num_tokens: float
    """Masked tokens in the mini-batch, all ranks (``token-mean``)."""
    num_seqs: float
    """Sequences with at least one masked token, all ranks (``seq-mean-*``)."""
    mini_batch_rows: int = 0
    """``token-mean-legacy`` only: rows (responses) of this rank's mini-batch."""
    dp_size: int = 1
    """``token-mean-legacy`` only: ranks whose gradients are averaged (the reference's GPU mean)."""

    def __post_init__(self) -> None:
        check_loss_agg_mode(self.mode)
        if self.mode == "token-mean-legacy" and (self.mini_batch_rows < 1 or self.dp_size < 1):
            raise ValueError(
                "loss_agg_mode='token-mean-legacy' needs mini_batch_rows >= 1 and dp_size >= 1, got "
                f"mini_batch_rows={self.mini_batch_rows}, dp_size={self.dp_size}"
            )


@dataclass(frozen=True)
class LossNormalisers:
    """The two masks a loss is averaged over: the algorithm's loss mask and all response tokens.

    They differ only for ``opsd`` (the loss counts responses with A > 0, the entropy bonus all).
    """

    loss: Normaliser
    response: Normaliser


def seq_token_counts(mask_N: Tensor, seq_index_N: Tensor, num_seqs: int) -> Tensor:
    """Masked tokens per sequence ``[num_seqs]`` (float64) on this rank."""
    return torch.zeros(num_seqs, dtype=torch.float64, device=mask_N.device).index_add_(
        0, seq_index_N.long(), mask_N.to(torch.float64)
    )


def local_counts(
    loss_mask_N: Tensor,
    response_mask_N: Tensor,
    seq_index_N: Tensor,
    num_seqs: int,
    *,
    seq_owner: bool = True,
) -> Tensor:
    """``[4]`` float64: (loss tokens, response tokens, loss sequences, response sequences) of a micro-batch.

    Sum these over the rank's micro-batches, all-reduce (SUM) over DP×CP once per mini-batch and
    pass the result to :func:`normalisers_from_counts`. With context parallelism a sequence is on
    several CP ranks: pass ``seq_owner=False`` on all but one of them so it is counted once.
    """
    seqs_loss = (seq_token_counts(loss_mask_N, seq_index_N, num_seqs) > 0).sum()
    seqs_resp = (seq_token_counts(response_mask_N, seq_index_N, num_seqs) > 0).sum()
    owner = 1.0 if seq_owner else 0.0
    return torch.stack(
        [
            loss_mask_N.to(torch.float64).sum(),
            response_mask_N.to(torch.float64).sum(),
            seqs_loss.to(torch.float64) * owner,
            seqs_resp.to(torch.float64) * owner,
        ]
    )


def normalisers_from_counts(
    counts_4: Tensor, mode: str, *, mini_batch_rows: int = 0, dp_size: int = 1
) -> LossNormalisers:
    """Build the two :class:`Normaliser` s from the globally summed :func:`local_counts`."""
    loss_tokens, resp_tokens, loss_seqs, resp_seqs = (float(x) for x in counts_4.tolist())
    return LossNormalisers(
        loss=Normaliser(mode, loss_tokens, loss_seqs, mini_batch_rows, dp_size),
        response=Normaliser(mode, resp_tokens, resp_seqs, mini_batch_rows, dp_size),
    )


def aggregate(
    values_N: Tensor,
    mask_N: Tensor,
    seq_index_N: Tensor,
    num_seqs: int,
    norm: Normaliser,
    *,
    seq_num_tokens_S: Tensor | None = None,
) -> Tensor:
    """This micro-batch's contribution (scalar) to the mini-batch aggregate of ``values_N`` over ``mask_N``.

    ``seq_index_N`` (int64 ``[N]``) is each token's row in the micro-batch, ``num_seqs`` the rows.
    ``seq_num_tokens_S`` overrides the per-sequence token count for ``seq-mean-token-mean`` (pass the
    count all-reduced over CP when sequences are split over CP ranks). Masked-out tokens contribute
    exactly 0 with 0 gradient even where ``values_N`` is NaN; an empty mini-batch gives 0.
    """
    masked_N = torch.where(mask_N, values_N, torch.zeros_like(values_N))
    if norm.mode == "token-mean":
        return masked_N.sum() / max(norm.num_tokens, 1.0)
    if norm.mode == "seq-mean-token-sum":
        return masked_N.sum() / max(norm.num_seqs, 1.0)
    if norm.mode == "seq-mean-token-mean":
        if seq_num_tokens_S is None:
            seq_num_tokens_S = seq_token_counts(mask_N, seq_index_N, num_seqs)
        per_token_N = seq_num_tokens_S.to(values_N.dtype).clamp(min=1.0)[seq_index_N.long()]
        return (masked_N / per_token_N).sum() / max(norm.num_seqs, 1.0)
    assert norm.mode == "token-mean-legacy", norm.mode
    local_tokens = mask_N.sum().clamp(min=1).to(values_N.dtype)
    return masked_N.sum() / local_tokens * (num_seqs / norm.mini_batch_rows) / norm.dp_size
