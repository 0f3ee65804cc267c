"""Reward registry, user functions from files, and the errors for ones that do not import."""

import pytest

from sdpg_mcore.rewards import (
    RewardFunctionError,
    compute_score,
    load_reward_fn,
    math_dapo_score,
    register_reward,
    resolve_reward_fn,
    reward_fn_for,
)
from sdpg_mcore.rewards.reference_sources import gsm8k_score
from sdpg_mcore.rewards.registry import as_score_dict


def test_dispatch_exact_prefix_default():
    calls = []

    def custom(data_source, solution_str, ground_truth, extra_info=None):
        calls.append((data_source, extra_info))
        return 0.25

    register_reward("unit_test_source", custom)
    register_reward("unit_test_prefix", custom, prefix=True)
    assert compute_score("unit_test_source", "x", "y", {"k": 1}) == 0.25
    assert compute_score("unit_test_prefix_v2", "x", "y") == 0.25
    assert calls == [("unit_test_source", {"k": 1}), ("unit_test_prefix_v2", None)]
    assert reward_fn_for("never_registered") is reward_fn_for("math")
    assert reward_fn_for("openai/gsm8k") is gsm8k_score
    assert reward_fn_for("unit_test_prefix") is custom and reward_fn_for("math_strict") is math_dapo_score
    assert resolve_reward_fn(None).func is compute_score and resolve_reward_fn("auto").func is compute_score


def test_load_from_file_and_module(tmp_path):
    path = tmp_path / "rw.py"
    path.write_text("def f(data_source, solution_str, ground_truth, extra_info=None):\n    return 1\nX = 3\n")
    fn = load_reward_fn(f"{path}:f")
    assert fn("d", "s", "g") == 1
    assert load_reward_fn(f"{path}:f") is fn  # the module is loaded once
    assert resolve_reward_fn(f"{path}:f")("d", "s", "g") == 1  # run in the reward worker
    assert load_reward_fn("sdpg_mcore.rewards.math_dapo:math_dapo_score")("m", "Answer: 1", "1")["score"] == 1


@pytest.mark.parametrize(
    ("content", "spec_tail", "problem"),
    [
        (None, "missing.py:f", "does not exist"),
        ("def f(:\n", "rw.py:f", "importing .* failed with SyntaxError"),
        ("import not_a_module_xyz\n", "rw.py:f", "failed with ModuleNotFoundError"),
        ("def g(): pass\n", "rw.py:f", r"has no function 'f'; found \['g'\]"),
        ("f = 3\n", "rw.py:f", "'f' is a int, not a function"),
        ("", "rw.py", "expected 'path/to/file.py:function_name'"),
    ],
)
def test_bad_user_functions_are_named(tmp_path, content, spec_tail, problem):
    if content is not None:
        (tmp_path / "rw.py").write_text(content)
    spec = f"{tmp_path}/{spec_tail}"
    with pytest.raises(RewardFunctionError, match=problem):
        resolve_reward_fn(spec) if ":" in spec_tail else load_reward_fn(spec)


def test_unknown_names_and_modules():
    with pytest.raises(RewardFunctionError, match="not a registered name"):
        resolve_reward_fn("no_such_scorer")
    with pytest.raises(RewardFunctionError, match="importing module 'no_such_pkg_xyz' failed"):
        load_reward_fn("no_such_pkg_xyz:f")


def test_return_values_are_checked():
    assert as_score_dict(True) == {"score": 1.0}
    assert as_score_dict({"score": 1, "acc": True}) == {"score": 1.0, "acc": True}
    with pytest.raises(RewardFunctionError, match="without 'score'"):
        as_score_dict({"acc": True})
    with pytest.raises(RewardFunctionError, match="returned str"):
        as_score_dict("1")


def test_strict_mode_is_the_reference_dispatch(tmp_path):
    """The strict mode's wiring, on values written by hand; that its scores are the reference's own is
    checked on every case of ``fixtures/reference_scores.json`` (``tests/tools/test_check_reward_agreement.py``)."""
    from sdpg_mcore.rewards import RewardRequest, RewardScorer, UnknownDataSourceError, compute_score_strict

    response, truth = "\\boxed{\\frac12}", "0.5"
    assert resolve_reward_fn("auto", strict=True).func is compute_score_strict
    assert compute_score_strict("aime24", response, truth, answer_format="boxed")["score"] == -1.0
    assert compute_score_strict("aime24", "\\boxed{0.5}", truth, answer_format="boxed")["score"] == 1.0
    # answer_colon (the reference default) reads only the Answer: line, never a box.
    assert compute_score_strict("aime24", "\\boxed{0.5}", truth)["score"] == -1.0
    assert compute_score_strict("aime24", "Answer:\n0.5", truth) == {"score": 1.0, "acc": True, "pred": "0.5"}
    assert (
        resolve_reward_fn("math", strict=True, answer_format="boxed")("m", response, truth)["score"] == -1.0
    )
    # math-verify sources score 0/1 with equivalence; gsm8k reads "#### n".
    assert compute_score_strict("math_500", response, truth) == 1.0
    assert compute_score_strict("HuggingFaceH4/MATH-500", "\\boxed{0.6}", truth) == 0.0
    assert compute_score_strict("openai/gsm8k", "so #### 1,000", "1000") == 1.0
    assert compute_score_strict("openai/gsm8k", "\\boxed{1000}", "1000") == 0.0
    with pytest.raises(UnknownDataSourceError, match="no reference scorer for data_source='my_set'") as err:
        compute_score_strict("my_set", response, truth)
    assert isinstance(err.value, NotImplementedError)  # as the reference raises
    with pytest.raises(RewardFunctionError, match="answer_format='latex'"):
        resolve_reward_fn("auto", strict=True, answer_format="latex")
    register_reward("unit_test_custom_strict", lambda *a, **k: 0.5)
    assert compute_score_strict("unit_test_custom_strict", response, truth) == 0.5
    path = tmp_path / "rw.py"
    path.write_text("def f(*a, **k):\n    return 1.0\n")
    with pytest.raises(RewardFunctionError, match="reward.strict applies to the built-in math scorer"):
        resolve_reward_fn(f"{path}:f", strict=True)
    scorer = RewardScorer("auto", strict=True, answer_format="boxed", num_workers=0)
    assert [r.score for r in scorer.score([RewardRequest("math", response, truth)])] == [-1.0]
