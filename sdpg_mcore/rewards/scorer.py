"""Batch scoring in a process pool, every call under a time limit.

One task per response: the whole reward call (extraction, normalisation, math-verify or the user's
function) runs in a :class:`TimeoutPool` worker, and a call past ``timeout_s`` is recorded as
``timed_out`` with ``timeout_score`` while its worker is replaced. Workers resolve the reward spec
themselves (a function loaded from a file cannot be pickled by reference), and the spec is loaded once
in the parent first so that a bad path fails before any rollout. An exception inside a reward function
is raised here with the worker's traceback: a broken reward must not silently become -1.

    with RewardScorer(config.scorer, strict=config.strict, num_workers=2, timeout_s=10) as scorer:
        results = scorer.score([RewardRequest("math_dapo", text, "42")])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sdpg_mcore.rewards.pool import DEFAULT_TIMEOUT_S, TimeoutPool
from sdpg_mcore.rewards.registry import (
    DEFAULT_ANSWER_FORMAT,
    RewardFunctionError,
    as_score_dict,
    resolve_reward_fn,
)


@dataclass
class RewardRequest:
    """One response to score."""

    data_source: str
    solution_str: str
    ground_truth: str
    extra_info: dict[str, Any] | None = None


@dataclass
class RewardResult:
    """A scored response: ``score`` plus what the function reported (``acc``, ``pred``, ...)."""

    score: float
    info: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False
    elapsed_s: float = 0.0

    @property
    def acc(self) -> bool | None:
        acc = self.info.get("acc")
        return None if acc is None else bool(acc)


@lru_cache(maxsize=8)
def _resolved(spec: str | None, strict: bool, answer_format: str):
    return resolve_reward_fn(spec, strict, answer_format, timeout_s=None)


def score_one(spec: str | None, strict: bool, answer_format: str, request: RewardRequest) -> dict[str, Any]:
    """Score ``request`` with the reward function named by ``spec``, inline (the pool's task limit applies)."""
    fn = _resolved(spec, strict, answer_format)
    result = fn(request.data_source, request.solution_str, request.ground_truth, request.extra_info)
    return as_score_dict(result, spec)


class RewardScorer:
    """Scores batches of responses in ``num_workers`` processes; ``num_workers=0`` scores inline (no limit)."""

    def __init__(
        self,
        reward_fn: str | None = None,
        *,
        strict: bool = False,
        answer_format: str = DEFAULT_ANSWER_FORMAT,
        num_workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        timeout_score: float = -1.0,
    ):
        resolve_reward_fn(reward_fn, strict, answer_format)  # fail fast on a bad spec, in the parent
        if timeout_s <= 0:
            raise ValueError(f"reward timeout_s={timeout_s}: must be > 0")
        self.reward_fn = reward_fn
        self.strict = strict
        self.answer_format = answer_format
        self.timeout_s = timeout_s
        self.timeout_score = timeout_score
        self._pool = TimeoutPool(num_workers) if num_workers > 0 else None

    def score(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        if self._pool is None:
            return [
                RewardResult(
                    score=(d := score_one(self.reward_fn, self.strict, self.answer_format, r))["score"],
                    info=d,
                )
                for r in requests
            ]
        results = self._pool.map(
            score_one,
            [(self.reward_fn, self.strict, self.answer_format, r) for r in requests],
            self.timeout_s,
        )
        out = []
        for i, (request, result) in enumerate(zip(requests, results)):
            if result.timed_out:
                out.append(
                    RewardResult(
                        self.timeout_score, {"acc": False}, timed_out=True, elapsed_s=result.elapsed_s
                    )
                )
                continue
            if result.error is not None:
                raise RewardFunctionError(
                    f"reward function {self.reward_fn or 'auto'!r} failed on response {i} "
                    f"(data_source={request.data_source!r}):\n{result.error}"
                )
            out.append(RewardResult(result.value["score"], result.value, elapsed_s=result.elapsed_s))
        return out

    @property
    def num_timeouts(self) -> int:
        return 0 if self._pool is None else self._pool.num_timeouts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
