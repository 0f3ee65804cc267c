"""Beta schedule and RLSD lambda (algo/README.md) at their edge steps."""

import pytest

from sdpg_mcore.algo import beta_schedule, rlsd_lambda


def _beta_by_spec(beta, step, w, d, n):
    value = beta * step / w if (w > 0 and step < w) else beta
    if d > 0 and step >= n - d:
        value *= (n - step) / d
    return value


@pytest.mark.parametrize("w,d,n", [(0, 0, 100), (10, 0, 100), (0, 20, 100), (10, 20, 100), (30, 80, 100)])
def test_beta_schedule_matches_spec_on_every_step(w, d, n):
    for step in range(1, n + 1):
        assert beta_schedule(1e-3, step, warmup_steps=w, decay_steps=d, total_steps=n) == pytest.approx(
            _beta_by_spec(1e-3, step, w, d, n), rel=1e-15, abs=0
        )


def test_beta_schedule_edges():
    b = 2e-3
    assert beta_schedule(b, 1, warmup_steps=10) == pytest.approx(b / 10)
    assert beta_schedule(b, 9, warmup_steps=10) == pytest.approx(b * 0.9)
    assert beta_schedule(b, 10, warmup_steps=10) == b  # step = W: full beta
    assert beta_schedule(b, 79, decay_steps=20, total_steps=100) == b
    assert beta_schedule(b, 80, decay_steps=20, total_steps=100) == b  # step = N - D: factor 1
    assert beta_schedule(b, 81, decay_steps=20, total_steps=100) == pytest.approx(b * 19 / 20)
    assert beta_schedule(b, 100, decay_steps=20, total_steps=100) == 0.0
    assert beta_schedule(b, 120, decay_steps=20, total_steps=100) == 0.0  # past N stays 0
    # warm-up and decay overlap: the decay multiplies the warmed-up value
    assert beta_schedule(b, 5, warmup_steps=10, decay_steps=96, total_steps=100) == pytest.approx(
        b * 0.5 * 95 / 96
    )


def test_beta_schedule_errors():
    with pytest.raises(ValueError, match="1-based"):
        beta_schedule(1e-3, 0)
    with pytest.raises(ValueError, match="total_steps"):
        beta_schedule(1e-3, 1, decay_steps=10, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        beta_schedule(1e-3, 1, warmup_steps=-1)


def test_rlsd_lambda_schedule():
    assert rlsd_lambda(1) == pytest.approx(0.5 * (1 - 1 / 50))  # 1-based: step 1 already decays
    assert rlsd_lambda(25) == pytest.approx(0.25)
    assert rlsd_lambda(49) == pytest.approx(0.5 / 50)
    assert rlsd_lambda(50) == 0.0
    assert rlsd_lambda(400) == 0.0
    assert rlsd_lambda(7, lambda_base=0.3, decay_steps=0) == 0.3
    with pytest.raises(ValueError, match="1-based"):
        rlsd_lambda(0)
