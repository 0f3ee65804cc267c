"""tools/plot.py: figure, table and JSON summary of runs (the smoothing: tests/bench/test_bench_stats.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "plot.py"


def _write_run(path: Path, slope: float, steps: int = 20) -> Path:
    path.mkdir(parents=True)
    with (path / "metrics.jsonl").open("w") as fh:
        for step in range(1, steps + 1):
            acc = 0.2 + slope * step
            fh.write(
                json.dumps(
                    {
                        "step": step,
                        "reward_mean": 2 * acc - 1,
                        "acc": acc,
                        "kl_mean": 0.01,
                        "entropy": 1.0,
                        "response_len_mean": 10 + step,
                    }
                )
                + "\n"
            )
        fh.write('{"step": 21, "acc"')  # a torn last line from a killed run
    return path


def test_plot_two_runs_writes_png_and_table(tmp_path):
    a = _write_run(tmp_path / "sdpg", 0.02)
    b = _write_run(tmp_path / "grpo", 0.0)
    out = tmp_path / "cmp.png"
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(a), str(b), "--out", str(out), "--smooth", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "sdpg" in proc.stdout and "grpo" in proc.stdout and "acc_last" in proc.stdout


def test_summary_first_vs_last(tmp_path):
    run = _write_run(tmp_path / "r", 0.02)
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(run), "--json", "--window", "10"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["runs"]["r"]
    assert data["steps"] == 20
    assert data["acc_first"] == pytest.approx(0.2 + 0.02 * 5.5)
    assert data["acc_last"] == pytest.approx(0.2 + 0.02 * 15.5)


def test_missing_run_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr
