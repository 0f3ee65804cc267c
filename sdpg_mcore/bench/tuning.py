"""Equal tuning for the algorithm benchmark: the same small grid size per method, chosen on training reward.

Every benchmarked method gets ``len(LEARNING_RATES) * 2`` runs: the learning rate crossed with two
values of the method's own main coefficient (:data:`GRID`). Each grid run trains on the training
problems alone, with evaluation off (it is never given the held-out files), and the chosen point is
the one with the highest mean training reward over its last ``window`` steps (:func:`choose`). Held-out
accuracy plays no part in the choice:

    points = grid_points("sdpg")                       # [["optimizer.lr=0.0005", "algorithm.beta=0.05"], ...]
    best = choose({i: rows_i for i, rows_i in ...}, window=10)
    best.key, best.train_reward

The benchmark's names map to a registered algorithm plus fixed overrides (:data:`BENCH_ALGOS`):
``dapo`` is SDPG's loss without its beta and alpha terms, ``sdpg_guarded`` is SDPG whose teacher is
guarded against erosion (``algorithm.teacher``), at SDPG's chosen beta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Benchmark name -> (``algorithm.name``, overrides that define it besides the tuned ones).
BENCH_ALGOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sdpg": ("sdpg", ()),
    "dapo": ("dapo", ()),
    "grpo": ("grpo", ()),
    "opsd": ("opsd", ()),
    "rlsd": ("rlsd", ()),
    "sdpg_guarded": ("sdpg", ()),
}

LEARNING_RATES = (5e-4, 1e-3)
"""``optimizer.lr`` values of every method's grid."""

GRID: dict[str, tuple[str, tuple]] = {
    "sdpg": ("algorithm.beta", (0.05, 0.2)),
    "dapo": ("algorithm.clip_eps_high", (0.28, 0.4)),
    "grpo": ("algorithm.kl_penalty_coef", (0.001, 0.04)),
    "opsd": ("algorithm.entropy_coef", (0.0, 0.02)),
    "rlsd": ("algorithm.lambda_base", (0.5, 1.0)),
    "sdpg_guarded": ("algorithm.teacher", ("ema", "initial")),
}
"""Per method: its main coefficient and the two values tried (``sdpg_guarded``: the guard itself)."""

INHERITED = {"sdpg_guarded": ("sdpg", "algorithm.beta")}
"""Methods that take a setting from another method's chosen point instead of tuning it again."""

REWARD_KEY = "reward_mean"
"""The training-step metric the choice reads (the mean reward of the step's rollouts)."""


@dataclass(frozen=True)
class Choice:
    """The chosen grid point and every point's score."""

    key: str
    """Key of the chosen point (as passed to :func:`choose`)."""
    train_reward: float
    """Its mean training reward over the last ``window`` steps."""
    scores: dict[str, float]
    """Every point's mean training reward (nan for a run without training steps)."""


def grid_points(algo: str, chosen: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """The overrides of each grid run of ``algo`` (learning rate outer, coefficient inner).

    ``chosen``: benchmark name -> chosen overrides of the methods already tuned; a method listed in
    :data:`INHERITED` needs its source's choice there (tune that one first)."""
    if algo not in GRID:
        raise ValueError(f"no tuning grid for {algo!r}; the grid covers {sorted(GRID)}")
    fixed: list[str] = []
    if algo in INHERITED:
        source, key = INHERITED[algo]
        settings = [o for o in (chosen or {}).get(source, ()) if o.startswith(key + "=")]
        if not settings:
            raise ValueError(f"{algo} takes {key} from {source}'s chosen settings: tune {source} first")
        fixed = settings
    key, values = GRID[algo]
    return [[f"optimizer.lr={lr}", f"{key}={value}", *fixed] for lr in LEARNING_RATES for value in values]


def train_reward(rows: Sequence[Mapping], window: int) -> float:
    """Mean of :data:`REWARD_KEY` over the last ``window`` training steps of a run's metric rows."""
    values = [r[REWARD_KEY] for r in rows if REWARD_KEY in r][-window:]
    return sum(values) / len(values) if values else math.nan


def choose(runs: Mapping[str, Sequence[Mapping]], window: int) -> Choice:
    """The grid point with the highest training reward (the first in order on a tie; runs without
    training steps never win). Only :data:`REWARD_KEY` is read: evaluation rows cannot sway it."""
    scores = {key: train_reward(rows, window) for key, rows in runs.items()}
    ranked = [key for key in scores if not math.isnan(scores[key])]
    if not ranked:
        raise ValueError(f"no grid run has a {REWARD_KEY!r} row; did the runs train?")
    best = max(ranked, key=lambda k: scores[k])  # max keeps the first of equal scores
    return Choice(best, scores[best], scores)
