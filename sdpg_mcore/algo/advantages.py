"""Sequence-level advantages: GRPO group normalisation, DAPO group filter, GRPO's KL-in-reward.

The algorithm's steps 3-4 and the `grpo` baseline (``algo/README.md``). Everything here works on one value per response
(`rewards_B`, `group_index_B`: which prompt group each response belongs to) and is pure torch,
so the trainer calls it once per step on the whole batch, before any micro-batching.

    adv_B = grpo_advantages(rewards_B, group_index_B)          # (R - mean_g) / (std_g + 1e-6)
    adv_N = broadcast_to_tokens(adv_B, seq_index_N)            # one value per response token

The DAPO overlong penalty is a reward (``sdpg_mcore.rewards``), not an advantage: it is not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _check_groups(rewards_B: Tensor, group_index_B: Tensor) -> None:
    if rewards_B.dim() != 1 or group_index_B.shape != rewards_B.shape:
        raise ValueError(
            f"rewards_B and group_index_B must be 1-D of the same length, got {tuple(rewards_B.shape)} "
            f"and {tuple(group_index_B.shape)}"
        )
    if group_index_B.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_index_B must be an integer tensor, got {group_index_B.dtype}")


def _group_stats(rewards_B: Tensor, group_index_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-response (group size, mean, unbiased std, all-equal flag) of the group it belongs to, fp64.

    Two-pass mean / variance (like ``torch.std``) so that an all-equal group has variance exactly 0.
    """
    _, inverse_B = torch.unique(group_index_B, return_inverse=True)
    num_groups = int(inverse_B.max().item()) + 1 if inverse_B.numel() else 0
    r_B = rewards_B.detach().to(torch.float64)
    size_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse_B, torch.ones_like(r_B))
    mean_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse_B, r_B) / size_G
    sq_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, inverse_B, (r_B - mean_G[inverse_B]) ** 2
    )
    std_G = torch.sqrt(sq_G / (size_G - 1).clamp(min=1))
    r_max_G = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_B, r_B, "amax"
    )
    r_min_G = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_B, r_B, "amin"
    )
    equal_G = r_max_G == r_min_G
    return size_G[inverse_B], mean_G[inverse_B], std_G[inverse_B], equal_G[inverse_B]


def grpo_advantages(
    rewards_B: Tensor, group_index_B: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantage per response: ``(R_i - mean_g) / (std_g + eps)``, unbiased std (``torch.std``).

    A group of one gets mean 0 and std 1 (the reference's rule, so its advantage is ``R / (1 + eps)``).
    ``norm_by_std=False`` is Dr.GRPO: ``R_i - mean_g``. An all-equal group gets exactly 0.
    Returns ``[B]`` in ``rewards_B``'s floating dtype (fp32 for integer rewards); no gradient.
    """
    _check_groups(rewards_B, group_index_B)
    out_dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    if rewards_B.numel() == 0:
        return torch.zeros(0, dtype=out_dtype)
    size_B, mean_B, std_B, equal_B = _group_stats(rewards_B, group_index_B)
    single_B = size_B == 1
    mean_B = torch.where(single_B, torch.zeros_like(mean_B), mean_B)
    std_B = torch.where(single_B, torch.ones_like(std_B), std_B)
    centred_B = rewards_B.detach().to(torch.float64) - mean_B
    centred_B = torch.where(equal_B & ~single_B, torch.zeros_like(centred_B), centred_B)
    adv_B = centred_B / (std_B + eps) if norm_by_std else centred_B
    return adv_B.to(out_dtype)


def broadcast_to_tokens(values_B: Tensor, seq_index_N: Tensor) -> Tensor:
    """``values_B[seq_index_N]``: one sequence-level value per token (``seq_index_N`` = row of each token)."""
    return values_B[seq_index_N.long()]


@dataclass(frozen=True)
class GroupFilter:
    """Which responses DAPO dynamic sampling keeps (step 3 of the algorithm, ``algo/README.md``)."""

    keep_B: Tensor
    """bool [B]: response belongs to a kept group."""
    kept_groups: Tensor
    """int64 [G_kept]: the distinct ``group_index`` values that are kept, ascending."""
    num_groups: int
    """Distinct groups in the input."""
    num_kept_groups: int
    """Groups kept (rewards not all equal, plus singletons when ``keep_singletons``)."""
    num_kept_responses: int
    """Responses kept (``keep_B.sum()``)."""


def dapo_group_filter(
    rewards_B: Tensor, group_index_B: Tensor, *, keep_singletons: bool = True
) -> GroupFilter:
    """DAPO dynamic sampling: keep the groups whose rewards are not all equal.

    An all-equal group has advantage 0 everywhere and only dilutes the token-mean. A group of one
    is kept by default, as verl's DAPO recipe does (``std > 0 or len == 1``); ``keep_singletons=False``
    drops it. Pass the metric the filter should look at (reward or accuracy) as ``rewards_B``.
    """
    _check_groups(rewards_B, group_index_B)
    if rewards_B.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return GroupFilter(torch.zeros(0, dtype=torch.bool), empty, 0, 0, 0)
    size_B, _, _, equal_B = _group_stats(rewards_B, group_index_B)
    keep_B = ~equal_B | ((size_B == 1) & keep_singletons)
    groups = torch.unique(group_index_B.long())
    kept_groups = torch.unique(group_index_B.long()[keep_B])
    return GroupFilter(
        keep_B=keep_B,
        kept_groups=kept_groups,
        num_groups=int(groups.numel()),
        num_kept_groups=int(kept_groups.numel()),
        num_kept_responses=int(keep_B.sum().item()),
    )


def kl_in_reward(
    rewards_B: Tensor,
    old_logprob_N: Tensor,
    ref_logprob_N: Tensor,
    seq_index_N: Tensor,
    *,
    coef: float,
) -> tuple[Tensor, Tensor]:
    """GRPO's KL penalty in the reward: ``R_i - coef * sum_t k1_t`` with ``k1_t = lp_old - lp_ref``.

    verl (``use_kl_in_reward``) subtracts ``coef * k1_t`` from every token of the token-level scores,
    whose only non-zero entry is the outcome reward on the last token; GRPO then sums the token
    rewards per response before the group normalisation. Summing first is the same number, so this
    returns the penalised sequence rewards ``[B]`` (feed them to :func:`grpo_advantages`) and the
    per-response mean k1 ``[B]`` (verl's ``actor/reward_kl_penalty`` averages it over responses).
    ``seq_index_N`` maps each response token to its row in ``rewards_B``; call it on the whole batch
    after the old/reference log-prob passes and before the advantages.
    """
    if old_logprob_N.shape != ref_logprob_N.shape or old_logprob_N.shape != seq_index_N.shape:
        raise ValueError(
            "old_logprob_N, ref_logprob_N and seq_index_N must have the same shape, got "
            f"{tuple(old_logprob_N.shape)}, {tuple(ref_logprob_N.shape)}, {tuple(seq_index_N.shape)}"
        )
    k1_N = (old_logprob_N.detach() - ref_logprob_N.detach()).to(torch.float64)
    idx = seq_index_N.long()
    num_rows = rewards_B.shape[0]
    k1_sum_B = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, idx, k1_N)
    len_B = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, idx, torch.ones_like(k1_N))
    out_dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    penalised_B = rewards_B.detach().to(torch.float64) - coef * k1_sum_B
    return penalised_B.to(out_dtype), (k1_sum_B / len_B.clamp(min=1)).to(out_dtype)
