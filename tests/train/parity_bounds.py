"""Tolerances for layout-parity tests, derived from fp32 arithmetic instead of tuned on one CPU.

Two runs of one training step at different layouts (TP, PP, DP, CP) do the same arithmetic in a
different order: TP splits the hidden, FFN and vocabulary reductions, DP and CP split the token
sums, and the CPU's kernels (AVX2, AVX-512, AMX; thread count) pick their own blocking. In fp32
(unit roundoff ``u = 2**-24``) a sum of ``K`` terms computed in another order changes by at most
``2 * K * u`` times the sum of the terms' magnitudes; a result that passes through ``DEPTH``
such reductions in sequence (forward and backward) moves by at most about ``DEPTH * K * u``
relative. That is the bound used here (``RHO``): loose next to the ~1e-6 seen in practice, and
still three orders of magnitude below what a real bug gives (a missing all-reduce or a wrong shard
is off by tens of percent).

Adam's first update is ``lr * g / (|g| + eps)``: with the usual ``eps = 1e-8`` it is about
``lr * sign(g)``, so a gradient entry near zero flips a unit-size update on a rounding error, and
weights after Adam cannot be compared at any fp32-derived bound. The parity steps therefore run
Adam with ``eps = 1`` (and ``lr = 1``): for clipped gradients (``|g| <= 1``) the update is then
Lipschitz in the gradient with constant 1 (it is ``g / (|g| + 1)``), so the update's relative error
is at most about twice the gradient's, and the real (distributed) Megatron optimizer still runs.
"""

from __future__ import annotations

import math

import torch

#: fp32 unit roundoff.
U32 = 2.0**-24
#: Longest reduction in the tiny test model (vocab 301 > hidden 64, FFN 96, tokens per mini-batch).
K = 301
#: Reductions in sequence: 2 layers x (qkv, scores, softmax, out-proj, fc1, fc2) + norms + head,
#: doubled for the backward pass.
DEPTH = 2 * (2 * 6 + 2 + 2)
#: Relative bound of a loss, gradient or update computed in another order (about 5.7e-4: 32 x 301 x 2**-24).
RHO = DEPTH * K * U32
#: Per-token magnitudes behind the compared metrics: log-probs of a 301-way softmax (|lp| <~ log 301
#: ~ 5.7 at these weights), ratios and advantages of order 1; a token mean of such terms moves by at
#: most RHO times this.
TERM_SCALE = 10.0


def assert_metric_close(key: str, value: float, ref: float) -> None:
    """A token-mean metric (or the gradient norm) within the fp32 reordering bound of the reference."""
    assert value is not None and math.isfinite(value), (key, value)
    bound = RHO * max(abs(ref), TERM_SCALE if key != "grad_norm" else 0.0)
    assert abs(value - ref) <= bound, (
        f"{key}: {value!r} vs {ref!r} (|diff| {abs(value - ref):.3g} > {bound:.3g})"
    )


def assert_update_close(name: str, weight: torch.Tensor, ref: torch.Tensor, initial: torch.Tensor) -> None:
    """The step's update ``weight - initial`` within ``2 * RHO`` (relative, Frobenius) of the reference's.

    ``4 * U32 * |ref|`` covers the rounding of each stored result ``fl(initial + update)``; the
    update itself must be non-trivial, or the comparison would say nothing.
    """
    w, r, w0 = (t.double() for t in (weight, ref, initial))
    update = (r - w0).norm()
    assert update > 1e3 * U32 * r.norm(), f"{name}: the step barely moved it ({update:.3g})"
    bound = 2 * RHO * update + 4 * U32 * r.norm()
    diff = (w - r).norm()
    assert diff <= bound, f"{name}: |w - w_ref| {diff:.3g} > {bound:.3g} (update norm {update:.3g})"


def parity_adam():
    """The optimizer of the parity steps: lr 1, no warm-up, constant schedule, no weight decay, Adam betas
    (0.9, 0.999), eps 1 (see above), gradient clip 1, distributed optimizer."""
    from sdpg_mcore.config import OptimizerConfig

    return OptimizerConfig(
        lr=1.0, lr_warmup_steps=0, lr_decay_style="constant", weight_decay=0.0, adam_eps=1.0
    )


def initial_weights(hf_dir) -> dict[str, torch.Tensor]:
    """The HF tensors every layout starts from (the step's updates are measured from these)."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))
