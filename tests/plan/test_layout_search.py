"""Ranking fitting layouts by predicted step time, and the scaling what-if (``plan/layout_search.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdpg_mcore.plan.compute_time import Machine
from sdpg_mcore.plan.hardware import EFFICIENCY, HARDWARE
from sdpg_mcore.plan.layout_search import rank_layouts, scaling, why_best
from sdpg_mcore.plan.memory import GIB, Layout, TrainingShape
from sdpg_mcore.plan.recipe_time import Assumptions, recipe_timing
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import predict_step
from sdpg_mcore.plan.workload import Rollout

REPO = Path(__file__).resolve().parents[2]
RECIPE = yaml.safe_load((REPO / "examples/llama3_70b/recipe.yaml").read_text())
SHAPE = ModelShape.from_path(REPO / "examples/llama3_70b/config.json")
TRAIN = TrainingShape(
    micro_batch_tokens=10240,
    teacher_tokens=10240,
    rollout_seq_len=10240,
    recompute="full",
    kl_chunk_tokens=1024,
    mini_batch_responses=128,
    response_len=8192,
)
MACHINE = Machine(HARDWARE["h100"], EFFICIENCY, 8)
TIMING = recipe_timing(
    RECIPE,
    max_prompt_len=2048,
    max_response_len=8192,
    micro_batch_tokens=10240,
    recompute="full",
    rollout=Rollout(gpus=16, tp=8),
)


def test_the_recipe_reads_into_the_step():
    work, settings = TIMING.work, TIMING.settings
    assert (work.prompts, work.n, work.mini_batches) == (128, 8, 8)
    assert work.teacher_pass and work.reference_pass  # sdpg with beta and alpha
    assert work.prompt_len == 256 and work.lengths.mean == pytest.approx(8192 / 3)
    assert settings.sequence_parallel and settings.overlap_grad_reduce and settings.recompute == "full"
    assert TIMING.impl.weight_sync == "broadcast" and TIMING.rollout.bucket_bytes == 512 << 20
    assumed = recipe_timing(
        {**RECIPE, "algorithm": {"name": "grpo"}},
        max_prompt_len=2048,
        max_response_len=8192,
        micro_batch_tokens=10240,
        recompute="full",
        rollout=Rollout(gpus=16, tp=8),
        assume=Assumptions(mean_response_len=1000, head_bytes=40),
    )
    assert not assumed.work.teacher_pass and assumed.work.lengths.mean == 1000
    assert assumed.assumed["head_bytes_per_pair"] == pytest.approx(40 * 22 / 38)  # student rows only


def test_fitting_layouts_fastest_first():
    ranked = rank_layouts(SHAPE, TRAIN, TIMING, MACHINE, world=64, gpu_mem_bytes=80 * GIB)
    assert len(ranked) >= 3
    totals = [r.step.total for r in ranked]
    assert totals == sorted(totals)
    assert all(r.plan.fits and r.plan.estimate.total <= 80 * GIB for r in ranked)
    recipe_layout = next(r for r in ranked if r.plan.layout == Layout(8, 2, 1, 4))
    assert ranked[0].step.total <= recipe_layout.step.total
    lines = why_best(ranked)
    assert len(lines) == 2 and all(line.startswith(f"{ranked[0].label} beats") for line in lines)


def test_a_layout_that_does_not_fit_is_not_ranked():
    ranked = rank_layouts(SHAPE, TRAIN, TIMING, MACHINE, world=16, gpu_mem_bytes=80 * GIB)
    assert ranked == []  # Adam states alone: 12 bytes x 70.6 B / 16 GPUs > 80 GiB with the weights


def test_scaling_is_sublinear_and_floored_by_generation():
    points = scaling(SHAPE, TRAIN, TIMING, MACHINE, 80 * GIB, [64, 128, 256])
    totals = [p.best.step.total for p in points]
    assert totals[0] > totals[1] > totals[2]
    for small, big in zip(points, points[1:]):
        assert small.best.step.total / big.best.step.total < big.gpus / small.gpus
    for p in points:
        assert (p.trainer_nodes + p.rollout_nodes) * 8 == p.gpus
        gen = p.best.step.generation
        assert gen.longest == pytest.approx(8192, rel=1e-3)
    last = points[-1].best.step
    assert max(last.phases, key=last.phases.get) == "generation"  # what stops the scaling


def test_predict_is_deterministic_and_cached_generation_is_shared():
    layout = Layout(8, 2, 1, 4)
    a = predict_step(SHAPE, layout, TIMING.work, TIMING.settings, TIMING.rollout, TIMING.impl, MACHINE)
    b = predict_step(SHAPE, layout, TIMING.work, TIMING.settings, TIMING.rollout, TIMING.impl, MACHINE)
    assert a.phases == b.phases and a.generation is b.generation


def test_a_colocated_engine_gets_what_the_offloaded_trainer_leaves():
    """The trainer offloads its state while colocated engines generate (train/colocate.py): they get
    the GPU less its overhead and theirs, and the step pays the offload and the reload."""
    from sdpg_mcore.plan.hardware import hardware
    from sdpg_mcore.plan.layout import evaluate
    from sdpg_mcore.plan.time_report import TimeRequest, time_report

    recipe = yaml.safe_load((REPO / "examples/qwen3_4b/recipe.yaml").read_text())
    shape = ModelShape.from_path(REPO / "examples/qwen3_4b/config.json")
    train = TrainingShape(
        micro_batch_tokens=6144, teacher_tokens=6144, rollout_seq_len=6144, response_len=4096
    )
    plan = evaluate(shape, Layout(1, 1, 1, 8), train, 8, 8, 80 * GIB)
    req = TimeRequest(hardware("h100"), gpus_per_node=8, rollout_nodes=0, rollout_tp=1, colocated=True)
    out = time_report(shape, train, plan, recipe, req)
    resident = plan.estimate.overhead + train.engine_overhead_bytes
    rollout = out["time"]["assumed"]["rollout"]
    assert rollout["colocated"] and rollout["gpus"] == 8
    assert rollout["kv_memory_fraction"] == pytest.approx(min(0.85, (80 * GIB - resident) / 80e9))
    phases = out["time"]["phases"]
    assert out["time"]["gpus"] == 8 and phases["state_offload"] > 0 and phases["state_onload"] > 0
