"""Memory and parallelism planning: exact parameter counts and per-GPU memory by component.

``tools/plan.py`` is the command-line front end; this package holds the logic so tests and the
trainer can call it.
"""

from sdpg_mcore.plan.layout import Plan, candidate_layouts, evaluate, layout_problems, propose_layout
from sdpg_mcore.plan.memory import GIB, Layout, MemoryEstimate, TrainingShape, estimate_memory
from sdpg_mcore.plan.shape import ModelShape, padded_vocab_size

__all__ = [
    "GIB",
    "Layout",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "TrainingShape",
    "candidate_layouts",
    "estimate_memory",
    "evaluate",
    "layout_problems",
    "padded_vocab_size",
    "propose_layout",
]
