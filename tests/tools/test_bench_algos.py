"""tools/bench_algos.py: the summary of finished runs (mean ± s.e. over seeds, paired differences; table,
JSON, figure) and the stop without tuned settings.

The task files are ``sdpg_mcore.data.arithmetic``'s (tests/data/test_data_arithmetic.py)."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_algos.py"


def _fake_run(out, algo, seed, accs, interval=10):
    rdir = out / "runs" / f"{algo}_s{seed}"  # where the tool keeps each run
    rdir.mkdir(parents=True)
    rows = []
    for i, acc in enumerate(accs):
        step = (i + 1) * interval
        rows.append({"step": step - 1, "reward_mean": -0.8})
        rows.append(
            {
                "step": step,
                "reward_mean": -0.6,
                "eval/heldout/avg@8": acc,
                "eval/seen/avg@8": acc + 0.25,
                "mech/heldout/teacher_acc": 0.9,
                "mech/heldout/kl_correct": 0.5 + seed,
            }
        )
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_keys_and_paired_differences_over_seeds(tmp_path):
    finals = {"sdpg": [0.5, 0.7, 0.6], "dapo": [0.2, 0.1, 0.3], "sdpg_guarded": [0.3, 0.3, 0.2]}
    for algo, accs in finals.items():
        for seed, final in enumerate(accs):
            _fake_run(tmp_path, algo, seed, [0.1, 0.05 * seed, final])
    json_path = tmp_path / "bench.json"
    json_path.write_text("{}")  # --report-only rewrites a finished bench's summary
    cmd = [sys.executable, str(TOOL), "--out", str(tmp_path), "--algos", ",".join(finals), "--seeds", "0,1,2"]
    proc = subprocess.run([*cmd, "--report-only", "--json", str(json_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(json_path.read_text())
    summary = result["algos"]
    for algo, accs in finals.items():
        e = summary[algo]
        assert e["final_acc"] == accs  # held-out problems, a list over seeds
        assert e["final_acc_seen"] == pytest.approx([a + 0.25 for a in accs])  # training problems
        assert e["final_acc_mean"] == pytest.approx(statistics.mean(accs))
        assert e["final_acc_se"] == pytest.approx(statistics.stdev(accs) / math.sqrt(3))
        assert e["final_kl_correct_mean"] == pytest.approx(1.5)
        assert math.isnan(e["final_kl_incorrect_mean"])  # never logged
        assert e["seeds"]["2"]["curve"]["step"] == [10, 20, 30]
        assert e["seeds"]["2"]["curve"]["acc"] == [0.1, 0.1, accs[2]]
        assert e["seeds"]["2"]["curve"]["train_reward"] == [-0.8, -0.6] * 3
        assert e["seeds"]["2"]["curve"]["train_step"] == [9, 10, 19, 20, 29, 30]  # the x of those panels
    comp = result["comparisons"]
    kl = comp["sdpg_minus_dapo"]["unseen"]
    assert kl["per_seed"] == pytest.approx([0.3, 0.6, 0.3]) and kl["mean"] == pytest.approx(0.4)
    assert kl["all_positive"]
    guard = comp["sdpg_guarded_minus_dapo"]["unseen"]
    assert guard["per_seed"] == pytest.approx([0.1, 0.2, -0.1]) and not guard["all_positive"]
    assert comp["goal_met"] is False
    table = proc.stdout
    assert "| sdpg | 0.600 ± 0.058 | 0.850 ± 0.058 |" in table and "| dapo | 0.200 ± 0.058 |" in table
    assert "mean ± s.e. over 3 seeds" in table and "sdpg_minus_dapo (unseen): +0.400" in table
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_a_run_without_tuned_settings_stops_before_starting(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"algos": {"sdpg": {"chosen": ["optimizer.lr=0.001"]}}}))
    cmd = [
        sys.executable,
        str(TOOL),
        "--out",
        str(tmp_path / "b"),
        "--algos",
        "sdpg,dapo",
        "--tuned",
        str(tuned),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert (
        proc.returncode == 2 and "no tuned settings for ['dapo']" in proc.stderr and "--grid" in proc.stderr
    )
    assert not (tmp_path / "b").exists()  # nothing was warm-started


@pytest.mark.slow
def test_bench_end_to_end_grid_then_run(tmp_path):
    """The real thing, tiny: a grid (no evaluation) writes the chosen settings, the run uses them."""
    out, tuned = tmp_path / "b", tmp_path / "tuned.json"
    common = [
        sys.executable,
        str(TOOL),
        "--out",
        str(out),
        "--algos",
        "dapo",
        "--sft-steps",
        "20",
        "--tuned",
        str(tuned),
    ]
    grid = [*common, "--grid", "--grid-steps", "2", "--grid-window", "2"]
    subprocess.run(grid, check=True, cwd=REPO, timeout=900, capture_output=True)
    chosen = json.loads(tuned.read_text())["algos"]["dapo"]
    assert len(chosen["points"]) == 4 and chosen["chosen"] in [p["overrides"] for p in chosen["points"]]
    assert not list((out / "grid").glob("*/metrics.jsonl"))[0].read_text().count("eval/")  # evaluation off
    run = [*common, "--seeds", "1", "--steps", "2", "--num-seen", "4", "eval.interval=2"]
    subprocess.run(run, check=True, cwd=REPO, timeout=900, capture_output=True)
    result = json.loads((out / "bench.json").read_text())
    e = result["algos"]["dapo"]
    assert (
        len(e["final_acc"]) == 1 and 0.0 <= e["final_acc"][0] <= 1.0 and 0.0 <= e["final_acc_seen"][0] <= 1.0
    )
    curve = e["seeds"]["1"]["curve"]
    assert curve["step"] == [2] and 0.0 <= curve["teacher_acc"][0] <= 1.0 and curve["teacher_logp_ref"][0] < 0
    assert (
        result["tuned"]["dapo"] == chosen["chosen"] and result["cpu_s"] > 0 and (out / "bench.png").exists()
    )
    # Each run counts its own CPU (the fork server, not this process, reaps it), servers included.
    assert list(result["run_cpu_s"]) == ["dapo_s1"] and 0 < result["run_cpu_s"]["dapo_s1"] <= result["cpu_s"]
