"""The fused head's per-block work in two implementations behind one interface.

* ``torch`` (:class:`TorchPath`): per block the GEMMs and ~80 aten ops, most of them elementwise
  passes over the block's logits or tiny per-token merges (``kl_head_math``). The CPU
  implementation, and the reference the kernels are tested against.
* ``triton`` (:class:`TritonPath`): per block a cuBLAS GEMM of the raw stacked logits and ONE
  Triton kernel each way (``kl_head_kernels``): the forward kernel folds the block into the running
  fp32 state in place, the backward kernel writes ``dz`` in the GEMM operand's dtype.

Both take an optional ``teacher_VH``: the teacher's own output layer (a teacher other than
the current policy), whose rows multiply the teacher half of the stacked hidden states in a second
GEMM into the same block (``kl_head_math.two_weight_logits``); the kernels see the same logits.
Both take the same plan, produce the same ``HeadState`` for the TP all-reduce and ``finalize``,
and hand ``dz`` with its weight rows to the same ``dh`` / ``dW`` GEMMs (``fused_kl_head``).
``auto`` is triton on CUDA when Triton is importable (and the inputs are not fp64), torch
elsewhere.
"""

from __future__ import annotations

import math

import torch

from sdpg_mcore.ops.kl_head_math import (
    ChunkPlan,
    GradCoefficients,
    HeadState,
    Workspace,
    block_grad_logits,
    block_state,
    empty_state,
    merge_states,
    raw_logits,
)

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``torch`` or ``triton`` for ``name`` on ``device``; a clear ValueError when triton cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "torch" or (name == "auto" and (device.type != "cuda" or dtype == torch.float64)):
        return "torch"
    from sdpg_mcore.ops.triton_support import unavailable_reason

    reason = unavailable_reason(device)
    if name == "auto":
        return "torch" if reason else "triton"
    if reason is None and dtype == torch.float64:
        reason = "its kernels accumulate in fp32; use backend='torch' for fp64 inputs"
    if reason:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "triton"


def make_path(backend: str) -> TorchPath | TritonPath:
    """The per-block implementation of a resolved backend (``resolve_backend``)."""
    return TritonPath() if backend == "triton" else TorchPath()


def _rows(weight_VH: torch.Tensor | None, start: int, stop: int, plan: ChunkPlan) -> torch.Tensor | None:
    """Rows ``[start, stop)`` of a weight shard as a matmul operand; None for an absent weight (no
    teacher weight of its own)."""
    return None if weight_VH is None else plan.as_matmul_operand(weight_VH[start:stop])


class TorchPath:
    """Aten ops per block (``kl_head_math.block_state`` / ``block_grad_logits``)."""

    name = "torch"

    def workspace(
        self, plan: ChunkPlan, device: torch.device, with_teacher: bool, backward: bool
    ) -> Workspace:
        return Workspace(plan.group_tokens, plan.block_rows, plan, device, with_teacher, plan.acc_dtype)

    def group_state(
        self, hidden_KH, weight_VH, targets_G, plan: ChunkPlan, workspace, teacher_VH=None
    ) -> HeadState:
        """Statistics of one token group over this shard's vocabulary, block by block."""
        state = None
        for v0 in plan.blocks():
            weight_BH = _rows(weight_VH, v0, plan.block_end(v0), plan)
            teacher_BH = _rows(teacher_VH, v0, plan.block_end(v0), plan)
            block = block_state(hidden_KH, weight_BH, targets_G, v0, plan, workspace, teacher_BH)
            state = block if state is None else merge_states(state, block)
        return empty_state(targets_G.shape[0], plan, hidden_KH.device) if state is None else state

    def coefficients(self, coeffs_G: GradCoefficients) -> GradCoefficients:
        return coeffs_G

    def grad_logits(
        self, hidden_KH, weight_VH, targets_G, v0: int, coeffs, plan: ChunkPlan, workspace, teacher_VH=None
    ):
        """``(dz_GB, weight_BH)`` of the block at ``v0``: its real rows only."""
        weight_BH = _rows(weight_VH, v0, plan.block_end(v0), plan)
        teacher_BH = _rows(teacher_VH, v0, plan.block_end(v0), plan)
        dz_GB = block_grad_logits(hidden_KH, weight_BH, targets_G, v0, coeffs, plan, workspace, teacher_BH)
        return dz_GB, weight_BH


class TritonPath:
    """A cuBLAS GEMM and one Triton kernel per block each way (``kl_head_kernels``)."""

    name = "triton"

    def __init__(self):
        from sdpg_mcore.ops import kl_head_kernels

        self.kernels = kl_head_kernels

    @staticmethod
    def dz_dtype(plan: ChunkPlan) -> torch.dtype:
        """``dz`` in the dtype the gradient GEMMs take on CUDA: bf16 for bf16 inputs, else fp32."""
        return plan.in_dtype if plan.in_dtype in (torch.bfloat16, torch.float16) else plan.acc_dtype

    def workspace(
        self, plan: ChunkPlan, device: torch.device, with_teacher: bool, backward: bool
    ) -> Workspace:
        aux_dtype = self.dz_dtype(plan) if backward else None
        return Workspace(plan.group_tokens, plan.block_rows, plan, device, with_teacher, aux_dtype)

    def group_state(
        self, hidden_KH, weight_VH, targets_G, plan: ChunkPlan, workspace, teacher_VH=None
    ) -> HeadState:
        """Statistics of one token group: each block's kernel merges into one ``[7, G]`` state."""
        num_rows = targets_G.shape[0]
        with_teacher = hidden_KH.shape[0] > num_rows
        state_7G = torch.zeros(7, num_rows, dtype=torch.float32, device=hidden_KH.device)
        state_7G[0] = -math.inf
        state_7G[4] = -math.inf if with_teacher else 0.0  # as the torch path's teacher-free blocks
        temps = (plan.inv_temperature, plan.inv_teacher_temperature)
        for v0 in plan.blocks():
            width = plan.gemm_rows(v0)
            weight_WH, teacher_WH = (_rows(w, v0, v0 + width, plan) for w in (weight_VH, teacher_VH))
            logits_KW = raw_logits(hidden_KH, weight_WH, workspace.views(num_rows, width)[0], teacher_WH)
            first_id, num_cols = plan.vocab_offset + v0, plan.block_end(v0) - v0
            self.kernels.launch_block_state(
                logits_KW, num_rows, state_7G, targets_G, first_id, num_cols, temps
            )
            del logits_KW  # on CUDA a fresh GEMM output: free it before the next block's exists
        return HeadState(*state_7G.unbind(0))

    def coefficients(self, coeffs_G: GradCoefficients) -> tuple[torch.Tensor, bool]:
        """The ``[5, G]`` fp32 rows ``kl_head_kernels.COEFF_ROWS`` (absent ones zero), and whether
        the one-hot term is present."""
        zero = torch.zeros_like(coeffs_G.a)
        b = zero if coeffs_G.b is None else coeffs_G.b
        d = zero if coeffs_G.d is None else coeffs_G.d
        rows = torch.stack([coeffs_G.a, b, coeffs_G.c, d, coeffs_G.log_z_s]).float()
        return rows, coeffs_G.d is not None

    def grad_logits(
        self, hidden_KH, weight_VH, targets_G, v0: int, coeffs, plan: ChunkPlan, workspace, teacher_VH=None
    ):
        """``(dz_GW, weight_WH)`` of the block at ``v0`` over its aligned GEMM width (zeros past the
        real rows, so the gradient GEMMs keep the aligned shape too)."""
        coeffs_5G, has_onehot = coeffs
        num_rows, width = targets_G.shape[0], plan.gemm_rows(v0)
        weight_WH, teacher_WH = (_rows(w, v0, v0 + width, plan) for w in (weight_VH, teacher_VH))
        logits, dz_GW = workspace.views(num_rows, width)
        logits_KW = raw_logits(hidden_KH, weight_WH, logits, teacher_WH)
        temps = (plan.inv_temperature, plan.inv_teacher_temperature)
        first_id, num_cols = plan.vocab_offset + v0, plan.block_end(v0) - v0
        self.kernels.launch_block_grad(
            logits_KW, dz_GW, coeffs_5G, targets_G, first_id, num_cols, temps, has_onehot
        )
        return dz_GW, weight_WH
