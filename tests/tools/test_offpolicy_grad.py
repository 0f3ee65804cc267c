"""tools/offpolicy_grad.py: the bias estimator's arithmetic, and the control run where nothing is stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "train"))
import offpolicy_grad  # noqa: E402
from launch_testlib import make_assets  # noqa: E402


def test_bias_estimate_is_the_squared_bias_without_the_noise():
    """Gaussian halves in D dimensions: fresh mu + noise, stale mu + b + noise, noise of total variance
    4 per half (16 for the stale ones) against |mu|^2 = 1, and b = -0.3 mu + 0.4 u with u a unit vector
    orthogonal to mu, so |b|^2 = 0.25 and the stale gradient's length along mu is 0.7. The raw
    |g_s - g_f|^2 would be 0.25 + 2 + 8 = 10.25; the estimator must return 0.25 / 1. Each squared norm of
    a D-dim noise has relative std sqrt(2 / D) = 0.003 at D = 2e5, so the estimate is within 0.2 of its
    value (~3 s.d.); ``along`` sums noise dot products of s.d. sqrt(16 * 4 / D) = 0.018, so within 0.1."""
    D, gen = 200_000, torch.Generator().manual_seed(0)

    def vec(norm2):
        v = torch.randn(D, generator=gen, dtype=torch.float64)
        return v * (norm2 / v.dot(v)) ** 0.5

    mu, u = vec(1.0), vec(1.0)
    u = u - u.dot(mu) * mu
    b = -0.3 * mu + 0.4 * u / u.norm()
    f1, f2, s1, s2 = mu + vec(4.0), mu + vec(4.0), mu + b + vec(16.0), mu + b + vec(16.0)
    out = offpolicy_grad.bias_estimate(f1, f2, s1, s2)
    assert float((s1 + s2 - f1 - f2).pow(2).sum() / 4) == pytest.approx(10.25, rel=0.02)  # what is removed
    assert out["bias2"] == pytest.approx(0.25, abs=0.2)
    assert out["along"] == pytest.approx(0.7, abs=0.1)
    assert out["noise"] == pytest.approx(8.0, rel=0.05)  # the stale mean's noise, 16 / 2
    assert out["noise_fresh"] == pytest.approx(2.0, rel=0.05)
    assert out["signal_norm"] == pytest.approx(1.0, abs=0.1)


def test_fresh_baseline_advantages_subtract_the_other_sets_group_mean():
    """Two prompts, n = 2: each response's reward minus its prompt's mean reward in the baseline set."""
    data = {
        "rewards": torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64),
        "groups": torch.tensor([0, 0, 1, 1]),
    }
    baseline = {
        "rewards": torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64),
        "groups": torch.tensor([0, 0, 1, 1]),
    }
    adv = offpolicy_grad.fresh_baseline_advantages(data, baseline, 2)
    assert adv.tolist() == [0.0, -2.0, 1.0, 1.0]


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
    assert offpolicy_grad.main([*argv, "--caps", "2", *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("advantages", ["group", "fresh-baseline"])
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
