"""The step-time model against published RL runs (``sdpg_mcore/plan/published_runs.json``).

One set of constants (``hardware.EFFICIENCY``) for every run: each published total within +-25 %, each
phase of the Llama-3.1-70B breakdown within +-40 %.
"""

from __future__ import annotations

import json

import pytest

from sdpg_mcore.plan.hardware import EFFICIENCY
from sdpg_mcore.plan.published import DATA, load, runs, validate

CHECKS = {c.run_id: c for c in validate()}
REQUIRED_TOTALS = {
    "nemo_rl_v0.5_llama3.1_8b_on_policy": 92.8,
    "nemo_rl_v0.5_llama3.1_8b_one_step_off": 64.8,
    "nemo_rl_v0.3_llama3.1_70b": 147,
}


@pytest.mark.parametrize("run_id", [c.run_id for c in CHECKS.values() if c.checked])
def test_every_checked_total_within_25_percent(run_id):
    check = CHECKS[run_id]
    assert abs(check.total_error) <= 0.25, (run_id, check.predicted.total, check.published["total_s"])


def test_the_three_required_totals_are_checked():
    for run_id, total in REQUIRED_TOTALS.items():
        assert CHECKS[run_id].checked and CHECKS[run_id].published["total_s"] == total


def test_70b_phases_within_40_percent():
    check = CHECKS["nemo_rl_v0.3_llama3.1_70b"]
    assert set(check.phases) == {"generation", "logprobs", "training", "refit"}
    assert check.published["phases"] == {"training": 28, "refit": 14, "generation": 84, "logprobs": 18}
    for phase, error in check.phase_errors.items():
        assert abs(error) <= 0.40, (phase, check.phases[phase])


def test_tokens_per_second_follow_the_published_definition():
    """NeMo-RL: prompt + response tokens / step time / all GPUs (trainer and engines)."""
    check = CHECKS["nemo_rl_v0.5_llama3.1_8b_one_step_off"]
    step = check.predicted
    assert step.gpus == 16
    assert step.tokens == pytest.approx(2048 * (131 + 1123))
    assert step.tokens_per_s_per_gpu == pytest.approx(step.tokens / step.total / 16)
    assert abs(check.tokens_error) <= 0.25


def test_one_set_of_constants_and_sourced_settings():
    """No run carries its own efficiency; every run names its source and says what was assumed."""
    data = load()
    for raw in data["runs"]:
        assert "efficiency" not in json.dumps(raw).lower()
        assert raw["source"] and raw.get("notes")
        if "workload" in raw:  # the truncated share is never published: every run says it assumed it
            assert any("assumed" in note for note in raw["notes"]), raw["id"]
    assert all(run.machine.eff == EFFICIENCY for run in runs(data))


def test_the_rerun_shares_the_configuration_and_is_reported_not_asserted():
    blog, rerun = CHECKS["nemo_rl_v0.3_llama3.1_70b"], CHECKS["nemo_rl_v0.3_llama3.1_70b_rerun"]
    assert not rerun.checked
    assert rerun.predicted.total == pytest.approx(blog.predicted.total)
    assert rerun.published["total_s"] == 178 and rerun.published["phases"]["refit"] == 26


def test_data_file_is_valid_json_with_a_phase_map():
    data = json.loads(DATA.read_text())
    mapped = {p for phases in data["phase_map"].values() for p in phases}
    assert mapped <= {
        "generation",
        "old_logprob",
        "ref_logprob",
        "train",
        "optimizer",
        "weight_sync",
        "state_offload",
    }
