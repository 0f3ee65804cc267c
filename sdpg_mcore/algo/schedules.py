"""Step-dependent coefficients: SDPG's beta schedule and RLSD's lambda (``algo/README.md``).

Both take the 1-based global step (the first optimizer step of training is step 1) and return a
plain float, so the trainer calls them once per step and logs the value.
"""

from __future__ import annotations


def beta_schedule(
    beta: float, step: int, *, warmup_steps: int = 0, decay_steps: int = 0, total_steps: int = 0
) -> float:
    """Effective beta at a 1-based ``step``: linear warm-up over ``warmup_steps``, linear decay over the last ``decay_steps``.

    ``beta * step / W`` while ``step < W``; that value is multiplied by ``(N - step) / D`` once
    ``step >= N - D``; else ``beta``. W = 0 or D = 0 switch the part off. Past ``N`` the factor
    stays at 0 (the reference clamps ``N - step`` at 0).
    """
    if step < 1:
        raise ValueError(f"beta_schedule: step is 1-based, got step={step}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(
            f"beta_schedule: warmup_steps and decay_steps must be >= 0, got {warmup_steps}, {decay_steps}"
        )
    if decay_steps > 0 and total_steps < decay_steps:
        raise ValueError(
            f"beta_schedule: beta_decay_steps={decay_steps} needs total_steps >= it, got total_steps={total_steps}"
        )
    effective = beta
    if warmup_steps > 0 and step < warmup_steps:
        effective = beta * step / warmup_steps
    if decay_steps > 0 and step >= total_steps - decay_steps:
        effective = effective * max(total_steps - step, 0) / decay_steps
    return effective


def rlsd_lambda(step: int, *, lambda_base: float = 0.5, decay_steps: int = 50) -> float:
    """RLSD mixing weight ``lambda_base * max(0, 1 - step / decay_steps)`` at a 1-based ``step``.

    ``decay_steps = 0`` keeps ``lambda_base`` for the whole run (the reference's convention).
    """
    if step < 1:
        raise ValueError(f"rlsd_lambda: step is 1-based, got step={step}")
    if decay_steps < 0:
        raise ValueError(f"rlsd_lambda: lambda_decay_steps must be >= 0, got {decay_steps}")
    if decay_steps == 0:
        return lambda_base
    return lambda_base * max(0.0, 1.0 - step / decay_steps)
