"""How far a loss gradient on stale samples is from the one on fresh samples (``tools/offpolicy_grad.py``).

Each gradient comes as two independent halves (two sample sets); :func:`bias_estimate` takes the
squared bias of the stale mean against the fresh mean with the sampling noise removed, and
:func:`summarise_draws` averages it over independent prompt draws. :func:`fresh_baseline_advantages`
is the diagnostic advantage that couples no group: ``R`` minus the mean reward of an independent fresh
sample set of the same prompt.
"""

from __future__ import annotations

import statistics

import torch

from sdpg_mcore.bench.stats import standard_error


def fresh_baseline_advantages(data: dict, baseline: dict, n: int) -> torch.Tensor:
    """``R - mean reward of the prompt's group in baseline`` (no std), for ``--advantages fresh-baseline``.

    ``data`` and ``baseline`` hold ``rewards`` (fp64, one per response) and ``groups`` (the prompt of
    each response, ``n`` responses per prompt). The baseline set is drawn from the policy independently
    of ``data``, so the advantage of a response does not depend on the other responses of its group:
    importance weights can then make a stale gradient exactly unbiased, and what the group-normalised
    advantages add to the bias shows apart."""
    groups_G = torch.zeros(int(baseline["groups"].max()) + 1, dtype=torch.float64)
    mean_G = groups_G.index_add(0, baseline["groups"], baseline["rewards"]) / n
    return (data["rewards"] - mean_G[data["groups"]]).float()


def bias_estimate(f1: torch.Tensor, f2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> dict[str, float]:
    """Squared bias of the stale gradient, its noise and the fresh one's, relative to the squared fresh
    signal, and ``along``: the stale gradient's length along the fresh one (``<E g_s, E g_f> / |E g_f|^2``,
    from products of independent halves, so without noise). ``along`` < 1 is a shorter step in the right
    direction, as from a smaller learning rate; the rest of the bias, ``bias2 - (along - 1)^2``, points
    elsewhere.

    ``f1, f2``: flat fresh gradients of two independent sample sets; ``s1, s2``: the stale ones. The
    squared bias ``|E g_s - E g_f|^2`` is ``|g_s - g_f|^2 - |g_s1 - g_s2|^2 / 4 - |g_f1 - g_f2|^2 / 4``
    with ``g`` each pair's mean."""

    def sq(x: torch.Tensor) -> float:
        return float(x.dot(x))

    noise_f, noise_s = sq(f1 - f2) / 4, sq(s1 - s2) / 4
    signal = sq((f1 + f2) / 2) - noise_f  # = f1 . f2
    bias2 = sq((s1 + s2) / 2 - (f1 + f2) / 2) - noise_f - noise_s
    return {
        "bias2": bias2 / signal,
        "along": float((s1 + s2).dot(f1 + f2)) / 4 / signal,
        "noise": noise_s / signal,
        "noise_fresh": noise_f / signal,
        "signal_norm": max(signal, 0.0) ** 0.5,
    }


def summarise_draws(draws: list[dict]) -> dict[str, float]:
    """Mean of each :func:`bias_estimate` number over the draws; standard errors of the bias and of ``along``."""
    out = {key: statistics.fmean(r[key] for r in draws) for key in draws[0]}
    for key in ("bias2", "along"):
        out[f"{key}_se"] = standard_error([r[key] for r in draws])
    return out
