import os
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from sdpg_mcore.parallel.spawn import spawn_ranks, start_method


def _allreduce_rank(rank, world_size, scale):
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_spawn_ranks_runs_real_allreduce():
    assert spawn_ranks(_allreduce_rank, 3, args=(2.0,)) == [6.0, 6.0, 6.0]


def test_spawn_ranks_reports_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        spawn_ranks(_fail_on_rank_one, 2)


def _return_tensor(rank, world_size):
    return {"rank": rank, "values": torch.arange(4, dtype=torch.float64) * rank}


def test_spawn_ranks_returns_tensors_by_value():
    results = spawn_ranks(_return_tensor, 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert torch.equal(results[1]["values"], torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))


def _die_silently_on_rank_one(rank, world_size):
    import os
    import time

    if rank == 1:
        os._exit(3)  # no result, no traceback: as when a child cannot even import its function
    time.sleep(600)  # rank 0 would wait for rank 1 in a collective
    return rank


def test_spawn_ranks_fails_at_once_when_a_rank_dies_without_a_result():
    import time

    began = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"rank\(s\) \[1\] .* exited without a result \(exit codes \{1: 3\}\)"
    ):
        spawn_ranks(_die_silently_on_rank_one, 2, timeout_s=300)
    assert time.monotonic() - began < 60  # not the 300 s timeout


def _environment_and_threads(rank, world_size):
    return os.environ.get("SDPG_SPAWN_PROBE"), os.getcwd(), torch.get_num_threads(), os.getppid()


def test_cpu_ranks_fork_from_the_preloaded_server_yet_see_the_launcher_as_it_is_now(tmp_path, monkeypatch):
    """The fork server keeps the environment and directory it started with; each rank gets the
    launcher's current ones (and one OpenMP thread, set after torch was loaded in the server)."""
    assert start_method(0) == "forkserver" and start_method(1) == "spawn"
    fork = {"method": "forkserver"}  # what CPU machines use (GPU ones spawn: a fork would lose CUDA)
    spawn_ranks(_environment_and_threads, 1, **fork)  # the server runs from here on (if not before)
    monkeypatch.setenv("SDPG_SPAWN_PROBE", "set after the server started")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.chdir(tmp_path)
    results = spawn_ranks(_environment_and_threads, 2, env={"OMP_NUM_THREADS": "1"}, **fork)
    assert [r[:3] for r in results] == [("set after the server started", str(tmp_path), 1)] * 2
    assert {r[3] for r in results} != {os.getpid()}  # forked by the server, not by this process
    threads = spawn_ranks(_environment_and_threads, 1, env={"OMP_NUM_THREADS": "3"}, **fork)[0][2]
    assert threads == 3


LAUNCHER = r"""
import sys, time
from sdpg_mcore.parallel.spawn import spawn_ranks

def sleep_and_report(rank, world_size, path):
    import os, time
    with open(f"{path}.{rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    spawn_ranks(sleep_and_report, 2, args=(sys.argv[1],), method="forkserver")
"""


def test_ranks_die_within_5_s_of_a_kill_9_of_the_launcher(tmp_path):
    """``sdpg-train --nproc 2`` killed by SIGKILL: its fork server leaves, and the ranks with it."""
    import subprocess
    import sys
    import time

    from sdpg_mcore.parallel.lifetime import preexec_die_with_parent

    script, pids = tmp_path / "launcher.py", tmp_path / "pid"
    script.write_text(LAUNCHER)
    launcher = subprocess.Popen(
        [sys.executable, str(script), str(pids)], preexec_fn=preexec_die_with_parent()
    )
    files = [Path(f"{pids}.{rank}") for rank in range(2)]
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in files) and time.monotonic() < deadline:
        assert launcher.poll() is None, "the launcher ended before its ranks reported"
        time.sleep(0.1)
    ranks = [int(f.read_text()) for f in files]
    server = psutil.Process(ranks[0]).ppid()
    assert server != launcher.pid and psutil.Process(server).ppid() == launcher.pid
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in (*ranks, server)):
        time.sleep(0.05)
    survivors = [p for p in (*ranks, server) if _alive(p)]
    for pid in survivors:
        os.kill(pid, 9)
    assert not survivors


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


RECIPE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "bench_algos.yaml"


@pytest.fixture(scope="module")
def external_run(tmp_path_factory):
    """The argv of a tiny run against external servers (``URL`` to fill in): it starts quickly and
    waits on them."""
    from sdpg_mcore.data.arithmetic import split_problems, write_split_task
    from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("cli_run")
    model = save_tiny_hf_model(root / "model", arch="qwen3", seed=0)
    save_tiny_tokenizer(model, style="qwen")
    split = split_problems(max_operand=2, heldout_fraction=0.25, seed=0)
    files = write_split_task(root / "data", split, num_train=8, num_seen=2, seed=0)
    return lambda run_dir, url: [
        "--config",
        str(RECIPE),
        f"model.path={model}",
        f"data.train_files=[{files['train']}]",
        "eval.files=[]",
        f"trainer.run_dir={run_dir}",
        "rollout.backend=external",
        f"rollout.urls=[{url}]",
    ]


def test_a_cli_run_from_the_fork_server_writes_its_log_exit_code_and_cpu(external_run, tmp_path):
    """``start_cli_run`` (the algorithm benchmark's runs): the trainer's own error reaches the log file
    and the exit code, and the run counts its CPU seconds where its launcher can read them."""
    import json

    from sdpg_mcore.parallel.spawn import find_free_port, start_cli_run

    log, cpu = tmp_path / "train.log", tmp_path / "cpu.json"
    argv = external_run(tmp_path / "run", f"http://127.0.0.1:{find_free_port()}")  # nothing listens
    proc = start_cli_run(argv, dict(os.environ), log, cpu)
    proc.join(timeout=120)
    assert proc.exitcode not in (0, None)
    assert "is unreachable" in log.read_text()
    assert json.loads(cpu.read_text())["cpu_s"] > 0  # it loaded the data and the tokenizer first


def test_a_cli_run_is_a_session_of_its_own_that_killpg_stops(external_run, tmp_path):
    """The benchmark stops a run (and the servers it started) with ``os.killpg(run.pid)``: the run leads
    its own process group. Here it waits on an external server that accepts and never answers."""
    import signal
    import socket
    import time

    from sdpg_mcore.parallel.spawn import start_cli_run

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        argv = external_run(tmp_path / "run", f"http://127.0.0.1:{silent.getsockname()[1]}")
        proc = start_cli_run(argv, dict(os.environ), tmp_path / "train.log", tmp_path / "cpu.json")
        deadline = time.monotonic() + 30
        while proc.is_alive() and os.getsid(proc.pid) != proc.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.is_alive() and os.getpgid(proc.pid) == proc.pid
        os.killpg(proc.pid, signal.SIGTERM)
        proc.join(timeout=30)
    assert proc.exitcode is not None and proc.exitcode != 0
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the group is left
