import json
import math

from sdpg_mcore.train.metrics_log import MetricsLogger, PhaseTimer, read_metrics
from sdpg_mcore.train.progress import StepProgress, format_step_line


def test_jsonl_one_object_per_step_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.log(step, {"reward_mean": 0.1 * step, "kl_mean": float("nan")})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isclose(records[2]["reward_mean"], 0.3)
    assert records[0]["kl_mean"] is None  # NaN is not valid JSON
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_drops_steps_after_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.log(step, {"x": step})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=3)
    log.log(4, {"x": 40})
    log.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_disabled_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r", enabled=False, tensorboard=True)
    assert log.log(1, {"x": 1.0}) == {"step": 1, "x": 1.0}
    log.close()
    assert not (tmp_path / "r").exists()


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path / "run", wandb_mode="online", config={"a": 1})
    assert log._wandb is not None and log._wandb.settings.mode == "offline"
    log.log(1, {"reward_mean": 0.5})
    log.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_phase_timer_and_progress_line(tmp_path):
    timer = PhaseTimer()
    with timer.phase("rollout"):
        pass
    with timer.phase("rollout"):
        pass
    times = timer.pop()
    assert set(times) == {"time/rollout"} and times["time/rollout"] >= 0
    assert timer.pop() == {}
    line = format_step_line(3, 20, {"reward_mean": 0.25, "acc": 0.5, "time/rollout": 1.234})
    assert line == "step 3/20 reward 0.25 acc 0.5 | rollout 1.2s"
    bar = StepProgress(5, 0, enabled=True)
    bar.step_done(1, {"acc": 0.1})
    bar.close()
