"""TimeoutPool and RewardScorer: order, errors, and a hung call costing one time limit, not a step."""

import time

import pytest

from sdpg_mcore.rewards import (
    RewardFunctionError,
    RewardRequest,
    RewardScorer,
    TimeoutPool,
    math_compute_score,
    verify_with_timeout,
)

PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the power tower: never returns


def test_pool_keeps_order_reports_errors_and_replaces_a_hung_worker():
    with TimeoutPool(num_workers=2, preload=()) as pool:
        results = pool.map(int, [("1",), ("x",), ("3",)], timeout_s=30)
        assert [r.value for r in results] == [1, None, 3]
        assert results[1].error is not None and "ValueError" in results[1].error
        start = time.monotonic()
        hung = pool.map(time.sleep, [(60,), (0,), (0,)], timeout_s=1.0)
        assert time.monotonic() - start < 20
        assert hung[0].timed_out and not hung[1].timed_out and hung[2].ok
        assert pool.num_timeouts == 1 and pool.num_restarts == 1
        assert pool.run(int, "7", timeout_s=30).value == 7  # the replacement works


def test_pathological_expression_returns_within_its_time_limit():
    math_compute_score("math", "\\boxed{\\frac12}", "0.5")  # start the verify worker outside the timing
    start = time.monotonic()
    result = math_compute_score("math", PATHOLOGICAL, "1", verify_timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result == {"score": -1.0, "acc": False, "pred": "9^{9^{9^{9}}}", "timed_out": True}
    assert elapsed < 1.0 + 5.0, elapsed  # the limit plus killing the worker, on a busy machine
    assert verify_with_timeout("\\frac{1}{2}", "0.5") is True  # the replaced worker answers


def test_scorer_batch_with_a_hung_call(tmp_path):
    requests = [RewardRequest("math_dapo", PATHOLOGICAL, "1")] + [
        RewardRequest("math_dapo", f"\\boxed{{\\frac{{{i}}}{{2}}}}", str(i / 2)) for i in range(1, 9)
    ]
    requests.append(RewardRequest("math_dapo", "\\boxed{5}", "6"))
    with RewardScorer("auto", num_workers=2, timeout_s=2.0) as scorer:
        scorer.score(requests[1:3])  # warm the workers
        start = time.monotonic()
        results = scorer.score(requests)
        elapsed = time.monotonic() - start
    assert results[0].timed_out and results[0].score == -1.0 and results[0].acc is False
    assert [r.score for r in results[1:9]] == [1.0] * 8 and all(r.acc for r in results[1:9])
    assert results[9].score == -1.0 and not results[9].timed_out
    assert scorer.num_timeouts == 1
    assert elapsed < 2.0 + 8.0, elapsed


def test_user_function_from_file_runs_in_workers_and_its_errors_surface(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    if solution_str == 'boom':\n"
        "        raise KeyError('exploded')\n"
        "    return {'score': float(solution_str == ground_truth), 'acc': solution_str == ground_truth}\n"
    )
    spec = f"{path}:score"
    requests = [RewardRequest("x", "a", "a"), RewardRequest("x", "b", "a")]
    with RewardScorer(spec, num_workers=1, timeout_s=30) as scorer:
        assert [r.score for r in scorer.score(requests)] == [1.0, 0.0]
        with pytest.raises(
            RewardFunctionError, match=r"failed on response 1 \(data_source='x'\)[\s\S]*KeyError"
        ):
            scorer.score([requests[0], RewardRequest("x", "boom", "a")])
    inline = RewardScorer(spec, num_workers=0)
    assert [r.score for r in inline.score(requests)] == [1.0, 0.0]
