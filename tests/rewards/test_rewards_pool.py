"""TimeoutPool, RewardScorer and the time-limited scorer: callable from anywhere, never stuck."""

import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdpg_mcore.rewards import (
    RewardFunctionError,
    RewardRequest,
    RewardScorer,
    TimeoutPool,
    call_with_timeout,
    compute_score,
    math_compute_score,
    resolve_reward_fn,
    score_math_answer,
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
    math_compute_score("math", "\\boxed{\\frac12}", "0.5")  # start the shared worker outside the timing
    start = time.monotonic()
    result = math_compute_score("math", PATHOLOGICAL, "1", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result == {"score": -1.0, "acc": False, "pred": "[TIMEOUT]", "timed_out": True}
    assert elapsed < 1.0 + 5.0, elapsed  # the limit plus killing the worker, on a busy machine
    assert compute_score("math", "\\boxed{\\frac12}", "0.5")["score"] == 1.0  # the replacement answers


def test_every_resolved_reward_is_time_limited(tmp_path):
    path = tmp_path / "slow_reward.py"
    path.write_text(
        "import time\n"
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    time.sleep(float(solution_str))\n"
        "    return 1.0\n"
    )
    fn = resolve_reward_fn(f"{path}:score", timeout_s=1.0)
    assert fn("x", "0", "y") == 1.0
    start = time.monotonic()
    assert fn("x", "60", "y") == {"score": -1.0, "acc": False, "pred": "[TIMEOUT]", "timed_out": True}
    assert time.monotonic() - start < 1.0 + 5.0
    strict = resolve_reward_fn("auto", strict=True, timeout_s=1.0)
    assert strict("math_500", PATHOLOGICAL, "1")["timed_out"] is True  # math-verify 0/1 source: 0 on timeout
    assert strict("math_500", PATHOLOGICAL, "1")["score"] == 0.0


def _doubled_units(n_bytes: int) -> str:
    return "\\boxed{1 " + "cm " * (n_bytes // 3) + "x}"


def test_extraction_and_cleaning_are_linear():
    """``\\boxed{1 cm cm ... x}`` was quadratic (12 KB: 3.7 s). 15x the input must cost ~15x, not 225x."""
    small, large = _doubled_units(12_000), _doubled_units(180_000)

    def best_of(text: str, n: int) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            score_math_answer("math", text, "1")
            times.append(time.perf_counter() - start)
        return min(times)

    t_small, t_large = best_of(small, 5), best_of(large, 3)
    # Linear: ~15x (measured 1 ms -> 50-150 ms on a shared CPU); the old quadratic: 3.7 s -> ~830 s.
    assert t_small < 0.5, t_small
    assert t_large < 100 * t_small + 0.5, (t_small, t_large)


UNGUARDED = textwrap.dedent(
    """
    import threading
    from sdpg_mcore.rewards import compute_score
    print("body", flush=True)
    print("main", compute_score("math", "\\\\boxed{\\\\frac12}", "0.5")["score"], flush=True)
    out = []
    t = threading.Thread(target=lambda: out.append(compute_score("math", "\\\\boxed{0.5}", "\\\\frac12")["score"]))
    t.start(); t.join()
    print("thread", out[0], flush=True)
    """
)


def test_unguarded_script_scores_once_and_does_not_rerun(tmp_path):
    """No ``if __name__ == '__main__'`` guard: workers must not re-execute the caller's script."""
    script = tmp_path / "plain_script.py"
    script.write_text(UNGUARDED)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n") == ["body", "main 1.0", "thread 1.0", ""], out.stdout


USER_POOLS = textwrap.dedent(
    """
    import multiprocessing as mp
    from sdpg_mcore.rewards import compute_score

    def score(i):
        return compute_score("math", f"\\\\boxed{{\\\\frac{{{i}}}{{2}}}}", str(i / 2))["score"]

    def run(method):
        with mp.get_context(method).Pool(2) as pool:  # daemonic workers: no multiprocessing children
            print(method, pool.map(score, range(1, 5)), flush=True)

    print("before", score(1), flush=True)  # the parent has a reward worker before it forks
    {main}
    """
)


@pytest.mark.parametrize(
    ("method", "main"),
    [("fork", 'run("fork")'), ("forkserver", 'if __name__ == "__main__":\n        run("forkserver")')],
)
def test_users_own_process_pools(tmp_path, method, main):
    """A fork pool of an unguarded script; a forkserver pool (which imports the main script) of a guarded one."""
    script = tmp_path / "pool_script.py"
    script.write_text(USER_POOLS.replace("{main}", main))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{method} [1.0, 1.0, 1.0, 1.0]" in out.stdout.split("\n"), (out.stdout, out.stderr[-2000:])


def test_threads_share_the_worker():
    with ThreadPoolExecutor(8) as ex:
        scores = list(
            ex.map(lambda i: compute_score("math", f"\\boxed{{{i}}}", str(i % 3))["score"], range(24))
        )
    assert scores == [1.0 if i == i % 3 else -1.0 for i in range(24)]


def test_inline_call_inside_a_worker():
    assert call_with_timeout(compute_score, "math", "\\boxed{4}", "4", timeout_s=60).value["score"] == 1.0


def test_scorer_batch_with_a_hung_call():
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
    with pytest.raises(RewardFunctionError, match="KeyError"):
        resolve_reward_fn(spec)("x", "boom", "a")


PARENT = textwrap.dedent(
    """
    import threading, time
    from sdpg_mcore.rewards import compute_score
    from sdpg_mcore.rewards.pool import shared_pool
    compute_score("math", "\\\\boxed{1}", "1")
    print(shared_pool()._workers[0].process.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("from_thread", [False, True])
def test_reward_worker_dies_with_a_killed_parent(tmp_path, from_thread):
    """kill -9 of the caller (no atexit runs) must not leave its reward worker behind."""
    import os
    import signal

    code = (
        PARENT
        if not from_thread
        else PARENT.replace(
            'compute_score("math", "\\\\boxed{1}", "1")',
            't = threading.Thread(target=compute_score, args=("math", "\\\\boxed{1}", "1")); t.start(); t.join()',
        )
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        if open(f"/proc/{worker_pid}/stat").read().split()[2] == "Z":  # exited, awaiting its reaper
            return
        time.sleep(0.2)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail(f"reward worker {worker_pid} outlived its killed parent")
