"""Reward functions by name and by ``data_source``, and user functions from ``path/to/file.py:name``.

Every reward function has verl's signature, so functions written for verl work unchanged::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

A dict must carry ``score`` (other keys, e.g. ``acc`` and ``pred``, are logged).

Two dispatchers on ``data_source``:

- :func:`compute_score` (default): an exact registered name, then a registered prefix (``aime24`` ->
  ``aime``), then the default math scorer; ``openai/gsm8k`` gets the reference's gsm8k scorer.
- :func:`compute_score_strict` (``reward.strict``): the reference's own table (SDPG's verl fork,
  ``reward_score/__init__.py``) — ``math_dapo``/``math``/``aime*``/``amc*`` -> its ``math_dapo`` scorer
  in ``answer_format`` (``answer_colon`` | ``boxed``), MATH-500 and friends -> math-verify 0/1,
  ``openai/gsm8k`` -> gsm8k 0/1, a source registered by the user -> that function, anything else an
  :class:`UnknownDataSourceError` (the reference raises ``NotImplementedError`` there).

Every built-in scorer runs under a wall-clock limit (extraction included) in the process-wide reward
worker (``pool.py``): a response that sends a regex or sympy into a loop scores as wrong after
``timeout_s`` instead of stalling the caller. ``resolve_reward_fn(spec)`` turns a config value into a
function: None/``auto`` -> a dispatcher, a registered name -> that scorer for every sample,
``file.py:fn`` or ``package.module:fn`` -> the user's function, run in the worker under the same limit.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from sdpg_mcore.rewards.math_dapo import ANSWER_FORMATS, math_dapo_score
from sdpg_mcore.rewards.math_scorer import score_math_answer
from sdpg_mcore.rewards.pool import DEFAULT_TIMEOUT_S, call_with_timeout
from sdpg_mcore.rewards.reference_sources import gsm8k_score, math_verify_score

logger = logging.getLogger(__name__)

RewardFn = Callable[..., "float | dict[str, Any]"]

DEFAULT_REWARD = "math"
DEFAULT_ANSWER_FORMAT = "answer_colon"

#: The reference's data sources (``default_compute_score``), by scorer.
REFERENCE_MATH_DAPO_SOURCES = ("math_dapo", "math", "math_dapo_reasoning")
REFERENCE_MATH_DAPO_PREFIXES = ("aime", "amc")
REFERENCE_MATH_VERIFY_SOURCES = (
    "lighteval/MATH",
    "DigitalLearningGmbH/MATH-lighteval",
    "HuggingFaceH4/MATH-500",
    "math_500",
    "minerva-math",
    "olympiadbench",
)
REFERENCE_GSM8K_SOURCES = ("openai/gsm8k",)

_BY_NAME: dict[str, RewardFn] = {}
_BY_PREFIX: dict[str, RewardFn] = {}
#: Built-in scorers (run in the reward worker) -> the score a wrong (or timed-out) response gets.
_WRONG_SCORE: dict[Callable, float] = {
    score_math_answer: -1.0,
    math_dapo_score: -1.0,
    gsm8k_score: 0.0,
    math_verify_score: 0.0,
}


class RewardFunctionError(ValueError):
    """A reward function could not be loaded, or returned something that is not a score."""


class UnknownDataSourceError(RewardFunctionError, NotImplementedError):
    """Strict mode has no scorer for a ``data_source`` (the reference raises ``NotImplementedError``)."""


def register_reward(name: str, fn: RewardFn, *, prefix: bool = False) -> None:
    """Register ``fn`` for ``data_source == name`` (or ``data_source.startswith(name)`` with ``prefix``).

    A registered function runs in the caller's process, as it is (it may be a closure).
    """
    (_BY_PREFIX if prefix else _BY_NAME)[name] = fn


def _registered(data_source: str) -> RewardFn | None:
    if data_source in _BY_NAME:
        return _BY_NAME[data_source]
    matches = [p for p in _BY_PREFIX if data_source.startswith(p)]
    return _BY_PREFIX[max(matches, key=len)] if matches else None


def _base(fn: Callable) -> Callable:
    return fn.func if isinstance(fn, partial) else fn


def run_scorer(
    fn: RewardFn,
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float | dict[str, Any]:
    """``fn(...)``; a built-in scorer runs in the reward worker under ``timeout_s`` (None: inline, no limit)."""
    args = (data_source, solution_str, ground_truth, extra_info)
    wrong = _WRONG_SCORE.get(_base(fn))
    if wrong is None or timeout_s is None:
        return fn(*args)
    result = call_with_timeout(fn, *args, timeout_s=timeout_s)
    if result.timed_out:
        logger.warning(
            "reward for data_source=%r timed out after %.1fs: scored %s", data_source, timeout_s, wrong
        )
        return {"score": wrong, "acc": False, "pred": "[TIMEOUT]", "timed_out": True}
    if result.error is not None:
        raise RewardFunctionError(f"reward for data_source={data_source!r} failed:\n{result.error}")
    return result.value


def math_compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """The default math scorer (``math_scorer.py``) under ``timeout_s``: ``{"score", "acc", "pred", "timed_out"}``."""
    return run_scorer(score_math_answer, data_source, solution_str, ground_truth, extra_info, timeout_s)


def reward_fn_for(data_source: str) -> RewardFn:
    """The default-mode function for ``data_source``: registered (exact, then longest prefix), else math."""
    fn = _registered(data_source)
    return fn if fn is not None else _BY_NAME[DEFAULT_REWARD]


def strict_reward_fn_for(data_source: str, answer_format: str = DEFAULT_ANSWER_FORMAT) -> RewardFn:
    """The reference's scorer for ``data_source`` (module docstring); raises for a source it does not know."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"reward.answer_format={answer_format!r}: choose one of {sorted(ANSWER_FORMATS)}")
    if data_source in REFERENCE_GSM8K_SOURCES:
        return gsm8k_score
    if data_source in REFERENCE_MATH_VERIFY_SOURCES:
        return math_verify_score
    if data_source in REFERENCE_MATH_DAPO_SOURCES or data_source.startswith(REFERENCE_MATH_DAPO_PREFIXES):
        return partial(math_dapo_score, answer_format=answer_format)
    user = _registered(data_source)
    if user is not None and _base(user) not in _WRONG_SCORE:
        return user
    raise UnknownDataSourceError(
        f"reward.strict: no reference scorer for data_source={data_source!r}. The reference scores "
        f"{list(REFERENCE_MATH_DAPO_SOURCES)}, aime*/amc*, {list(REFERENCE_MATH_VERIFY_SOURCES)} and "
        f"{list(REFERENCE_GSM8K_SOURCES)}; fix the data's data_source, set reward.strict=false, or name "
        "a scorer (reward.scorer=path/to/file.py:fn, or register_reward)"
    )


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float | dict[str, Any]:
    """Score one response with the default-mode function for its ``data_source`` (time-limited)."""
    return run_scorer(
        reward_fn_for(data_source), data_source, solution_str, ground_truth, extra_info, timeout_s
    )


def compute_score_strict(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    answer_format: str = DEFAULT_ANSWER_FORMAT,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float | dict[str, Any]:
    """Score one response exactly as the reference does (``default_compute_score``), time-limited."""
    fn = strict_reward_fn_for(data_source, answer_format)
    return run_scorer(fn, data_source, solution_str, ground_truth, extra_info, timeout_s)


def _load_from_file(path: Path, name: str, spec: str) -> Any:
    if not path.is_file():
        raise RewardFunctionError(f"reward function {spec!r}: file {str(path)!r} does not exist")
    module_name = f"sdpg_user_reward_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardFunctionError(f"reward function {spec!r}: {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise RewardFunctionError(
            f"reward function {spec!r}: importing {str(path)!r} failed with {type(exc).__name__}: {exc}"
        ) from exc
    sys.modules[module_name] = module
    return module


def load_reward_fn(spec: str) -> RewardFn:
    """Load ``path/to/file.py:function_name`` (or ``package.module:function_name``)."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise RewardFunctionError(f"reward function {spec!r}: expected 'path/to/file.py:function_name'")
    if location.endswith(".py") or "/" in location or Path(location).exists():
        module = _load_from_file(Path(location), name, spec)
    else:
        try:
            module = importlib.import_module(location)
        except Exception as exc:
            raise RewardFunctionError(
                f"reward function {spec!r}: importing module {location!r} failed with {type(exc).__name__}: {exc}"
            ) from exc
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardFunctionError(
            f"reward function {spec!r}: {location!r} has no function {name!r}; found {public}"
        )
    if not callable(fn):
        raise RewardFunctionError(
            f"reward function {spec!r}: {name!r} is a {type(fn).__name__}, not a function"
        )
    return fn


@lru_cache(maxsize=16)
def _loaded(spec: str) -> RewardFn:
    return load_reward_fn(spec)


def user_spec_score(
    spec: str,
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
) -> float | dict[str, Any]:
    """The user's ``file.py:fn`` loaded (once per process) and called; picklable, so it runs in a worker."""
    return _loaded(spec)(data_source, solution_str, ground_truth, extra_info)


_WRONG_SCORE[user_spec_score] = -1.0


def resolve_reward_fn(
    spec: str | None = None,
    strict: bool = False,
    answer_format: str = DEFAULT_ANSWER_FORMAT,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> RewardFn:
    """A config value (``reward.scorer``, ``reward.strict``, ``reward.answer_format``) -> a reward function.

    The result has verl's signature and runs under ``timeout_s`` (see the module docstring).
    """
    if answer_format not in ANSWER_FORMATS:
        raise RewardFunctionError(
            f"reward.answer_format={answer_format!r}: choose one of {sorted(ANSWER_FORMATS)}"
        )
    if spec is None or spec == "auto":
        if strict:
            return partial(compute_score_strict, answer_format=answer_format, timeout_s=timeout_s)
        return partial(compute_score, timeout_s=timeout_s)
    if spec in _BY_NAME:
        fn = _BY_NAME[spec]
        if strict and _base(fn) is score_math_answer:
            fn = partial(math_dapo_score, answer_format=answer_format)
        if spec == "math_strict":
            fn = partial(math_dapo_score, answer_format=answer_format)
        return partial(run_scorer, fn, timeout_s=timeout_s)
    if ":" in spec:
        if strict:
            raise RewardFunctionError(
                f"reward.strict applies to the built-in math scorer, not to the user function {spec!r}; unset one"
            )
        load_reward_fn(spec)  # fail here, in the caller, on a bad spec
        return partial(run_scorer, partial(user_spec_score, spec), timeout_s=timeout_s)
    raise RewardFunctionError(
        f"reward function {spec!r}: not a registered name {sorted(_BY_NAME)} and not 'path/to/file.py:function'"
    )


def as_score_dict(result: Any, spec: str | None = None) -> dict[str, Any]:
    """Normalise a reward function's return value to a dict with a float ``score``."""
    if isinstance(result, dict):
        if "score" not in result:
            raise RewardFunctionError(
                f"reward function {spec or 'auto'!r} returned a dict without 'score': {result}"
            )
        return {**result, "score": float(result["score"])}
    if isinstance(result, (int, float)):
        return {"score": float(result)}
    raise RewardFunctionError(
        f"reward function {spec or 'auto'!r} returned {type(result).__name__}; expected a float or a dict with 'score'"
    )


register_reward("math", score_math_answer)
register_reward("math_strict", math_dapo_score)
for _name in ("math_dapo", "math_dapo_reasoning", *REFERENCE_MATH_VERIFY_SOURCES):
    register_reward(_name, score_math_answer)
for _name in REFERENCE_GSM8K_SOURCES:
    register_reward(_name, gsm8k_score)
for _prefix in REFERENCE_MATH_DAPO_PREFIXES:
    register_reward(_prefix, score_math_answer, prefix=True)
