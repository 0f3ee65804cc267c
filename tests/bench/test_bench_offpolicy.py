"""The off-policy gradient bias estimator (``tools/offpolicy_grad.py``'s arithmetic)."""

from __future__ import annotations

import pytest
import torch

from sdpg_mcore.bench.offpolicy import bias_estimate, fresh_baseline_advantages, summarise_draws


def test_bias_estimate_is_the_squared_bias_without_the_noise():
    """Gaussian halves in D dimensions: fresh mu + noise, stale mu + b + noise, noise of total variance
    4 per half (16 for the stale ones) against |mu|^2 = 1, and b = -0.3 mu + 0.4 u with u a unit vector
    orthogonal to mu, so |b|^2 = 0.25 and the stale gradient's length along mu is 0.7. The raw
    |g_s - g_f|^2 would be 0.25 + 2 + 8 = 10.25; the estimator must return 0.25 / 1. Each squared norm of
    a D-dim noise has relative std sqrt(2 / D) = 0.003 at D = 2e5, so the estimate is within 0.2 of its
    value (~3 s.d.); ``along`` sums noise dot products of s.d. sqrt(16 * 4 / D) = 0.018, so within 0.1."""
    D, gen = 200_000, torch.Generator().manual_seed(0)

    def vec(norm2):
        v = torch.randn(D, generator=gen, dtype=torch.float64)
        return v * (norm2 / v.dot(v)) ** 0.5

    mu, u = vec(1.0), vec(1.0)
    u = u - u.dot(mu) * mu
    b = -0.3 * mu + 0.4 * u / u.norm()
    f1, f2, s1, s2 = mu + vec(4.0), mu + vec(4.0), mu + b + vec(16.0), mu + b + vec(16.0)
    out = bias_estimate(f1, f2, s1, s2)
    assert float((s1 + s2 - f1 - f2).pow(2).sum() / 4) == pytest.approx(10.25, rel=0.02)  # what is removed
    assert out["bias2"] == pytest.approx(0.25, abs=0.2)
    assert out["along"] == pytest.approx(0.7, abs=0.1)
    assert out["noise"] == pytest.approx(8.0, rel=0.05)  # the stale mean's noise, 16 / 2
    assert out["noise_fresh"] == pytest.approx(2.0, rel=0.05)
    assert out["signal_norm"] == pytest.approx(1.0, abs=0.1)


def test_fresh_baseline_advantages_subtract_the_other_sets_group_mean():
    """Two prompts, n = 2: each response's reward minus its prompt's mean reward in the baseline set."""
    data = {
        "rewards": torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64),
        "groups": torch.tensor([0, 0, 1, 1]),
    }
    baseline = {
        "rewards": torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64),
        "groups": torch.tensor([0, 0, 1, 1]),
    }
    adv = fresh_baseline_advantages(data, baseline, 2)
    assert adv.tolist() == [0.0, -2.0, 1.0, 1.0]


def test_summary_is_the_mean_over_draws_with_standard_errors():
    draws = [{"bias2": b, "along": a, "noise": 1.0} for b, a in ((0.1, 0.9), (0.3, 1.1), (0.2, 1.0))]
    out = summarise_draws(draws)
    assert out["bias2"] == pytest.approx(0.2) and out["along"] == pytest.approx(1.0) and out["noise"] == 1.0
    assert out["bias2_se"] == pytest.approx(0.1 / 3**0.5) and out["along_se"] == pytest.approx(0.1 / 3**0.5)
