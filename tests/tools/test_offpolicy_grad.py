"""tools/offpolicy_grad.py end to end: the control run where nothing is stale, and stale samples weighted.

The estimator's arithmetic: tests/bench/test_bench_offpolicy.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_testlib import make_assets

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "offpolicy_grad.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("offpolicy"), num_train=16)


def _run(assets, tmp_path, behaviour: Path, *extra: str) -> dict:
    """A few prompts; the reward is the parity of the response's length, so groups are mixed (a tiny
    random model never solves the arithmetic: all-equal rewards would leave no policy gradient)."""
    out, scorer = tmp_path / "offpolicy.json", tmp_path / "parity.py"
    scorer.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return 1.0 if len(solution_str) % 2 else -1.0\n")  # fmt: skip
    overrides = [
        f"reward.scorer={scorer}:score",
        f"model.path={assets / 'model'}",
        f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        "data.max_response_length=8",
        "rollout.n=4",
    ]
    argv = ["--config", str(REPO / "examples" / "tiny" / "sdpg.yaml"), "--set", *overrides]
    argv += [
        "--policy",
        str(assets / "model"),
        "--behaviour",
        str(behaviour),
        "--prompts",
        "4",
        "--repeats",
        "2",
    ]
    cmd = [sys.executable, str(TOOL), *argv, "--caps", "2", *extra, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bias^2/signal (se)" in proc.stdout  # the table
    return json.loads(out.read_text())


@pytest.mark.parametrize("advantages", ["group", pytest.param("fresh-baseline", marks=pytest.mark.slow)])
def test_when_the_behaviour_is_the_policy_every_correction_is_the_same_gradient(assets, tmp_path, advantages):
    """Nothing is stale: every importance weight is exactly 1, so the corrections cannot differ."""
    summary = _run(assets, tmp_path, assets / "model", "--advantages", advantages)["summary"]
    assert set(summary) == {"pg none", "pg token cap 2", "pg sequence cap 2", "kl none"}
    pg = [summary[k] for k in ("pg none", "pg token cap 2", "pg sequence cap 2")]
    assert pg[0] == pg[1] == pg[2]
    assert all(v["noise"] != 0 for v in summary.values())  # non-zero gradients that differ between draws


def test_stale_samples_are_weighted(assets, tmp_path):
    """A behaviour model with perturbed weights: the token-weighted stale gradient differs from the raw one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "behaviour")
    draws = _run(assets, tmp_path, tmp_path / "behaviour")["draws"]
    assert draws["pg none"] != draws["pg token cap 2"]
    assert all(abs(r["bias2"]) < float("inf") for rows in draws.values() for r in rows)
