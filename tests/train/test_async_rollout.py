"""train/async_rollout.py: overlapped rollouts on the real trainer and dev server: bounded staleness,
and a checkpoint taken with a rollout in flight resumes with every prompt used exactly once."""

import json
import subprocess
import sys

import pytest
from launch_testlib import (
    RECIPE,
    clean_env,
    launch_overrides,
    logged_steps,
    make_assets,
    train_rank,
    wait_for,
)

from sdpg_mcore.config import ConfigError, load_config
from sdpg_mcore.train.async_rollout import staleness
from sdpg_mcore.train.batch import Response


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("async"))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _launch(assets, run_dir, *extra, env=None):
    overrides = launch_overrides(assets, run_dir, "rollout.async_steps=1", *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides],
        env=env or clean_env(),
        stdout=open(run_dir.parent / f"{run_dir.name}.log", "w"),
        stderr=subprocess.STDOUT,
    )


def _finish(proc, run_dir, timeout_s=600):
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]


def test_staleness_counts_versions_behind_the_trainer():
    def response(version):
        return Response(0, [1], [1], [2], [0.0], weight_version=version)

    # Step 5 trains from version 4: samples from versions 3 and 4 lag 1 and 0.
    out = staleness([response(3), response(4), response(4), response(3)], step=5)
    assert out == {"rollout/version_lag_max": 1.0, "rollout/version_lag_mean": 0.5}


def test_async_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="rollout.async_steps"):
        load_config(RECIPE, ["rollout.async_steps=-1"])


@pytest.mark.parametrize(
    "servers",
    [
        pytest.param([], id="one-server"),
        pytest.param(
            ["rollout.num_servers=2", "rollout.router=true"], id="two-behind-router", marks=pytest.mark.slow
        ),
    ],
)
def test_async_samples_lag_at_most_one_version(assets, tmp_path, servers):
    """async_steps=1: step 1 samples the initial weights; every later step's samples are at most one
    version behind the trainer, the rollout of step s started from version s - 2, and the trainer's
    old log-probs are still compared with the rollout's. Pauses and pushes reach every worker."""
    run_dir = tmp_path / "run"
    extra = ["trainer.total_steps=4", "trainer.save_interval=0", *servers]
    _finish(_launch(assets, run_dir, *extra), run_dir)
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["rollout/version_lag_max"] == 0 and records[0]["async/start_lag"] == 0
    for record in records[1:]:
        assert record["async/start_lag"] == 1, record
        assert 0 <= record["rollout/version_lag_mean"] <= record["rollout/version_lag_max"] <= 1, record
        assert record["logprob_mismatch"] is not None and record["logprob_mismatch"] >= 0
    # Fresh prompts each step, none skipped: the cursor moves one batch (2 prompts) per step.
    assert [(r["data/epoch"], r["data/position"]) for r in records] == [(0, 2), (0, 4), (0, 6), (0, 8)]


@pytest.mark.slow
def test_resumed_async_run_uses_every_prompt_once(assets, tmp_path):
    """Checkpoint-and-exit (the save file) while the next step's rollout is in flight, then resume:
    the in-flight prompts are regenerated, none lost or trained twice."""
    run_dir, save_file = tmp_path / "run", tmp_path / "SAVE_NOW"
    env = clean_env() | {"SDPG_SAVE_FILE": str(save_file)}
    total = 6
    proc = _launch(assets, run_dir, f"trainer.total_steps={total}", "trainer.save_interval=0", env=env)
    try:
        wait_for(lambda: logged_steps(run_dir) or proc.poll() is not None, 600, "the first step's metrics")
        save_file.touch()
    finally:
        _finish(proc, run_dir)
    stopped = logged_steps(run_dir)[-1]
    assert stopped < total, "the run ended before the save request; nothing was in flight"
    saved = json.loads((run_dir / "checkpoints" / f"step_{stopped:08d}" / "trainer_state.json").read_text())
    assert saved["extra_state"]["sampler"]["position"] == 2 * stopped  # in-flight draws not counted

    _finish(_launch(assets, run_dir, f"trainer.total_steps={total}", "trainer.save_interval=0"), run_dir)
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    # Each step trained the next 2 prompts of the epoch's order: every prompt once, in order.
    assert [(r["data/epoch"], r["data/position"]) for r in records] == [
        (0, 2 * s) for s in range(1, total + 1)
    ]
    # The rollout in flight at the checkpoint was regenerated from the resumed weights (version `stopped`).
    assert records[stopped]["async/start_lag"] == 0


@pytest.mark.slow
def test_async_with_two_data_parallel_ranks(assets, tmp_path):
    """Rank 0 generates in the background; both ranks take the same responses and sampler state,
    and the pushes stay collective (disk sync barriers over both ranks)."""
    from sdpg_mcore.parallel.spawn import spawn_ranks

    run_dir = tmp_path / "dp2"
    overrides = launch_overrides(assets, run_dir, "rollout.async_steps=1", "trainer.total_steps=3")
    spawn_ranks(train_rank, 2, args=(overrides + ["trainer.save_interval=0"],), timeout_s=900)
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["async/start_lag"] for r in records] == [0, 1, 1]
    assert all(r["rollout/version_lag_max"] <= 1 for r in records)
    saved = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert saved["extra_state"]["sampler"]["position"] == 6


@pytest.mark.slow
def test_async_dynamic_sampling_cursor_counts_every_drawn_batch(assets, tmp_path):
    """DAPO dynamic sampling in the background thread draws extra batches; the trainer's cursor moves
    by exactly the batches each step's rollout drew, so a checkpoint skips none and repeats none."""
    run_dir = tmp_path / "dyn"
    extra = ["trainer.total_steps=3", "trainer.save_interval=0", "rollout.dynamic_sampling=true"]
    extra += ["rollout.max_num_gen_batches=3", "algorithm.name=dapo"]
    _finish(_launch(assets, run_dir, *extra), run_dir)
    records = _records(run_dir)
    drawn = 0
    for record in records:
        drawn += 2 * record["dynamic/num_gen_batches"]  # 2 prompts a batch, 32 prompts an epoch
        assert record["data/epoch"] * 32 + record["data/position"] == drawn, record
