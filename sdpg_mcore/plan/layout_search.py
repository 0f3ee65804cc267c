"""The fastest layout that fits, and where adding GPUs stops paying.

:func:`rank_layouts` predicts the step time of every valid TP/PP/CP/DP layout whose memory plan fits
and sorts them; :func:`why_best` names the phases that separate the winner from the runners-up.
:func:`scaling` grows a recipe's cluster: for each size it tries splits between trainer and rollout
nodes and every fitting trainer layout (or only DP, for a fixed TP/PP/CP), and keeps the fastest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdpg_mcore.plan.compute_time import Machine
from sdpg_mcore.plan.layout import Plan, candidate_layouts, evaluate
from sdpg_mcore.plan.memory import TrainingShape
from sdpg_mcore.plan.recipe_time import RecipeTiming
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import StepTime, predict_step


@dataclass(frozen=True)
class Ranked:
    """A fitting layout and its predicted step."""

    plan: Plan
    step: StepTime

    @property
    def label(self) -> str:
        lay = self.plan.layout
        return f"TP{lay.tp} PP{lay.pp} CP{lay.cp} DP{lay.dp}"


def rank_layouts(
    shape: ModelShape,
    train: TrainingShape,
    timing: RecipeTiming,
    machine: Machine,
    world: int,
    gpu_mem_bytes: int,
    model_parallel: tuple[int, int, int] | None = None,
) -> list[Ranked]:
    """Every layout of ``world`` trainer GPUs that fits, fastest first (memory peak breaks ties);
    only those of ``model_parallel = (tp, pp, cp)`` when given."""
    out = []
    for layout in candidate_layouts(shape, machine.gpus_per_node, world):
        if model_parallel and (layout.tp, layout.pp, layout.cp) != model_parallel:
            continue
        plan = evaluate(shape, layout, train, machine.gpus_per_node, world, gpu_mem_bytes)
        if not plan.fits:
            continue
        rollout = timing.rollout
        if rollout.colocated:
            rollout = replace(rollout, gpus=world)
        step = predict_step(shape, layout, timing.work, timing.settings, rollout, timing.impl, machine)
        out.append(Ranked(plan=plan, step=step))
    return sorted(out, key=lambda r: (r.step.total, r.plan.estimate.total))


def why_best(ranked: list[Ranked], others: int = 2, planned=None) -> list[str]:
    """One line per runner-up (and for the ``planned`` layout, wherever it ranks): how much slower and
    the phases (and causes) that make the difference."""
    if len(ranked) < 2:
        return []
    best, lines = ranked[0], []
    compared = ranked[1 : 1 + others]
    where = [i for i, r in enumerate(ranked) if r.plan.layout == planned]
    if where and where[0] > others:
        compared.append(ranked[where[0]])
    for other in compared:
        deltas = _differences(other.step, best.step)
        parts = ", ".join(f"{name} {delta:+.1f} s" for name, delta in deltas[:3])
        rank = (
            f" (#{ranked.index(other) + 1} of {len(ranked)}, the planned layout)"
            if other.plan.layout == planned
            else ""
        )
        lines.append(
            f"{best.label} beats {other.label}{rank} by {other.step.total - best.step.total:.1f} s: "
            f"{other.label} spends {parts}"
        )
    return lines


def _differences(slow: StepTime, fast: StepTime) -> list[tuple[str, float]]:
    """Phase and cause differences ``slow - fast``, largest first (causes inside the phases)."""
    names = set(slow.phases) | set(fast.phases)
    diffs = {n: slow.phases.get(n, 0.0) - fast.phases.get(n, 0.0) for n in names}
    for cause in ("pipeline_bubble", "tp_comm", "dp_comm", "lm_head"):
        diffs[cause] = slow.details.get(cause, 0.0) - fast.details.get(cause, 0.0)
    return sorted(((n, d) for n, d in diffs.items() if abs(d) >= 0.05), key=lambda nd: -abs(nd[1]))


def _splits(nodes: int) -> list[int]:
    """Rollout node counts to try: every count up to 8, then steps of about 1/8 of the cluster."""
    step = max(1, nodes // 16)
    return sorted({*range(1, min(nodes, 9)), *range(step, nodes, step)})


@dataclass(frozen=True)
class ScalePoint:
    """The fastest configuration found at one cluster size."""

    gpus: int
    trainer_nodes: int
    rollout_nodes: int
    best: Ranked


def scaling(
    shape: ModelShape,
    train: TrainingShape,
    timing: RecipeTiming,
    machine: Machine,
    gpu_mem_bytes: int,
    total_gpus: list[int],
    model_parallel: tuple[int, int, int] | None = None,
) -> list[ScalePoint]:
    """For each cluster size: the split (dedicated rollout nodes) and trainer layout with the shortest
    step; with ``model_parallel = (tp, pp, cp)`` only DP and the split change (a recipe's own shape)."""
    per_node = machine.gpus_per_node
    points = []
    for gpus in total_gpus:
        nodes = gpus // per_node
        best = None
        for rollout_nodes in _splits(nodes):
            rollout = replace(timing.rollout, gpus=rollout_nodes * per_node, colocated=False)
            variant = replace(timing, rollout=rollout)
            world = (nodes - rollout_nodes) * per_node
            ranked = rank_layouts(shape, train, variant, machine, world, gpu_mem_bytes, model_parallel)
            if ranked and (best is None or ranked[0].step.total < best[2].step.total):
                best = (nodes - rollout_nodes, rollout_nodes, ranked[0])
        if best is None:
            raise ValueError(f"--scale: no trainer layout fits on {gpus} GPUs with a dedicated rollout")
        points.append(ScalePoint(gpus=gpus, trainer_nodes=best[0], rollout_nodes=best[1], best=best[2]))
    return points
