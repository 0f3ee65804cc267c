"""GRPO advantages, DAPO group filter and GRPO's KL-in-reward against naive fp64 loops."""

import pytest
import torch

from sdpg_mcore.algo import broadcast_to_tokens, dapo_group_filter, grpo_advantages, kl_in_reward


def _naive_grpo(rewards, groups, norm_by_std=True, eps=1e-6):
    by_group = {}
    for r, g in zip(rewards, groups):
        by_group.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, groups):
        vals = torch.tensor(by_group[g], dtype=torch.float64)
        if len(vals) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = vals.mean().item(), torch.std(vals).item()
        out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_per_group_loop_with_unbiased_std(norm_by_std):
    gen = torch.Generator().manual_seed(0)
    groups = [7, 7, 7, 3, 3, 9, 1, 1, 1, 1, 1, 4, 4]  # sizes 3, 2, 1, 5, 2 and unsorted ids
    rewards = torch.randn(len(groups), generator=gen, dtype=torch.float64)
    got = grpo_advantages(rewards, torch.tensor(groups), norm_by_std=norm_by_std)
    want = _naive_grpo(rewards.tolist(), groups, norm_by_std)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_grpo_group_of_one_and_all_equal_group():
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 1, 1, 2, 2])
    adv = grpo_advantages(rewards, groups)
    assert adv[0].item() == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-15)  # mean 0, std 1
    assert adv[1:4].tolist() == [0.0, 0.0, 0.0]  # all-equal group: exactly zero
    std = torch.std(torch.tensor([1.0, -1.0], dtype=torch.float64)).item()
    assert adv[4].item() == pytest.approx(1.0 / (std + 1e-6), rel=1e-14)
    # +1/-1 and 1/0 rewards give the same advantages (the paper recipe's rewards)
    torch.testing.assert_close(grpo_advantages((rewards + 1) / 2, groups)[4:], adv[4:], rtol=1e-5, atol=0)


def test_grpo_integer_rewards_and_bad_shapes():
    adv = grpo_advantages(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32 and adv[2:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="group_index_B"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))


def test_broadcast_to_tokens():
    adv_B = torch.tensor([0.5, -1.0, 2.0])
    seq_index_N = torch.tensor([0, 0, 1, 2, 2, 2])
    assert broadcast_to_tokens(adv_B, seq_index_N).tolist() == [0.5, 0.5, -1.0, 2.0, 2.0, 2.0]


def test_dapo_filter_keeps_mixed_groups_and_singletons():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5])
    groups = torch.tensor([5, 5, 6, 6, 2, 2, 8, 9])
    f = dapo_group_filter(rewards, groups)
    assert f.keep_B.tolist() == [False, False, False, False, True, True, True, True]
    assert f.kept_groups.tolist() == [2, 8, 9]
    assert (f.num_groups, f.num_kept_groups, f.num_kept_responses) == (5, 3, 4)
    strict = dapo_group_filter(rewards, groups, keep_singletons=False)
    assert strict.kept_groups.tolist() == [2] and strict.num_kept_responses == 2


def test_kl_in_reward_equals_verl_token_level_penalty():
    """verl's rule written out: token scores (reward on the last token) minus coef * k1 per token, summed
    per response (the reference's own numbers: ``test_algo_reference.py``)."""
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 1, 4]
    seq_index_N = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    old_N = -torch.rand(8, generator=gen, dtype=torch.float64) * 3
    ref_N = -torch.rand(8, generator=gen, dtype=torch.float64) * 3
    rewards_B = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    coef = 1e-3
    want, k1_means = [], []
    start = 0
    for b, n in enumerate(lengths):
        scores = torch.zeros(n, dtype=torch.float64)
        scores[-1] = rewards_B[b]
        k1 = old_N[start : start + n] - ref_N[start : start + n]
        want.append((scores - coef * k1).sum().item())
        k1_means.append(k1.mean().item())
        start += n
    got, k1_mean_B = kl_in_reward(rewards_B, old_N, ref_N, seq_index_N, coef=coef)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(k1_mean_B, torch.tensor(k1_means, dtype=torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="same shape"):
        kl_in_reward(rewards_B, old_N, ref_N[:-1], seq_index_N, coef=coef)
