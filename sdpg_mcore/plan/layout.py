"""Validate a TP/PP/CP/DP layout, or propose the smallest model-parallel layout that fits.

Rules (Megatron's, plus one of ours): TP stays inside a node (it all-reduces every layer);
TP divides the attention heads, the key/value groups and the MLP width; PP divides the layers
(even stages); CP is a power of two; ``tp * pp * cp`` divides the world size and the rest is DP.
Among the layouts that fit, the smallest model-parallel size wins (most data parallelism),
then the fewest pipeline stages (no bubble), then the least context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpg_mcore.plan.memory import Layout, MemoryEstimate, TrainingShape, estimate_memory
from sdpg_mcore.plan.shape import ModelShape

MAX_CP = 16


@dataclass(frozen=True)
class Plan:
    """The outcome for one layout: its memory, whether it fits, and why it is invalid if it is."""

    layout: Layout
    estimate: MemoryEstimate | None
    gpu_mem_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def fits(self) -> bool:
        return self.valid and self.estimate is not None and self.estimate.total <= self.gpu_mem_bytes


def layout_problems(shape: ModelShape, layout: Layout, gpus_per_node: int, world_size: int) -> list[str]:
    """Why ``layout`` cannot run this model on this cluster (empty when it can)."""
    problems = []
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    if min(tp, pp, cp, layout.dp) < 1:
        problems.append("tp, pp, cp and dp must all be >= 1")
        return problems
    if layout.world_size != world_size:
        problems.append(f"tp*pp*cp*dp = {layout.world_size} but the cluster has {world_size} GPUs")
    if tp > gpus_per_node or gpus_per_node % tp:
        problems.append(f"tp={tp} must divide gpus-per-node={gpus_per_node} (TP stays inside a node)")
    if shape.num_kv_heads % tp or shape.num_heads % tp:
        problems.append(
            f"tp={tp} must divide num_attention_heads={shape.num_heads} and num_key_value_heads={shape.num_kv_heads}"
        )
    if shape.intermediate_size % tp:
        problems.append(f"tp={tp} must divide intermediate_size={shape.intermediate_size}")
    if shape.num_layers % pp:
        problems.append(f"pp={pp} must divide num_hidden_layers={shape.num_layers}")
    if cp & (cp - 1):
        problems.append(f"cp={cp} must be a power of two (load-balanced 2*cp chunking)")
    return problems


def evaluate(
    shape: ModelShape,
    layout: Layout,
    train: TrainingShape,
    gpus_per_node: int,
    world_size: int,
    gpu_mem_bytes: int,
) -> Plan:
    """The plan for one given layout (estimate only when the layout is valid)."""
    problems = layout_problems(shape, layout, gpus_per_node, world_size)
    estimate = None if problems else estimate_memory(shape, layout, train)
    return Plan(layout=layout, estimate=estimate, gpu_mem_bytes=gpu_mem_bytes, problems=problems)


def candidate_layouts(shape: ModelShape, gpus_per_node: int, world_size: int) -> list[Layout]:
    """Every valid layout for this model and cluster."""
    out = []
    for tp in (d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0):
        for pp in (d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0):
            cp = 1
            while cp <= MAX_CP:
                mp = tp * pp * cp
                if world_size % mp == 0:
                    layout = Layout(tp=tp, pp=pp, cp=cp, dp=world_size // mp)
                    if not layout_problems(shape, layout, gpus_per_node, world_size):
                        out.append(layout)
                cp *= 2
    return out


def propose_layout(
    shape: ModelShape, train: TrainingShape, gpus_per_node: int, world_size: int, gpu_mem_bytes: int
) -> Plan:
    """The best fitting layout, or (when none fits) the one with the lowest per-GPU peak."""
    plans = [
        evaluate(shape, layout, train, gpus_per_node, world_size, gpu_mem_bytes)
        for layout in candidate_layouts(shape, gpus_per_node, world_size)
    ]
    if not plans:
        raise ValueError(
            f"no valid TP/PP/CP layout for {world_size} GPUs ({gpus_per_node} per node) and this model; "
            "check --nodes/--gpus-per-node"
        )
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(
            fitting, key=lambda p: (p.layout.model_parallel_size, p.layout.pp, p.layout.cp, p.estimate.total)
        )
    return min(plans, key=lambda p: (p.estimate.total, p.layout.model_parallel_size))
