"""Verifier rewards: the math scorers, a registry by ``data_source``, user functions, timeouts, DAPO shaping.

compute_score("math_dapo", response_text, "42")            # verl signature -> float | dict
with RewardScorer("math", num_workers=2, timeout_s=10) as scorer:
    results = scorer.score(requests)                        # process pool, every call time-limited
overlong_penalties(lengths, max_response_length, OverlongConfig(enable=True))
"""

from sdpg_mcore.rewards.math_dapo import strict_compute_score
from sdpg_mcore.rewards.math_scorer import (
    clean_answer,
    extract_answer,
    last_boxed,
    math_compute_score,
    normalize_answer,
    verify_with_timeout,
)
from sdpg_mcore.rewards.overlong import OverlongConfig, overlong_penalties, overlong_penalty
from sdpg_mcore.rewards.pool import TaskResult, TimeoutPool
from sdpg_mcore.rewards.registry import (
    RewardFunctionError,
    compute_score,
    compute_score_strict,
    load_reward_fn,
    register_reward,
    registered_rewards,
    resolve_reward_fn,
    reward_fn_for,
)
from sdpg_mcore.rewards.scorer import RewardRequest, RewardResult, RewardScorer

__all__ = [
    "OverlongConfig",
    "RewardFunctionError",
    "RewardRequest",
    "RewardResult",
    "RewardScorer",
    "TaskResult",
    "TimeoutPool",
    "clean_answer",
    "compute_score",
    "compute_score_strict",
    "extract_answer",
    "last_boxed",
    "load_reward_fn",
    "math_compute_score",
    "normalize_answer",
    "overlong_penalties",
    "overlong_penalty",
    "register_reward",
    "registered_rewards",
    "resolve_reward_fn",
    "reward_fn_for",
    "strict_compute_score",
    "verify_with_timeout",
]
