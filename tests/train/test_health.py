"""The non-finite guard: bad steps (non-finite loss, skipped updates) stop the run past the patience."""

import math

import pytest
import torch

from sdpg_mcore.train.health import NonFiniteError, NonFiniteGuard, check_weights, grads_finite


def test_guard_counts_bad_steps_in_a_row_and_stops_past_patience():
    guard = NonFiniteGuard(patience=1)
    guard.check(1, {"loss": 0.5, "grad_norm": 1.0}, skipped_updates=0)
    guard.check(2, {"loss": math.nan}, skipped_updates=0)  # one bad step: tolerated
    guard.check(3, {"loss": 0.4}, skipped_updates=0)  # a good one resets the count
    guard.check(4, {"loss": 0.4}, skipped_updates=1)  # an update skipped for a NaN gradient
    with pytest.raises(
        NonFiniteError, match=r"step 5: non-finite loss in 2 step\(s\) in a row.*nonfinite_patience=1"
    ):
        guard.check(5, {"loss": math.inf}, skipped_updates=1)


def test_an_empty_per_token_mean_is_not_a_bad_step():
    """OPSD in a step without a right answer: no token passes its gate, pg_loss has no token (NaN),
    the loss is 0."""
    guard = NonFiniteGuard(patience=0)
    guard.check(
        1, {"loss": 0.0, "pg_loss": math.nan, "kl_mean": math.nan, "grad_norm": 0.0}, skipped_updates=0
    )
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        guard.check(2, {"loss": math.nan, "pg_loss": math.nan}, skipped_updates=0)


def test_guard_with_zero_patience_stops_at_the_first_bad_step():
    with pytest.raises(NonFiniteError, match="step 7: non-finite a gradient on some rank"):
        NonFiniteGuard(0).check(7, {"loss": 0.1, "grad_norm": 0.2}, skipped_updates=2)
    with pytest.raises(ValueError, match="nonfinite_patience must be >= 0"):
        NonFiniteGuard(-1)


def test_non_finite_weights_and_grads_are_detected():
    model = torch.nn.Linear(3, 2)
    check_weights([model], 1, 1e-3)
    model.weight.grad = torch.zeros_like(model.weight)
    assert grads_finite([model])
    model.weight.grad[0, 0] = math.nan
    assert not grads_finite([model])
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"step 2: the optimizer update made the weights non-finite"):
        check_weights([model], 2, math.inf)
