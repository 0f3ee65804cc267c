"""The README's first command: the tiny CPU example (examples/tiny)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_mcore.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny"


def test_recipe_validates_and_scripts_parse():
    cfg = load_config(TINY / "sdpg.yaml", ["algorithm.name=grpo"])
    assert cfg.rollout.backend == "builtin" and cfg.trainer.total_steps >= 20
    bench = load_config(TINY / "bench_algos.yaml", ["algorithm.name=rlsd"])
    assert bench.eval.mechanism and bench.eval.n_samples == bench.rollout.n
    for script in ("run.sh", "bench.sh"):
        assert os.access(TINY / script, os.X_OK), script
        subprocess.run(["bash", "-n", str(TINY / script)], check=True)


@pytest.mark.slow
@pytest.mark.ci  # the README's first command learns: .ci/run runs it after the default suite
@pytest.mark.timeout(1200)  # the run's own limit below, not the suite's 600 s
def test_tiny_example_accuracy_rises(tmp_path):
    """End to end as a new user runs it (fresh model and data): acc(last 10) >= acc(first 10) + 0.1, KL > 0."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MODEL_DIR": str(tmp_path / "model"),
        "DATA_DIR": str(tmp_path / "data"),
        "RUN_DIR": str(tmp_path / "run"),
    }
    subprocess.run(
        [str(TINY / "run.sh"), "logging.progress=false"], check=True, env=env, cwd=REPO, timeout=1200
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = [r["acc"] for r in records]
    assert len(acc) >= 20
    assert sum(acc[-10:]) / 10 >= sum(acc[:10]) / 10 + 0.1, acc
    assert all(r["kl_mean"] > 0 for r in records)
