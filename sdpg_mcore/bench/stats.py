"""Small statistics of benchmark results: the standard error over seeds, a trailing mean for curves."""

from __future__ import annotations

import statistics


def standard_error(values: list[float]) -> float:
    """Standard error of the mean (nan for fewer than two values)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1 = raw), so early points are not shifted."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
