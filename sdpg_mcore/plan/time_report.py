"""The step-time part of ``tools/plan.py``: JSON-ready predictions for a planned layout, the ranking of
fitting layouts, and the scaling what-if, from a recipe and the command line's cluster.

    python tools/plan.py --config examples/llama3_70b/recipe.yaml --nodes 8 --gpus-per-node 8 \\
        --gpu-mem-gb 80 --time --search --json plan.json
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sdpg_mcore.plan.compute_time import Machine
from sdpg_mcore.plan.hardware import EFFICIENCY, Hardware
from sdpg_mcore.plan.layout import Plan
from sdpg_mcore.plan.layout_search import Ranked, rank_layouts, scaling, why_best
from sdpg_mcore.plan.memory import GIB, TrainingShape
from sdpg_mcore.plan.recipe_time import Assumptions, RecipeTiming, recipe_timing
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import StepTime, predict_step
from sdpg_mcore.plan.workload import Rollout


@dataclass(frozen=True)
class TimeRequest:
    """What the command line asks of the step-time model."""

    hardware: Hardware
    gpus_per_node: int
    rollout_nodes: int
    """Dedicated rollout nodes (ignored when colocated)."""
    rollout_tp: int
    colocated: bool
    kv_memory_fraction: float = 0.85
    assume: Assumptions = field(default_factory=Assumptions)
    search: bool = False
    scale: tuple[int, ...] = ()
    scale_model_parallel: tuple[int, int, int] | None = None
    """Keep this (tp, pp, cp) while scaling (``--tp/--pp/--cp`` given); None: search every layout."""


def timing_inputs(recipe: dict, train: TrainingShape, plan: Plan, req: TimeRequest) -> RecipeTiming:
    """The recipe's step on this cluster (caps, budget and recompute as the memory plan resolved them).

    A colocated engine gets what the trainer leaves while it generates: the trainer offloads its
    weights, gradients, optimizer states and reference copy (``train/colocate.py``), so the GPU less
    the trainer's overhead (CUDA context, NCCL buffers) and the engines' own.
    """
    gpus = plan.layout.world_size if req.colocated else req.rollout_nodes * req.gpus_per_node
    if gpus < 1:
        raise ValueError("--rollout-nodes must be >= 1 for a dedicated rollout (or use --rollout colocated)")
    fraction = req.kv_memory_fraction
    if req.colocated and plan.estimate is not None:
        resident = plan.estimate.overhead + train.engine_overhead_bytes
        fraction = max(0.0, min(fraction, (plan.gpu_mem_bytes - resident) / req.hardware.memory_bytes))
    rollout = Rollout(gpus=gpus, tp=req.rollout_tp, colocated=req.colocated, kv_memory_fraction=fraction)
    prompt_len = train.rollout_seq_len - (train.response_len or 0)
    timing = recipe_timing(
        recipe,
        max_prompt_len=prompt_len,
        max_response_len=train.response_len or train.rollout_seq_len,
        micro_batch_tokens=train.micro_batch_tokens,
        recompute=train.recompute,
        rollout=rollout,
        assume=req.assume,
    )
    if not timing.work.teacher_pass:
        return timing
    # the guarded teacher as the memory plan has it (the command line wins over the recipe)
    guard = dict(teacher_weights=train.teacher, ema_weights_host=train.ema_weights == "host")
    return replace(timing, settings=replace(timing.settings, **guard))


def step_dict(step: StepTime) -> dict:
    out = step.as_dict()
    if step.generation is not None:
        gen = step.generation
        out["generation"] = {
            "prefill_s": gen.prefill,
            "decode_s": gen.decode,
            "sequences_per_engine": gen.concurrency,
            "kv_limited": gen.kv_limited,
            "longest_response_tokens": gen.longest,
        }
    return out


def _ranked_dict(r: Ranked) -> dict:
    lay = r.plan.layout
    return {
        "layout": {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp},
        "peak_gib": r.plan.estimate.total / GIB,
        **step_dict(r.step),
    }


def time_report(shape: ModelShape, train: TrainingShape, plan: Plan, recipe: dict, req: TimeRequest) -> dict:
    """``{"time": ..., "search": [...], "why": [...], "scaling": [...]}`` as requested (module docstring)."""
    world = plan.layout.world_size
    timing = timing_inputs(recipe, train, plan, req)
    machine = Machine(req.hardware, EFFICIENCY, req.gpus_per_node)
    out: dict = {}
    if plan.valid:
        step = predict_step(
            shape, plan.layout, timing.work, timing.settings, timing.rollout, timing.impl, machine
        )
        out["time"] = {**step_dict(step), "hardware": req.hardware.name, "assumed": timing.assumed}
    if req.search:
        ranked = rank_layouts(shape, train, timing, machine, world, plan.gpu_mem_bytes)
        out["search"] = [_ranked_dict(r) for r in ranked]
        out["why"] = why_best(ranked, planned=plan.layout)
    if req.scale:
        points = scaling(
            shape, train, timing, machine, plan.gpu_mem_bytes, list(req.scale), req.scale_model_parallel
        )
        out["scaling"] = [
            {
                "gpus": p.gpus,
                "trainer_nodes": p.trainer_nodes,
                "rollout_nodes": p.rollout_nodes,
                **_ranked_dict(p.best),
            }
            for p in points
        ]
    return out
