"""Whole tiny runs (``sdpg-train`` as a process) with a rollout server killed (``kill -9`` of its process
group) at a random moment: every step finishes, the console shows no traceback, the run's key is
found only in its 0600 file, and after ``kill -9`` of the trainer nothing it started is alive 5 s later.

The moment is random but printed with its seed (``pytest -s``) so that a failure can be replayed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from auth_testlib import GENERATE, ROUTER_ROUTES, SERVER_ROUTES, answers_without_the_key
from launch_testlib import RECIPE, clean_env, launch_overrides, logged_steps, make_assets, wait_for

from sdpg_mcore.parallel.lifetime import preexec_die_with_parent

SERVER_MARKERS = ("sdpg_mcore.rollout.dev_server", "sglang.launch_server")
RUN_TAG = "SDPG_FAULT_TEST_RUN"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("run_faults"), sft_steps=3, num_train=64)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def servers_of(trainer_pid: int) -> list[int]:
    """The rollout servers the trainer runs (process group leaders)."""
    return sorted(
        p.pid
        for p in psutil.Process(trainer_pid).children(recursive=True)
        if any(m in cmdline(p) for m in SERVER_MARKERS) and os.getpgid(p.pid) == p.pid
    )


def rank_log(run_dir: Path, rank: int = 0) -> str:
    return (run_dir / "logs" / f"rank_{rank}.log").read_text()


def option(process: psutil.Process, name: str) -> str:
    args = process.cmdline()
    return args[args.index(name) + 1]


def assert_keyed(trainer_pid: int, run_dir: Path) -> None:
    """The router and the two servers the trainer started refuse every route the trainer calls
    without the run's key, or with a wrong one (401), and serve with it; the key is on none of their
    command lines. The weight-update routes taking the key: the run's own pushes every step
    (``init_weights_update_group``, ``update_weights_from_distributed``,
    ``destroy_weights_update_group``, ``update_weight_version``; asynchronous, ``pause_generation``
    and ``continue_generation`` around them); a refused one ends the run."""
    from sdpg_mcore.rollout.http import http_json

    key = (run_dir / "secrets" / "rollout_api_key").read_text().strip()
    processes = psutil.Process(trainer_pid).children(recursive=True)
    # The router renames itself ("sglang::router", no arguments left): its URL is in the rank's log.
    (router,) = re.findall(r"rollout servers up: .* \(router (http://[0-9.:]+)\)", rank_log(run_dir))
    servers = [
        f"http://127.0.0.1:{option(p, '--port')}" for p in processes if p.pid in servers_of(trainer_pid)
    ]
    assert len(servers) == 2, servers
    answers = {(router, *sent): a for sent, a in answers_without_the_key(router, ROUTER_ROUTES, key).items()}
    for server in servers:
        answers |= {
            (server, *sent): a for sent, a in answers_without_the_key(server, SERVER_ROUTES, key).items()
        }
    wrong = {sent: answer for sent, answer in answers.items() if answer[0] != 401}
    assert len(answers) == 3 * (len(ROUTER_ROUTES) + 2 * len(SERVER_ROUTES)) and not wrong, wrong
    assert http_json(f"{router}/get_model_info", timeout_s=60)[0] in (401, 503)  # a worker refused it
    keyed = [(router, "GET", "/workers", None), (router, "GET", "/get_loads", None)]
    keyed += [
        (s, "GET", path, None) for s in servers for path in ("/model_info", "/server_info", "/v1/loads")
    ]
    keyed += [(base, "POST", "/generate", GENERATE) for base in (router, *servers)]
    for base, method, path, body in keyed:
        # The router answers 503 while it counts its workers unhealthy: SGLang on loaded cores can
        # answer its health probes late. The run's own client retries then; so does this check.
        served = functools.partial(
            http_json, f"{base}{path}", body, method=method, api_key=key, timeout_s=120
        )
        wait_for(lambda served=served: served()[0] == 200, 300, f"{method} {base}{path} with the key")
    assert not [p.pid for p in processes if key in cmdline(p)]


def launch(assets, run_dir: Path, *extra: str, tag: str = "") -> subprocess.Popen:
    """``sdpg-train`` on the tiny recipe; its console goes to ``RUN_DIR.console``. ``tag`` goes into its
    environment (``RUN_TAG``), which every process it starts inherits: :func:`tagged` finds them."""
    overrides = launch_overrides(assets, run_dir, *extra)
    log = open(run_dir.parent / f"{run_dir.name}.console", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides],
        env={**clean_env(), RUN_TAG: tag}, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=preexec_die_with_parent(),
    )  # fmt: skip


def tagged(tag: str) -> list[psutil.Process]:
    """Every live process on the host whose environment carries ``RUN_TAG=tag``: what a trainer
    launched with ``tag`` started, however deep, including children re-parented after it died."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_TAG) == tag and alive(process):
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_a_server_at_random(
    trainer: subprocess.Popen, run_dir: Path, seed: int, last_step: int, max_delay_s: float
) -> None:
    """After a random one of the first ``last_step`` steps is logged, wait a random time below
    ``max_delay_s`` and ``kill -9`` a random server's process group: the kill lands anywhere in the
    next step (rollout, push, evaluation, asynchronous rollout); the steps after it show the run
    goes on, and give the restarted server time to come back."""
    rng = random.Random(seed)
    after = rng.randint(1, last_step)
    wait_for_steps(trainer, run_dir, after, timeout_s=1800)
    delay = rng.uniform(0, max_delay_s)
    time.sleep(delay)
    assert trainer.poll() is None, "the run ended before the kill"
    victim = rng.choice(servers_of(trainer.pid))
    print(f"seed {seed}: killed server pid {victim} {delay:.2f} s after step {after} was logged")
    os.killpg(victim, signal.SIGKILL)


def wait_for_steps(trainer: subprocess.Popen, run_dir: Path, steps: int, timeout_s: float = 600) -> None:
    """Until ``steps`` steps are logged or the trainer has ended."""
    wait_for(
        lambda: len(logged_steps(run_dir)) >= steps or trainer.poll() is not None, timeout_s, f"step {steps}"
    )


def finish(trainer: subprocess.Popen, run_dir: Path, timeout_s: float = 900) -> str:
    try:
        rc = trainer.wait(timeout=timeout_s)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    console = (run_dir.parent / f"{run_dir.name}.console").read_text()
    assert rc == 0, console[-5000:]
    return console


#: SGLang 0.5.23's own benign start-up race: its warm-up thread posts ``/freeze_gc`` (a GC tuning) as
#: its HTTP server starts listening, and logs the refused connection's traceback under this line; the
#: server then serves normally. Seen on both a first start and a restart (12:36 and 12:38 runs).
SGLANG_BENIGN = re.compile(r"post-warmup freeze_gc failed\n(?:(?!\[20\d\d-).*\n)*")


def assert_no_traceback(run_dir: Path) -> None:
    """``grep -rl Traceback RUN_DIR CONSOLE`` finds nothing: not in the console, the rank logs, the
    servers' and the router's logs (but for SGLang's ``SGLANG_BENIGN`` entries)."""
    searched = [str(run_dir), str(run_dir.parent / f"{run_dir.name}.console")]
    found = subprocess.run(["grep", "-rl", "Traceback", *searched], capture_output=True, text=True).stdout
    texts = {path: SGLANG_BENIGN.sub("", Path(path).read_text(errors="replace")) for path in found.split()}
    left = {path: text[-3000:] for path, text in texts.items() if "Traceback" in text}
    assert not left, left


def assert_key_only_in_its_file(run_dir: Path) -> None:
    """``grep -r KEY RUN_DIR CONSOLE`` finds the key in its 0600 file only: not in the rank logs, the
    servers' and the router's logs (under RUN_DIR), the metrics, nor the trainer's console."""
    key_file = run_dir / "secrets" / "rollout_api_key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) == 64
    searched = [str(run_dir), str(run_dir.parent / f"{run_dir.name}.console")]
    assert (run_dir / "rollout_logs").is_dir() and (run_dir / "logs" / "rank_0.log").is_file()
    found = subprocess.run(["grep", "-rl", key, *searched], capture_output=True, text=True).stdout.split()
    assert found == [str(key_file)], found


@pytest.mark.timeout(1200)  # 90-250 s on 2 cores; at load 70 it finished its 8 steps past 600 s
@pytest.mark.parametrize(
    "mode",
    # both slow: on a quiet machine the 8 steps take ~18 s and the random kill can land after the last
    # one (no restart to count); on a loaded one the run takes minutes
    [pytest.param("sync", marks=pytest.mark.slow), pytest.param("async", marks=pytest.mark.slow)],
    ids=["sync", "async"],
)
def test_builtin_server_killed_at_a_random_moment(assets, tmp_path, mode):
    """Disk sync, built-in server: a kill lands in a rollout, a push or an evaluation; the run goes on."""
    seed = int(os.environ.get("SDPG_FAULT_SEED", random.randrange(1 << 30)))
    run_dir = tmp_path / "run"
    extra = [
        "trainer.total_steps=8",
        "trainer.save_interval=0",
        f"rollout.async_steps={int(mode == 'async')}",
    ]
    extra += [f"eval.files=[{assets / 'data' / 'test.jsonl'}]", "eval.interval=2", "eval.n_samples=2"]
    trainer = launch(assets, run_dir, *extra)
    kill_a_server_at_random(trainer, run_dir, seed, last_step=6, max_delay_s=2.0)
    console = finish(trainer, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)), console[-3000:]
    assert_no_traceback(run_dir)
    assert (run_dir / "rollout_logs" / "server_0.log").read_text().count("==== ") == 2  # one restart
    assert "restarted with weights version" in rank_log(run_dir)
    assert_key_only_in_its_file(run_dir)


@pytest.mark.slow  # two real SGLang servers and a restart: 4-10 min on 2 busy cores
@pytest.mark.timeout(2400)  # the run's own limits below, not the suite's 600 s
@pytest.mark.parametrize("async_steps", [0, 1], ids=["sync", "async"])
def test_sglang_server_killed_at_a_random_moment(assets, tmp_path, async_steps):
    """Real SGLang, two servers behind the router, distributed sync: the killed server comes back into
    the update group; engine and trainer log-probs still agree (1e-4) on every synchronous step."""
    from sdpg_mcore.rollout.sglang_launch import sglang_python

    sglang_python()  # raises naming the setup command when real SGLang is missing
    seed = int(os.environ.get("SDPG_FAULT_SEED", random.randrange(1 << 30)))
    run_dir = tmp_path / "run"
    extra = ["trainer.total_steps=16", "trainer.save_interval=0", f"rollout.async_steps={async_steps}"]
    extra += ["rollout.backend=sglang", "rollout.num_servers=2", "rollout.router=true"]
    extra += ["rollout.weight_sync=distributed", "rollout.startup_timeout_s=900", "rollout.n=4"]
    # A dead server, not a stuck one (tests/faults/test_server_faults.py has those): on 2 busy cores
    # real SGLang's /health can stay unanswered past the default 60 s, and the watchdog would kill more.
    extra += ["rollout.watchdog_s=600"]
    trainer = launch(assets, run_dir, *extra)
    wait_for_steps(trainer, run_dir, 1, timeout_s=1200)
    assert_keyed(trainer.pid, run_dir)
    kill_a_server_at_random(trainer, run_dir, seed, last_step=8, max_delay_s=4.0)
    console = finish(trainer, run_dir, timeout_s=1800)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17)), console[-3000:]
    assert_no_traceback(run_dir)
    checked = records if not async_steps else records[:1]  # async: later steps sample older weights
    assert all(r["logprob_mismatch"] <= 1e-4 for r in checked), [r["logprob_mismatch"] for r in records]
    log = rank_log(run_dir)
    assert "waits out of the router for the next weight push" in log and "is back behind the router" in log
    assert_key_only_in_its_file(run_dir)


@pytest.mark.parametrize("moment", ["after-a-checkpoint", pytest.param("random", marks=pytest.mark.slow)])
def test_kill9_of_the_trainer_leaves_no_process(assets, tmp_path, moment):
    """``kill -9`` of an asynchronous run (two servers behind the router, a checkpoint every step): 5 s
    later no process that inherited its environment is alive (servers, router, reward workers,
    Megatron's checkpoint writers and spawned helpers).

    ``after-a-checkpoint``: Megatron's async writer has spawned its ``Manager`` by then (a spawned
    child runs no fork hook). ``random``: a random number of logged steps (0: start-up, once its first
    child exists), then a random delay: start-up, rollouts, pushes, steps or checkpoints."""
    seed = int(os.environ.get("SDPG_FAULT_SEED", random.randrange(1 << 30)))
    rng, tag = random.Random(seed), f"{seed}-{os.getpid()}-{time.time_ns()}"
    run_dir = tmp_path / "run"
    extra = ["trainer.total_steps=40", "trainer.save_interval=1", "rollout.async_steps=1"]
    extra += ["rollout.num_servers=2", "rollout.router=true"]
    trainer = launch(assets, run_dir, *extra, tag=tag)

    def children() -> list[psutil.Process]:
        return [p for p in tagged(tag) if p.pid != trainer.pid]

    if moment == "random":
        after, delay = rng.randint(0, 3), rng.uniform(0, 4.0)
        wait_for(lambda: children() or trainer.poll() is not None, 600, "the trainer's first child")
        wait_for_steps(trainer, run_dir, after)
        time.sleep(delay)
        print(f"seed {seed}: kill -9 of the trainer {delay:.2f} s after step {after} was logged")
    else:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(lambda: latest.exists() or trainer.poll() is not None, 600, "the first checkpoint")
        wait_for_steps(trainer, run_dir, 2)
    assert trainer.poll() is None, (run_dir.parent / "run.console").read_text()[-3000:]
    started = children()
    assert started, "the trainer has started nothing yet"
    if moment == "after-a-checkpoint":
        assert any("spawn_main" in cmdline(p) for p in started), "no spawned child (Megatron's Manager)"
        assert_keyed(trainer.pid, run_dir)  # the built-in servers and the router, as SGLang's below
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    time.sleep(5.0)
    survivors = {p.pid: cmdline(p)[:120] for p in tagged(tag)}
    for process in tagged(tag):
        process.kill()
    assert not survivors, survivors
