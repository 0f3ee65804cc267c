"""train/trainer.py: checkpoint-and-exit on request (SIGUSR1 or the save file), agreed by every rank."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_testlib import RECIPE, clean_env, launch_overrides, logged_steps, make_assets, wait_for

from sdpg_mcore.parallel.spawn import spawn_ranks


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("trainer"))


def test_save_file_checkpoints_and_exits_zero(assets, tmp_path):
    """The save file (slurm/lib.sh's SIGUSR1 path) stops the trainer after a step, with a checkpoint, exit 0."""
    run_dir = tmp_path / "run"
    save_file = tmp_path / "SAVE_NOW"
    # Enough steps that the request, made after step 1, always lands before the run would end by itself
    # (a tiny step takes well under a second on an idle machine).
    overrides = launch_overrides(assets, run_dir, "trainer.total_steps=10", "trainer.save_interval=0")
    env = clean_env() | {"SDPG_SAVE_FILE": str(save_file)}
    log = open(tmp_path / "trainer.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: logged_steps(run_dir) or proc.poll() is not None, 300, "the first step's metrics")
        save_file.touch()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "trainer.log").read_text()
    assert rc == 0, text[-3000:]
    steps = logged_steps(run_dir)
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
