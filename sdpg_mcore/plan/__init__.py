"""Planning a run before queueing it: exact parameter counts, per-GPU memory by component, and the
predicted step time by phase.

- memory: ``shape`` (parameter counts), ``memory`` (bytes per component), ``layout`` (valid and
  proposed TP/PP/CP/DP layouts);
- time: ``hardware`` (devices as data, the efficiency factors), ``lengths`` / ``workload`` (what a
  step asks), ``generation_time``, ``compute_time``, ``transfer_time`` (the phases), ``step_time``
  (their sum), ``layout_search`` (fastest fitting layout, scaling), ``recipe_time`` / ``time_report``
  (from a recipe), ``published`` (the model against published runs), ``bench_agreement`` and
  ``calibrate`` (the model against a CPU measurement).

``tools/plan.py`` is the command-line front end; this package holds the logic so tests and the
trainer can call it. The time model is pure arithmetic on frozen dataclasses (no torch).
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
