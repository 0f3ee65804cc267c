"""The trainer stops, with a clear error, instead of training on (or publishing) non-finite numbers.

Three checks, each collective over all ranks so every rank stops at the same point:

- :func:`grads_finite` before each optimizer update: a non-finite gradient on any rank skips the
  update (``Policy.optimizer_step``), so one bad mini-batch never reaches the weights;
- :class:`NonFiniteGuard` after each step: a non-finite loss or a skipped update counts as a bad
  step; more than ``trainer.nonfinite_patience`` bad steps in a row raise :class:`NonFiniteError`;
- :func:`check_weights` before each weight push: weights that are already non-finite (an
  update with ``optimizer.lr=inf``, an overflow) raise at once; they are never sent to the rollout
  servers and never checkpointed.

Why not Megatron's own checks: it skips updates only under fp16 loss scaling, and its
``check_for_nan_in_grad`` raises without naming the step or the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from sdpg_mcore.models.builder import unwrap_model

logger = logging.getLogger(__name__)

#: Metrics whose non-finite value marks a bad step: the loss (a total, so a NaN in any token's policy or
#: KL term reaches it) and the update's norm. Per-token means such as ``pg_loss`` and ``kl_mean`` are not
#: watched: they are NaN when they have no token, e.g. OPSD's positive-advantage gate in a step where
#: no group holds a right answer, and the loss is then a finite 0.
WATCHED = ("loss", "grad_norm")


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; the message names the step, what was non-finite and the fix."""


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (a MIN all-reduce; local value without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())


def grads_finite(chunks) -> bool:
    """Whether every gradient (Megatron's ``main_grad`` buffers) is finite on every rank; collective."""
    grads = []
    for chunk in chunks:
        for param in unwrap_model(chunk).parameters():
            grads.append(getattr(param, "main_grad", param.grad))
    return all_ranks_true(_finite(grads))


def params_finite(chunks) -> bool:
    """Whether every weight is finite on every rank; collective."""
    return all_ranks_true(_finite(p.detach() for c in chunks for p in unwrap_model(c).parameters()))


def check_weights(chunks, step: int, lr: float) -> None:
    """Raise :class:`NonFiniteError` when any weight is non-finite on any rank (collective): call it
    before pushing weights to the rollout servers, so NaN is never served, saved or trained on."""
    if not params_finite(chunks):
        raise NonFiniteError(
            f"step {step}: the optimizer update made the weights non-finite (learning rate {lr}); "
            "they were not sent to the rollout servers nor saved. Lower optimizer.lr (it must be "
            "finite) or raise optimizer.adam_eps, then resume from the last checkpoint."
        )


class NonFiniteGuard:
    """Counts bad steps (non-finite loss, skipped updates) and stops the run past ``patience``."""

    def __init__(self, patience: int):
        if patience < 0:
            raise ValueError(f"trainer.nonfinite_patience must be >= 0, got {patience}")
        self.patience = patience
        self.bad_in_a_row = 0
        self._skipped_before = 0

    def check(self, step: int, metrics: dict[str, float], skipped_updates: int) -> None:
        """After ``step``: raise :class:`NonFiniteError` once more than ``patience`` steps in a row were bad."""
        skipped = skipped_updates - self._skipped_before
        self._skipped_before = skipped_updates
        bad = [k for k in WATCHED if k in metrics and not _finite_number(metrics[k])]
        if not all_ranks_true(not bad and skipped == 0):
            self.bad_in_a_row += 1
            what = ", ".join(bad) or "a gradient on some rank"
            logger.warning(
                "step %d: non-finite %s; %d update(s) skipped (%d bad step(s) in a row, patience %d)",
                step, what, skipped, self.bad_in_a_row, self.patience,
            )  # fmt: skip
            if self.bad_in_a_row > self.patience:
                raise NonFiniteError(
                    f"step {step}: non-finite {what} in {self.bad_in_a_row} step(s) in a row "
                    f"(trainer.nonfinite_patience={self.patience}); the run stops without saving. Lower "
                    "optimizer.lr or optimizer.clip_grad, check the data, then resume from the last "
                    "checkpoint (or raise trainer.nonfinite_patience to skip more such steps)."
                )
        else:
            self.bad_in_a_row = 0


def _finite_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True
