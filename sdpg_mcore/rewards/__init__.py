"""Verifier rewards: the math scorers, a registry by ``data_source``, user functions, timeouts, DAPO shaping.

compute_score("math_dapo", response_text, "42")            # verl signature -> float | dict, time-limited
compute_score_strict("math_dapo", text, "42", answer_format="boxed")   # the reference's scorer, exactly
with RewardScorer("math", num_workers=2, timeout_s=10) as scorer:
    results = scorer.score(requests)                        # process pool, every call time-limited
overlong_penalties(lengths, max_response_length, OverlongConfig(enable=True))
"""

from sdpg_mcore.rewards.math_dapo import ANSWER_FORMATS, answer_colon_score, boxed_score, math_dapo_score
from sdpg_mcore.rewards.math_scorer import (
    clean_answer,
    extract_answer,
    last_boxed,
    normalize_answer,
    score_math_answer,
)
from sdpg_mcore.rewards.overlong import OverlongConfig, overlong_penalties, overlong_penalty
from sdpg_mcore.rewards.pool import DEFAULT_TIMEOUT_S, TaskResult, TimeoutPool, call_with_timeout
from sdpg_mcore.rewards.reference_sources import gsm8k_score, math_verify_score
from sdpg_mcore.rewards.registry import (
    RewardFunctionError,
    UnknownDataSourceError,
    compute_score,
    compute_score_strict,
    load_reward_fn,
    math_compute_score,
    register_reward,
    resolve_reward_fn,
    reward_fn_for,
    strict_reward_fn_for,
)
from sdpg_mcore.rewards.scorer import RewardRequest, RewardResult, RewardScorer

__all__ = [
    "ANSWER_FORMATS",
    "DEFAULT_TIMEOUT_S",
    "OverlongConfig",
    "RewardFunctionError",
    "RewardRequest",
    "RewardResult",
    "RewardScorer",
    "TaskResult",
    "TimeoutPool",
    "UnknownDataSourceError",
    "answer_colon_score",
    "boxed_score",
    "call_with_timeout",
    "clean_answer",
    "compute_score",
    "compute_score_strict",
    "extract_answer",
    "gsm8k_score",
    "last_boxed",
    "load_reward_fn",
    "math_compute_score",
    "math_dapo_score",
    "math_verify_score",
    "normalize_answer",
    "overlong_penalties",
    "overlong_penalty",
    "register_reward",
    "resolve_reward_fn",
    "reward_fn_for",
    "score_math_answer",
    "strict_reward_fn_for",
]
