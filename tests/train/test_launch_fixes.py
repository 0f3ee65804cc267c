"""Launch fixes for Slurm: weight sync through a router, checkpoint-and-exit on request, Slurm world size.

Real processes throughout: an sglang-router in front of a dev server, the trainer as a subprocess
(``python -m sdpg_mcore.cli``), SIGUSR1 delivered to real gloo ranks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdpg_mcore.cli import launch_world_size, main
from sdpg_mcore.parallel.spawn import find_free_port, spawn_ranks
from sdpg_mcore.rollout.servers import http_json

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "tiny" / "sdpg.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random-init tiny model (no warm start: seconds) and a small arithmetic data set."""
    root = tmp_path_factory.mktemp("launch")
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model

    make_tiny_model.make_tiny_model(root / "model", seed=0, sft_steps=0, batch_size=4, eval_prompts=2)
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--synthetic", "arithmetic"]
        + ["--out", str(root / "data"), "--format", "jsonl", "--num-train", "32", "--num-test", "4"],
        check=True,
        capture_output=True,
    )
    return root


def _overrides(assets, run_dir, *extra):
    return [
        f"model.path={assets / 'model'}",
        f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        "data.batch_prompts=2",
        "data.mini_batch_prompts=2",
        "data.max_response_length=8",
        "rollout.n=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "rollout.weight_sync=disk",
        *extra,
    ]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDPG_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    # A free rendezvous port: the default 29500 is shared with every other test on this machine.
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port())
    )
    return env


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _router_healthy(url: str, worker: str) -> bool:
    try:
        status, body = http_json(f"{url}/workers", timeout_s=2.0)
    except OSError:
        return False
    return status == 200 and any(w["url"] == worker and w.get("is_healthy") for w in body["workers"])


def test_external_router_weight_sync_reaches_the_worker(assets, tmp_path):
    """With rollout.urls=[router], generation goes through the router and the weights reach its worker."""
    worker_port, router_port, metrics_port = find_free_port(), find_free_port(), find_free_port()
    worker = f"http://127.0.0.1:{worker_port}"
    router = f"http://127.0.0.1:{router_port}"
    procs = []
    with open(tmp_path / "worker.log", "wb") as wlog, open(tmp_path / "router.log", "wb") as rlog:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sdpg_mcore.rollout.dev_server", "--model-path", str(assets / "model")]
                + ["--port", str(worker_port), "--num-threads", "1"],
                stdout=wlog,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
                + [
                    "--port",
                    str(router_port),
                    "--worker-urls",
                    worker,
                    "--prometheus-port",
                    str(metrics_port),
                ],
                stdout=rlog,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        )
        try:
            _wait(lambda: _router_healthy(router, worker), 120, "the router to list a healthy worker")
            # The bug: the router does not serve weight updates, so pushing to rollout.urls 404s.
            assert http_json(f"{router}/update_weights_from_disk", {"model_path": "x"})[0] == 404
            from sdpg_mcore.train.rollout_io import discover_workers

            assert discover_workers([router]) == [worker]
            assert discover_workers([worker]) == [worker]
            run_dir = tmp_path / "run"
            overrides = _overrides(
                assets,
                run_dir,
                "rollout.backend=external",
                f"rollout.urls=[{router}]",
                "trainer.total_steps=2",
            )
            cmd = [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides]
            done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            assert _steps(run_dir) == [1, 2]
            status, body = http_json(f"{worker}/get_weight_version")
            assert status == 200 and body["weight_version"] == "2", body
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)


def test_save_file_checkpoints_and_exits_zero(assets, tmp_path):
    """The save file (slurm/lib.sh's SIGUSR1 path) stops the trainer after a step, with a checkpoint, exit 0."""
    run_dir = tmp_path / "run"
    save_file = tmp_path / "SAVE_NOW"
    # Enough steps that the request, made after step 1, always lands before the run would end by itself
    # (a tiny step takes well under a second on an idle machine).
    overrides = _overrides(assets, run_dir, "trainer.total_steps=10", "trainer.save_interval=0")
    env = _env() | {"SDPG_SAVE_FILE": str(save_file)}
    log = open(tmp_path / "trainer.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: _steps(run_dir) or proc.poll() is not None, 300, "the first step's metrics")
        save_file.touch()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "trainer.log").read_text()
    assert rc == 0, text[-3000:]
    steps = _steps(run_dir)
    assert steps and steps[-1] < 10, steps  # stopped early: total_steps=10 never ran
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"{steps[-1]:08d}"), (latest, steps)  # save_interval=0: only the request saved
    assert not save_file.exists()
    assert "save requested" in text


def _signal_one_rank(rank, world_size, save_file):
    from sdpg_mcore.train.trainer import SaveRequest

    request = SaveRequest(Path(save_file))
    before = request.requested()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # the process lives on: the handler only sets a flag
    after = request.requested()
    request.close(remove_file=False)
    return before, after, request.signalled


def test_sigusr1_on_one_rank_is_agreed_by_all(tmp_path):
    results = spawn_ranks(_signal_one_rank, 2, args=(str(tmp_path / "absent"),), timeout_s=120)
    assert results == [(False, True, False), (False, True, True)]


def _file_seen(rank, world_size, save_file):
    from sdpg_mcore.train.trainer import SaveRequest

    request = SaveRequest(Path(save_file))
    out = request.requested()
    request.close(remove_file=False)
    return out


def test_save_file_seen_by_every_rank(tmp_path):
    (tmp_path / "SAVE_AND_EXIT").touch()
    assert spawn_ranks(_file_seen, 2, args=(str(tmp_path / "SAVE_AND_EXIT"),), timeout_s=120) == [True, True]


SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NODELIST": "node[01-02]"}


def test_world_size_from_slurm_torchrun_or_nproc():
    assert launch_world_size(0, SLURM) == 4
    assert launch_world_size(0, {**SLURM, "RANK": "0", "WORLD_SIZE": "2"}) == 2  # torchrun wins
    assert launch_world_size(3, SLURM) == 3
    assert launch_world_size(0, {}) == 1


def test_cli_validates_the_config_for_the_slurm_world(monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert main(["--config", str(RECIPE), "--print-config", "parallel.tp=2"]) == 0
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(RECIPE), "--print-config", "parallel.tp=2"])
    assert exc.value.code == 2 and "world size 3" in capsys.readouterr().err
