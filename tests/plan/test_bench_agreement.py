"""The model against ``tools/bench_step.py`` on this CPU (``plan/bench_agreement.py``, ``plan/calibrate.py``).

The fast tests check the bookkeeping on a recorded report; the slow one runs the benchmark and holds the
model's two SDPG-cost ratios (teacher pass / train pass, SDPG step / GRPO step) to +-25 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_mcore.plan.bench_agreement import Agreement, agreement
from sdpg_mcore.plan.calibrate import calibrate_cpu
from sdpg_mcore.plan.hardware import HARDWARE

REPO = Path(__file__).resolve().parents[2]
TINY_QWEN3 = {
    "model_type": "qwen3",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "tie_word_embeddings": True,
}
SHAPE = {
    "prompts": 8,
    "n": 4,
    "mini_batch_prompts": 4,
    "prompt_len": 48,
    "context_len": 24,
    "response_len": 64,
    "token_budget": 2048,
}


def _report(sdpg_phases: dict, grpo_phases: dict) -> dict:
    results = {
        name: {"step_s": sum(phases.values()), "phases_s": phases}
        for name, phases in (("sdpg", sdpg_phases), ("grpo", grpo_phases))
    }
    ratio = results["sdpg"]["step_s"] / results["grpo"]["step_s"]
    return {"model_config": TINY_QWEN3, "shape": SHAPE, "results": results, "time_ratio": ratio}


def test_ratios_pair_prediction_and_measurement():
    report = _report(
        {"old_logprob": 1.0, "ref_logprob": 1.0, "teacher": 2.0, "update": 5.0},
        {"old_logprob": 1.0, "ref_logprob": 1.0, "update": 4.0},
    )
    agree = agreement(report, HARDWARE["cpu"])
    assert agree.teacher_over_train[1] == pytest.approx(2.0 / 5.0)
    assert agree.sdpg_over_grpo[1] == pytest.approx(9.0 / 6.0)
    pred = agree.predicted
    assert agree.teacher_over_train[0] == pytest.approx(pred["sdpg"]["teacher"] / pred["sdpg"]["update"])
    assert agree.sdpg_over_grpo[0] == pytest.approx(pred["sdpg"]["step"] / pred["grpo"]["step"])
    assert set(pred["grpo"]) == {"old_logprob", "ref_logprob", "update", "step"}  # no rollout, no sync
    # physics: the teacher pass is a forward over longer rows, the train pass forward + backward + head
    assert 0.25 < agree.teacher_over_train[0] < 0.5
    assert 1.0 < agree.sdpg_over_grpo[0] < 1.4
    assert Agreement.error((1.1, 1.0)) == pytest.approx(0.1)


def test_ratios_do_not_depend_on_the_cpu_speed_alone():
    """Scaling every rate of the machine by the same factor leaves both predicted ratios unchanged."""
    from dataclasses import replace

    cpu = HARDWARE["cpu"]
    slow = replace(
        cpu,
        **{
            k: getattr(cpu, k) / 3
            for k in (
                "peak_flops",
                "memory_bytes_per_s",
                "nvlink_bytes_per_s",
                "network_bytes_per_s",
                "host_link_bytes_per_s",
                "pageable_copy_bytes_per_s",
            )
        },
    )
    report = _report({"teacher": 1.0, "update": 1.0}, {"update": 1.0})
    fast_agree, slow_agree = agreement(report, cpu), agreement(report, slow)
    assert slow_agree.teacher_over_train[0] == pytest.approx(fast_agree.teacher_over_train[0], rel=0.02)
    assert slow_agree.sdpg_over_grpo[0] == pytest.approx(fast_agree.sdpg_over_grpo[0], rel=0.02)


def test_calibration_measures_positive_rates():
    cpu = calibrate_cpu(repeats=1)
    assert cpu.peak_flops > 1e8 and cpu.memory_bytes_per_s > 1e8 and cpu.pageable_copy_bytes_per_s > 1e7
    assert cpu.source.startswith("measured now")


@pytest.mark.slow
def test_bench_step_agrees_with_the_model(tmp_path):
    """Both ratios within +-25 % of tools/bench_step.py's default run (SDPG vs GRPO, interleaved)."""
    step_json, agree_json = tmp_path / "step.json", tmp_path / "agree.json"
    bench = [sys.executable, str(REPO / "tools/bench_step.py"), "--repeats", "7", "--json", str(step_json)]
    out = subprocess.run(bench, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = [
        sys.executable,
        str(REPO / "tools/plan.py"),
        "--against-bench",
        str(step_json),
        "--json",
        str(agree_json),
    ]
    out = subprocess.run(plan, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(agree_json.read_text())
    for ratio in ("teacher_over_train", "sdpg_over_grpo"):
        assert abs(result[ratio]["error"]) <= 0.25, (ratio, result[ratio])
