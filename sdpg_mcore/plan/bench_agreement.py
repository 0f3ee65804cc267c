"""The model against a measurement: the CPU step of ``tools/bench_step.py``, predicted from its own shape.

``bench_step.py --json`` records the model config, the batch and the measured phases of one SDPG and
one GRPO step (``old_logprob``, ``ref_logprob``, ``teacher``, ``update`` = train pass + optimizer step).
:func:`agreement` predicts the same two steps on a calibrated ``cpu`` machine (TP1, no rollout, no
weight sync) and compares the two ratios that say what SDPG costs: teacher pass / train pass, and
SDPG step / GRPO step. Absolute seconds depend on the CPU; the ratios depend on the model's physics.

    python tools/bench_step.py --json step.json && python tools/plan.py --against-bench step.json
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdpg_mcore.plan.compute_time import Machine
from sdpg_mcore.plan.hardware import EFFICIENCY, Hardware
from sdpg_mcore.plan.lengths import ResponseLengths
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import StepTime, predict_step
from sdpg_mcore.plan.workload import SDPG_MCORE, Rollout, TrainSettings, Workload, with_head_backend

LAYOUT = Layout(tp=1, pp=1, cp=1, dp=1)
ON_CPU = with_head_backend(SDPG_MCORE, "torch")
"""The trainer as ``bench_step.py`` runs it: on a CPU ``trainer.logprob_backend=auto`` is the torch head."""


def _predict(report: dict, hw: Hardware, sdpg: bool) -> StepTime:
    shape_cfg, batch = report["model_config"], report["shape"]
    work = Workload(
        prompts=batch["prompts"],
        n=batch["n"],
        prompt_len=batch["prompt_len"],
        lengths=ResponseLengths.fixed(batch["response_len"]),
        teacher_extra_len=batch["context_len"] if sdpg else 0.0,
        teacher_pass=sdpg,
        reference_pass=True,  # sdpg's alpha and grpo's KL penalty both need the reference
        mini_batches=batch["prompts"] // batch["mini_batch_prompts"],
    )
    settings = TrainSettings(
        micro_batch_tokens=batch["token_budget"],
        sequence_parallel=False,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )
    machine = Machine(hw, EFFICIENCY, gpus_per_node=1)
    # bench_step runs no rollout and no weight sync: a one-device "engine" whose time is dropped below
    step = predict_step(
        ModelShape.from_hf_config(shape_cfg),
        LAYOUT,
        work,
        settings,
        Rollout(gpus=1, tp=1),
        ON_CPU,
        machine,
    )
    trainer = {k: v for k, v in step.phases.items() if k not in ("generation", "weight_sync")}
    return replace(step, phases=trainer)


@dataclass(frozen=True)
class Agreement:
    """Predicted and measured ratios, side by side."""

    teacher_over_train: tuple[float, float]
    """(predicted, measured) SDPG teacher pass / SDPG train pass (train pass + optimizer step)."""
    sdpg_over_grpo: tuple[float, float]
    """(predicted, measured) SDPG step / GRPO step (no rollout, no weight sync)."""
    predicted: dict[str, dict[str, float]]
    measured: dict[str, dict[str, float]]

    @staticmethod
    def error(pair: tuple[float, float]) -> float:
        return pair[0] / pair[1] - 1


def agreement(report: dict, hw: Hardware) -> Agreement:
    """Compare ``bench_step.py``'s JSON ``report`` with the model on ``hw`` (a calibrated cpu)."""
    sdpg, grpo = _predict(report, hw, True), _predict(report, hw, False)
    res = report["results"]
    update = {
        name: step.phases["train"] + step.phases.get("optimizer", 0.0)
        for name, step in (("sdpg", sdpg), ("grpo", grpo))
    }
    predicted = {
        name: {
            **{k: v for k, v in step.phases.items() if k not in ("train", "optimizer")},
            "update": update[name],
            "step": step.total,
        }
        for name, step in (("sdpg", sdpg), ("grpo", grpo))
    }
    measured = {name: {**res[name]["phases_s"], "step": res[name]["step_s"]} for name in ("sdpg", "grpo")}
    return Agreement(
        teacher_over_train=(
            predicted["sdpg"]["teacher"] / predicted["sdpg"]["update"],
            measured["sdpg"]["teacher"] / measured["sdpg"]["update"],
        ),
        sdpg_over_grpo=(sdpg.total / grpo.total, report["time_ratio"]),
        predicted=predicted,
        measured=measured,
    )
