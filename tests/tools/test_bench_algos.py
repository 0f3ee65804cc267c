"""tools/bench_algos.py: the summary of finished runs is the seeds' mean ± std (table, JSON, figure).

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


def _fake_run(out, algo, seed, accs, interval=5):
    rdir = out / "runs" / f"{algo}_s{seed}"  # where the tool keeps each run
    rdir.mkdir(parents=True)
    rows = []
    for i, acc in enumerate(accs):
        step = (i + 1) * interval
        rows.append({"step": step - 1, "acc": 0.1})
        rows.append(
            {
                "step": step,
                "acc": 0.1,
                "eval/heldout/avg@8": acc,
                "mech/heldout/teacher_acc": 0.9,
                "mech/heldout/kl_correct": 0.5 + seed,
            }
        )
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    finals = {"sdpg": [0.5, 0.7, 0.6], "grpo": [0.2, 0.1, 0.3]}
    for algo, accs in finals.items():
        for seed, final in enumerate(accs):
            _fake_run(tmp_path, algo, seed, [0.1, 0.05 * seed, final])
    json_path = tmp_path / "bench.json"
    json_path.write_text("{}")  # --report-only rewrites a finished bench's summary
    cmd = [sys.executable, str(TOOL), "--out", str(tmp_path), "--algos", "sdpg,grpo", "--seeds", "0,1,2"]
    proc = subprocess.run([*cmd, "--report-only", "--json", str(json_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(json_path.read_text())
    summary = result["algos"]
    for algo, accs in finals.items():
        e = summary[algo]
        assert e["final_acc"] == accs
        assert e["final_acc_mean"] == pytest.approx(statistics.mean(accs))
        assert e["final_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert e["final_kl_correct_mean"] == pytest.approx(1.5)
        assert math.isnan(e["final_kl_incorrect_mean"])  # never logged
        assert e["seeds"]["2"]["curve"]["step"] == [5, 10, 15]
        assert e["seeds"]["2"]["curve"]["acc"] == [0.1, 0.1, accs[2]]
    g = result["goal"]
    assert g["sdpg_minus_grpo"] == pytest.approx(0.4) and g["sdpg_worst_seed"] == 0.5 and g["met"]
    table = proc.stdout
    assert "| sdpg | 0.600 ± 0.100 |" in table and "| grpo | 0.200 ± 0.100 |" in table
    assert "mean ± std over 3 seeds" in table
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_end_to_end_two_algorithms(tmp_path):
    """The real thing, tiny: warm start, two trainer runs with the probe, JSON with final_acc per seed."""
    import subprocess

    out = tmp_path / "b"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--algos", "sdpg,grpo"]
    cmd += ["--seeds", "0", "--steps", "2", "--sft-steps", "20", "--num-heldout", "4", "eval.interval=2"]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900, capture_output=True)
    result = json.loads((out / "bench.json").read_text())
    for algo in ("sdpg", "grpo"):
        e = result["algos"][algo]
        assert len(e["final_acc"]) == 1 and 0.0 <= e["final_acc"][0] <= 1.0
        curve = e["seeds"]["0"]["curve"]
        assert curve["step"] == [2]
        assert 0.0 <= curve["teacher_acc"][0] <= 1.0 and curve["teacher_logp_ref"][0] < 0
        assert -1.0 <= curve["kl_grad_cos_student"][0] <= 1.0
    assert result["cpu_s"] > 0 and (out / "bench.png").exists()
