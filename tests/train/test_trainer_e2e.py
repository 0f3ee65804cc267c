"""The whole trainer on CPU: built-in rollout server over HTTP, Megatron policy, metrics, checkpoints, resume."""

import json
from pathlib import Path

import pytest
from launch_testlib import make_assets, train_rank

from sdpg_mcore.parallel.spawn import spawn_ranks

REQUIRED = (
    "step",
    "tokens_per_s",
    "reward_mean",
    "acc",
    "kl_mean",
    "entropy",
    "response_len_mean",
    "beta",
    "logprob_mismatch",
    "step_seconds",
    "grad_norm",
    "pg_loss",
    "clipfrac_high",
    "time/rollout",
    "time/update",
)
NOISY = ("time/", "step_seconds", "tokens_per_s", "rollout/generate_wall_s", "rollout/output_tokens_per_s")
#: The built-in server batches requests by arrival time (5 ms), so its fp32 log-probs of the same
#: tokens may come from other batch shapes and differ by a few ulps between runs; the mismatch with
#: the trainer's (itself ~1e-7) may then move by as much (seen: 2.6e-9 between two identical runs).
#: 1e-6: 8 fp32 ulps at |log p| = 1; stale weights give 1e-3 and more.
SERVER_ROUNDING = {"logprob_mismatch": 1e-6}


def assert_same_metrics(a: dict, b: dict) -> None:
    """Every metric of record ``a`` equals ``b``'s: timings aside, bit for bit but for the server's
    rounding (``SERVER_ROUNDING``)."""
    same = {k: v for k, v in a.items() if not k.startswith(NOISY) and k not in SERVER_ROUNDING}
    assert same == {k: b[k] for k in same}, a["step"]
    for key, tol in SERVER_ROUNDING.items():
        assert abs(a[key] - b[key]) <= tol, (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"), sft_steps=3, num_train=64)


def _run(assets, run_dir, *extra):
    overrides = [
        f"model.path={assets / 'model'}",
        f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        "data.batch_prompts=4",
        "data.mini_batch_prompts=2",
        "rollout.n=4",
        "logging.progress=false",
        "logging.tensorboard=false",
        "trainer.save_interval=1",
        *extra,
    ]
    spawn_ranks(train_rank, 1, args=(overrides,), timeout_s=300)
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_with_eval_and_checkpoint(assets, tmp_path):
    probed = tmp_path / "probed.jsonl"  # a second eval set, the only one the mechanism probe runs on
    probed.write_text((assets / "data" / "test.jsonl").read_text())
    records = _run(
        assets,
        tmp_path / "run",
        "trainer.total_steps=2",
        "eval.interval=2",
        "eval.n_samples=2",
        f"eval.files=[{assets / 'data' / 'test.jsonl'},{probed}]",
        "eval.mechanism=true",
        "eval.mechanism_sets=[probed]",
    )
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        missing = [k for k in REQUIRED if record.get(k) is None]
        assert not missing, missing
        assert record["kl_mean"] > 0 and record["num_responses"] == 16
    assert "eval/test/avg@2" in records[1] and "eval/test/pass@2" in records[1]
    assert records[1]["eval/probed/avg@2"] == records[1]["mech/probed/student_acc"]
    assert 0.0 <= records[1]["mech/probed/teacher_acc"] <= 1.0
    assert not [k for k in records[1] if k.startswith("mech/test/")]  # not in eval.mechanism_sets
    # Step 2 sampled with the weights pushed after step 1: engine and trainer log-probs agree (fp32).
    assert records[1]["logprob_mismatch"] < 1e-4
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip().endswith("2")
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.slow
def test_stop_and_resume_matches_uninterrupted(assets, tmp_path):
    full = _run(assets, tmp_path / "full", "trainer.total_steps=3")
    _run(assets, tmp_path / "split", "trainer.total_steps=3", "trainer.stop_at_step=2")
    resumed = _run(assets, tmp_path / "split", "trainer.total_steps=3")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert_same_metrics(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["ema", "initial"])
def test_guarded_teacher_stop_and_resume_matches_uninterrupted(assets, tmp_path, teacher):
    """``algorithm.teacher=ema`` (the average on the device, restored from the checkpoint) and
    ``initial`` through the whole trainer: a run stopped after step 2 and resumed gives the
    uninterrupted run's metrics; the teacher is not the policy (the KL differs from teacher=policy)."""
    extra = ("trainer.total_steps=3", f"algorithm.teacher={teacher}", "trainer.ema_weights=device")
    full = _run(assets, tmp_path / "full", *extra)
    _run(assets, tmp_path / "split", *extra, "trainer.stop_at_step=2")
    resumed = _run(assets, tmp_path / "split", *extra)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert_same_metrics(a, b)
    if teacher == "ema":
        assert (
            tmp_path / "split" / "checkpoints" / "step_00000003" / "teacher_ema" / "pp000_tp000.pt"
        ).is_file()
    policy = _run(assets, tmp_path / "policy", "trainer.total_steps=3")
    assert policy[2]["kl_mean"] != full[2]["kl_mean"]


@pytest.mark.slow
def test_dynamic_sampling_keeps_only_groups_with_reward_variance(assets, tmp_path):
    records = _run(
        assets,
        tmp_path / "dyn",
        "trainer.total_steps=1",
        "rollout.dynamic_sampling=true",
        "rollout.max_num_gen_batches=3",
        "algorithm.name=dapo",
    )
    record = records[0]
    assert 1 <= record["dynamic/num_gen_batches"] <= 3
    kept = record["dynamic/kept_groups"]
    # Kept groups are trained on; with none kept (this barely warm-started model) the first batch is used.
    assert kept <= 4 and record["num_responses"] == 4 * (kept or 4)


@pytest.mark.slow
def test_distributed_weight_sync(assets, tmp_path):
    records = _run(assets, tmp_path / "nccl", "trainer.total_steps=2", "rollout.weight_sync=distributed")
    assert records[1]["logprob_mismatch"] < 1e-4 and records[1]["time/weight_sync"] > 0


@pytest.mark.slow  # the turns and the bit-exact offload are in the default suite: tests/train/test_colocate.py
def test_colocated_run_trains_exactly_as_a_dedicated_one(assets, tmp_path):
    """rollout.colocated=true on the built-in server: the trainer offloads its state while the engine
    generates and takes it back to train (train/colocate.py), a checkpoint every step sends the engine
    back and pushes the weights again before the next rollout. Every metric equals a run whose server
    keeps its memory: the offload and the extra pushes change no bit (the server's own rounding aside)."""
    steps = ("trainer.total_steps=2", "trainer.save_interval=1")
    dedicated = _run(assets, tmp_path / "dedicated", *steps)
    colocated = _run(assets, tmp_path / "colocated", *steps, "rollout.colocated=true")
    assert [r["step"] for r in colocated] == [1, 2]
    assert colocated[1]["logprob_mismatch"] < 1e-4  # step 2 sampled the weights pushed after step 1
    for a, b in zip(dedicated, colocated):
        assert_same_metrics(a, b)
    assert (tmp_path / "colocated" / "checkpoints" / "latest").read_text().strip().endswith("2")
