"""What the GPU check's step stages hold the trainer to, as pure judgements with fixed limits.

Each judge takes what a stage measured and returns the problems found (empty: the check passed);
tests feed them deliberately broken inputs on CPU. The limits are fixed, not widened by what was
measured:

- log-probs (:func:`judge_logprobs`): the trainer's old log-probs of step 1 (bf16 weights and
  activations) against ``transformers`` in fp64 on the same bf16 weights, an independent
  implementation: mean ``|Δ log p|`` per token at most :data:`LOGPROB_MEAN_TOL`. Why that bound: a
  bf16 activation carries a rounding error of at most 2^-9 relative; the residual stream of the two
  layers is rounded about ten times, so the final hidden state is off by at most ~2 % in norm and a
  logit of a random-init model (standard deviation ~1) by ~0.02, a log-prob by at most twice that.
  A position, mask or shift error moves log-probs of these models by tenths of a nat and more.
- memory (:func:`judge_peak`): the measured peak of allocated device memory in a step at most
  :data:`PLAN_HEADROOM` times what ``sdpg_mcore.plan`` predicts for the same shape (an
  under-estimate is what makes a planned layout run out of memory).
- colocated offload (:func:`judge_offload`): the trainer's offload frees at least
  :data:`OFFLOAD_MIN_FREED` of its device bytes (measured by the allocator) and the reload gives every
  tensor back bit for bit.
"""

from __future__ import annotations

import math

LOGPROB_MEAN_TOL = 0.05
"""Largest mean ``|trainer - fp64 reference|`` log-prob per response token (nats); module docstring."""
PLAN_HEADROOM = 1.10
"""Largest measured peak / planned peak of a training step."""
OFFLOAD_MIN_FREED = 0.95
"""Smallest share of the trainer's offloaded bytes the allocator must see freed."""


def judge_finite(steps: list[dict]) -> list[str]:
    """Every numeric metric of every step finite."""
    return [
        f"step {i + 1}: {k} = {v}"
        for i, step in enumerate(steps)
        for k, v in step.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]


def judge_logprobs(mismatch: float, limit: float = LOGPROB_MEAN_TOL) -> list[str]:
    """The step's ``logprob_mismatch`` (mean |old - rollout| with the fp64 reference as rollout)."""
    if not mismatch <= limit:
        return [f"trainer log-probs differ from the fp64 transformers reference by {mismatch:.3g} nats/token "
                f"on average (limit {limit:g})"]  # fmt: skip
    return []


def judge_peak(measured_bytes: int | None, planned_bytes: int, headroom: float = PLAN_HEADROOM) -> list[str]:
    """Measured step peak within ``headroom`` x the plan (None: no allocator statistics, CPU)."""
    if measured_bytes is None:
        return []
    if measured_bytes > headroom * planned_bytes:
        return [f"step peak {measured_bytes / 2**30:.2f} GiB exceeds the plan's {planned_bytes / 2**30:.2f} GiB "
                f"x {headroom:g}: tools/plan.py under-estimates this shape"]  # fmt: skip
    return []


def judge_offload(offloaded: int, allocated_drop: int | None, exact: bool) -> list[str]:
    """The offload freed what it moved (``allocated_drop``: None without allocator statistics) and the
    reload was bit-exact."""
    problems = [] if exact else ["colocated reload did not restore every trainer tensor bit for bit"]
    if offloaded <= 0:
        problems.append("colocated offload moved nothing")
    elif allocated_drop is not None and allocated_drop < OFFLOAD_MIN_FREED * offloaded:
        problems.append(
            f"colocated offload moved {offloaded / 2**30:.2f} GiB but the allocator freed only "
            f"{allocated_drop / 2**30:.2f} GiB (another reference keeps the storages alive)"
        )
    return problems
