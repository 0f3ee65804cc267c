"""Small statistics of benchmark results: the standard error over seeds, paired differences between
methods run on the same seeds, a trailing mean for curves."""

from __future__ import annotations

import math
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


def paired_difference(a: list[float], b: list[float]) -> dict:
    """``a - b`` seed by seed (the same seeds, in the same order): per-seed list, and over the seeds
    where both are measured (not nan) the count, mean and standard error; ``all_positive`` only when
    every seed is measured and positive."""
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)} seeds")
    diffs = [x - y for x, y in zip(a, b)]
    measured = [d for d in diffs if not math.isnan(d)]
    return {
        "per_seed": diffs,
        "num_paired": len(measured),
        "mean": sum(measured) / len(measured) if measured else float("nan"),
        "se": standard_error(measured),
        "all_positive": bool(diffs) and len(measured) == len(diffs) and all(d > 0 for d in diffs),
    }
