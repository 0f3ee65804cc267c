"""Per-token policy-loss building blocks of SDPG's loss (``algo/README.md``): dual-clip PPO, the KL clamp, the alpha modes.

All functions take flat per-token tensors ``[N]`` (the response tokens of a micro-batch) and return
per-token tensors; aggregation over tokens lives in ``aggregation.py``. Gradients flow through
``logprob_N`` (and ``kl_N``); old/reference/teacher log-probs and advantages are treated as
constants (detached here, so a caller cannot leak gradient into them by mistake).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""``ratio = exp(clamp(lp - lp_old, -20, 20))``: bounds the ratio before exp (reference value)."""


@dataclass(frozen=True)
class PGTerms:
    """Per-token outputs of :func:`dual_clip_pg`; the bool masks are for the clip-fraction metrics."""

    loss_N: Tensor
    """Per-token PPO loss (with grad through ``logprob_N``)."""
    ratio_N: Tensor
    """``exp(clamp(lp - lp_old, ±20))``, detached."""
    clipped_low_N: Tensor
    """A < 0 and ratio < 1 - eps_low: the lower clip is active (zero gradient)."""
    clipped_high_N: Tensor
    """A > 0 and ratio > 1 + eps_high: the upper clip is active (zero gradient)."""
    clipped_dual_N: Tensor
    """A < 0 and the dual clip ``-A * clip_c`` is active (ratio > clip_c, zero gradient)."""


def ppo_ratio(logprob_N: Tensor, old_logprob_N: Tensor) -> Tensor:
    """``exp(clamp(lp - lp_old, -20, 20))`` with grad through ``logprob_N``."""
    return torch.exp(torch.clamp(logprob_N - old_logprob_N.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def dual_clip_pg(
    logprob_N: Tensor,
    old_logprob_N: Tensor,
    advantages_N: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    clip_c: float,
) -> PGTerms:
    """Dual-clip PPO per token (DAPO clip-higher + dual clip).

    ``pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, then ``min(pg, -A c)`` where ``A < 0``
    so a huge ratio on a negative-advantage token cannot blow up the loss. ``clip_c = 1000`` is
    vanilla PPO for practical purposes (the ``grpo`` baseline).
    """
    adv_N = advantages_N.detach()
    ratio_N = ppo_ratio(logprob_N, old_logprob_N)
    pg1_N = -adv_N * ratio_N
    pg2_N = -adv_N * torch.clamp(ratio_N, 1.0 - eps_low, 1.0 + eps_high)
    clip1_N = torch.maximum(pg1_N, pg2_N)
    pg3_N = -adv_N * clip_c
    negative_N = adv_N < 0
    loss_N = torch.where(negative_N, torch.minimum(clip1_N, pg3_N), clip1_N)
    ratio_d = ratio_N.detach()
    return PGTerms(
        loss_N=loss_N,
        ratio_N=ratio_d,
        clipped_low_N=negative_N & (ratio_d < 1.0 - eps_low),
        clipped_high_N=(adv_N > 0) & (ratio_d > 1.0 + eps_high),
        clipped_dual_N=negative_N & (clip1_N.detach() > pg3_N),
    )


def rollout_is_weight(old_logprob_N: Tensor, rollout_logprob_N: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """``(min(pi_old / pi_rollout, cap), capped)`` per token, detached: the truncated importance weight
    of a token sampled by the rollout engine's weights, for the trainer's old policy.

    Why: PPO's ratio is taken against the trainer's recomputed old policy, but the tokens come from
    the policy that sampled them, one or more versions older under asynchronous rollouts. Weighting
    each token's PPO term by ``pi_old / pi_rollout`` makes it an estimate under the old policy again
    (the decoupled objective of AReaL); the cap bounds the variance where the engine gave a token
    far less probability than the trainer does (truncated IS, as in verl and slime).
    """
    log_w_N = torch.clamp(
        old_logprob_N.detach() - rollout_logprob_N.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    w_N = torch.exp(log_w_N)
    return torch.clamp(w_N, max=cap), w_N > cap


def clamp_kl(kl_N: Tensor, max_kl: float = 20.0) -> Tensor:
    """One-sided per-token clamp ``min(kl, max_kl)``; the gradient is zero where the clamp is active."""
    return torch.clamp(kl_N, max=max_kl)


def _fkl(logw_N: Tensor) -> Tensor:
    return torch.exp(-logw_N)


def _rkl(logw_N: Tensor) -> Tensor:
    return 0.5 * (logw_N + 1.0) ** 2


def _ufkl(logw_N: Tensor) -> Tensor:
    return torch.exp(-logw_N) + logw_N


def _urkl(logw_N: Tensor) -> Tensor:
    return 0.5 * logw_N**2


ALPHA_MODES: dict[str, Callable[[Tensor], Tensor]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "ufkl": _ufkl,
    "urkl": _urkl,
}
"""``R(logw)`` by ``alpha_mode`` (reference ``policy_loss.kl_mode``), ``w = exp(logw)``:
fkl ``1/w`` · rkl ``½(logw+1)²`` · ufkl ``1/w + logw`` · urkl ``½ logw²``."""


def alpha_regulariser(logprob_N: Tensor, ref_logprob_N: Tensor, mode: str) -> Tensor:
    """``R(logw)`` per token with ``logw = lp - lp_ref`` (not clamped), grad through ``logprob_N``."""
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha_mode={mode!r} is not one of {sorted(ALPHA_MODES)}")
    return ALPHA_MODES[mode](logprob_N - ref_logprob_N.detach())
