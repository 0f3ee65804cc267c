"""Reward functions by name and by ``data_source``, and user functions from ``path/to/file.py:name``.

Every reward function has verl's signature, so functions written for verl work unchanged::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

A dict must carry ``score`` (other keys, e.g. ``acc`` and ``pred``, are logged).

``compute_score`` dispatches on ``data_source``: an exact registered name, then a registered prefix
(``aime24`` -> ``aime``), then the default scorer (``math``). ``resolve_reward_fn(spec)`` turns a
config value into a function: None/``auto`` -> that dispatcher, a registered name -> that scorer for
every sample, ``file.py:fn`` or ``package.module:fn`` -> the user's function.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdpg_mcore.rewards.math_dapo import strict_compute_score
from sdpg_mcore.rewards.math_scorer import math_compute_score

RewardFn = Callable[..., "float | dict[str, Any]"]

DEFAULT_REWARD = "math"

_BY_NAME: dict[str, RewardFn] = {}
_BY_PREFIX: dict[str, RewardFn] = {}


class RewardFunctionError(ValueError):
    """A reward function could not be loaded, or returned something that is not a score."""


def register_reward(name: str, fn: RewardFn, *, prefix: bool = False) -> None:
    """Register ``fn`` for ``data_source == name`` (or ``data_source.startswith(name)`` with ``prefix``)."""
    (_BY_PREFIX if prefix else _BY_NAME)[name] = fn


def registered_rewards() -> list[str]:
    return sorted(_BY_NAME) + sorted(f"{p}*" for p in _BY_PREFIX)


def reward_fn_for(data_source: str, strict: bool = False) -> RewardFn:
    """The function registered for ``data_source`` (exact, then longest prefix), else the default.

    With ``strict`` the default math scorer is swapped for the reference one wherever it is chosen.
    """
    if data_source in _BY_NAME:
        fn = _BY_NAME[data_source]
    else:
        matches = [p for p in _BY_PREFIX if data_source.startswith(p)]
        fn = _BY_PREFIX[max(matches, key=len)] if matches else _BY_NAME[DEFAULT_REWARD]
    return strict_compute_score if strict and fn is math_compute_score else fn


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> float | dict[str, Any]:
    """Score one response with the reward function registered for its ``data_source``."""
    return reward_fn_for(data_source)(data_source, solution_str, ground_truth, extra_info)


def compute_score_strict(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None
) -> float | dict[str, Any]:
    """:func:`compute_score` with the reference (strict) scorer in place of the default math scorer."""
    return reward_fn_for(data_source, strict=True)(data_source, solution_str, ground_truth, extra_info)


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


def resolve_reward_fn(spec: str | None = None, strict: bool = False) -> RewardFn:
    """A config value (``reward.scorer``, ``reward.strict``) -> a reward function (see the module docstring)."""
    if spec is None or spec == "auto":
        return compute_score_strict if strict else compute_score
    if spec in _BY_NAME:
        fn = _BY_NAME[spec]
        return strict_compute_score if strict and fn is math_compute_score else fn
    if ":" in spec:
        if strict:
            raise RewardFunctionError(
                f"reward.strict applies to the built-in math scorer, not to the user function {spec!r}; unset one"
            )
        return load_reward_fn(spec)
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


register_reward("math", math_compute_score)
register_reward("math_strict", strict_compute_score)
for _name in ("math_dapo", "math_dapo_reasoning", "math_500", "HuggingFaceH4/MATH-500", "lighteval/MATH"):
    register_reward(_name, math_compute_score)
for _prefix in ("aime", "amc"):
    register_reward(_prefix, math_compute_score, prefix=True)
