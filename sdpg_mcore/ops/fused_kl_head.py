"""Fused vocab-parallel LM head: reverse KL to a teacher, sampled-token log-prob and entropy.

SDPG needs, at every response token, the full-vocabulary reverse KL between the
student ``softmax(h_s W^T / T)`` and the teacher ``softmax(h_t W^T / T_t)`` (same weight, no grad;
or the teacher's own ``W_t`` when the teacher is other weights, ``teacher_weight``), plus the
sampled-token log-prob and the student entropy. Materialising ``[N, V]`` logits for both
costs ~2.5 GB per bf16 copy at 8,192 tokens x 151,936 words, and several fp32 temporaries more.
This module never builds ``[N, V]``:

* forward: the local vocabulary shard in blocks of ``B`` rows, every block over all ``N`` tokens
  (``N * B <= chunk_size * V_local`` elements per buffer, so the peak equals a chunk of
  ``chunk_size`` tokens over the whole shard while the matmuls keep ``M = N``). Each block yields
  max-shifted softmax statistics (``kl_head_math.HeadState``) in fp32 (fp64 for fp64 inputs),
  merged exactly across blocks, then across the tensor-parallel shards with ONE ``MAX``
  all-reduce of the stacked ``(m_s, m_t)`` and ONE ``SUM`` all-reduce of the stacked
  ``(S_s, H_num, KL_num, S_t, z_target)`` per call. Only the inputs and four
  per-token scalars (both log-partition functions, kl, entropy) are saved.
* backward: the same blocks; per block the logits of all tokens are recomputed, ``dz`` is formed
  from the saved per-token scalars, so each block's weight gradient ``dW_b = dz^T h`` is complete in
  one matmul (no fp32 ``[V, H]`` accumulator), while ``dh += dz W_b`` accumulates into ``[N, H]``,
  summed over the tensor-parallel group once at the end.
* blocks are multiples of 128 rows; tokens are split into groups only when blocks would otherwise
  be thinner than ``MIN_BLOCK_ROWS`` (huge ``N`` or tiny ``chunk_size``); each group then has its
  own two all-reduces (``kl_head_math``: how the plan is chosen).
* the per-block work has two implementations (``backend``, ``kl_head_backends``): ``triton`` runs a
  cuBLAS GEMM and ONE fused Triton kernel per block each way (``kl_head_kernels``), ``torch`` the
  same arithmetic as aten ops (the CPU implementation and the kernels' reference).

Cost: 6 ``N x V x H`` matmuls with a teacher (forward 2, backward recompute 2, gradients 2) against
4 for a materialising implementation; in exchange no ``[N, V]`` tensor. Per vocabulary block the
triton path launches 6 kernels and moves ~39 bytes per (token, vocab) pair, the torch path 82 and
130 (``python tools/bench_kl.py --count``: measured on CPU, Triton under its interpreter).

Megatron pads the vocabulary to a multiple of ``128 * TP``; padding is always the tail of the global
vocabulary, so each rank simply uses the prefix ``W[:V_real_local]`` of its shard and padded rows
get exactly zero gradient.

    kl_N, logprob_N, entropy_N = fused_kl_head(h_s_NH, h_t_NH, weight_VH, targets_N, vocab_size=V)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sdpg_mcore.ops.kl_head_backends import make_path, resolve_backend
from sdpg_mcore.ops.kl_head_math import (
    ChunkPlan,
    ChunkStats,
    all_reduce_state,
    finalize,
    matmul_into,
    plan_chunks,
    stack_hidden,
)

__all__ = ["fused_kl_head", "vocab_parallel_logprob_entropy"]


def _group_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        if tp_group is not None:
            raise ValueError(
                "tp_group was given but torch.distributed is not initialised; pass tp_group=None"
            )
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(tensor: torch.Tensor, op, tp_group, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor


def _group_forward(
    hidden_KH, weight_VH, teacher_weight_VH, targets_G, plan, path, workspace, tp_group
) -> ChunkStats:
    """Statistics of one token group: loop over vocabulary blocks, then merge over the TP shards."""
    state = path.group_state(hidden_KH, weight_VH, targets_G, plan, workspace, teacher_weight_VH)
    if plan.tp_size > 1:
        state = all_reduce_state(state, lambda t, op: _all_reduce(t, op, tp_group, plan.tp_size))
    return finalize(state)


class _FusedKLHead(torch.autograd.Function):
    """Autograd node for the fused head; see the module docstring for the algorithm."""

    @staticmethod
    def forward(
        ctx, student_NH, teacher_NH, weight_VH, targets_N, plan: ChunkPlan, tp_group, path, teacher_weight_VH
    ):
        ctx.set_materialize_grads(False)
        num_tokens, device = student_NH.shape[0], student_NH.device
        kl_N = torch.zeros(num_tokens, dtype=plan.acc_dtype, device=device)
        logprob_N, entropy_N, log_z_s_N = (torch.empty_like(kl_N) for _ in range(3))
        log_z_t_N = torch.zeros_like(kl_N)
        workspace = path.workspace(plan, device, teacher_NH is not None, backward=False)
        for g0 in range(0, num_tokens, plan.group_tokens):
            g1 = min(g0 + plan.group_tokens, num_tokens)
            teacher_GH = None if teacher_NH is None else plan.as_matmul_operand(teacher_NH[g0:g1])
            hidden_KH = stack_hidden(plan.as_matmul_operand(student_NH[g0:g1]), teacher_GH)
            stats = _group_forward(
                hidden_KH, weight_VH, teacher_weight_VH, targets_N[g0:g1], plan, path, workspace, tp_group
            )
            logprob_N[g0:g1], entropy_N[g0:g1], log_z_s_N[g0:g1] = stats.logprob, stats.entropy, stats.log_z_s
            if teacher_GH is not None:
                kl_N[g0:g1], log_z_t_N[g0:g1] = stats.kl, stats.log_z_t
        del workspace
        ctx.plan, ctx.tp_group, ctx.path, ctx.has_teacher = plan, tp_group, path, teacher_NH is not None
        ctx.save_for_backward(
            student_NH,
            teacher_NH,
            weight_VH,
            targets_N,
            log_z_s_N,
            log_z_t_N,
            kl_N,
            entropy_N,
            teacher_weight_VH,
        )
        return kl_N.to(plan.out_dtype), logprob_N.to(plan.out_dtype), entropy_N.to(plan.out_dtype)

    @staticmethod
    def backward(ctx, grad_kl_N, grad_logprob_N, grad_entropy_N):
        student_NH, teacher_NH, weight_VH, targets_N, log_z_s_N, log_z_t_N, kl_N, entropy_N, teacher_w_VH = (
            ctx.saved_tensors
        )
        plan: ChunkPlan = ctx.plan
        path = ctx.path
        if not ctx.has_teacher:
            grad_kl_N = None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        no_upstream = grad_kl_N is None and grad_logprob_N is None and grad_entropy_N is None
        if no_upstream or not (need_h or need_w):
            return None, None, None, None, None, None, None, None
        num_tokens, device = student_NH.shape[0], student_NH.device
        grad_h_NH = torch.zeros(student_NH.shape, dtype=plan.acc_dtype, device=device)
        grad_w_VH = torch.zeros_like(weight_VH) if need_w else None
        coeffs = plan.grad_coefficients(
            grad_kl_N, grad_logprob_N, grad_entropy_N, log_z_s_N, log_z_t_N, kl_N, entropy_N
        )
        student_c = plan.as_matmul_operand(student_NH)
        teacher_c = None if grad_kl_N is None else plan.as_matmul_operand(teacher_NH)
        workspace = path.workspace(plan, device, teacher_c is not None, backward=True)
        for g0 in range(0, num_tokens, plan.group_tokens):
            g1 = min(g0 + plan.group_tokens, num_tokens)
            student_GH = student_c[g0:g1]
            hidden_KH = stack_hidden(student_GH, None if teacher_c is None else teacher_c[g0:g1])
            coeffs_G = path.coefficients(coeffs.rows(g0, g1))
            teacher_w = None if teacher_c is None else teacher_w_VH
            for v0 in plan.blocks():
                dz_GB, weight_BH = path.grad_logits(
                    hidden_KH, weight_VH, targets_N[g0:g1], v0, coeffs_G, plan, workspace, teacher_w
                )
                dz_op = plan.as_matmul_operand(dz_GB)
                if need_h:  # in place: no [N, H] temporary per block where the GEMM can accumulate
                    matmul_into(grad_h_NH[g0:g1], dz_op, weight_BH, accumulate=True)
                if need_w:  # complete for this block unless tokens were split into groups
                    rows = slice(v0, v0 + dz_GB.shape[1])
                    matmul_into(grad_w_VH[rows], dz_op.t(), student_GH, accumulate=g0 > 0)
        del workspace
        if need_h:
            _all_reduce(grad_h_NH, dist.ReduceOp.SUM, ctx.tp_group, plan.tp_size)
        grad_h = grad_h_NH.to(student_NH.dtype) if need_h else None
        return grad_h, None, grad_w_VH, None, None, None, None, None


def fused_kl_head(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int | None = None,
    tp_group=None,
    backend: str = "auto",
    teacher_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse KL(student || teacher), sampled-token log-prob and student entropy per token.

    Args:
        student_hidden: ``[N, H]`` final-norm hidden states of the student (with grad).
        teacher_hidden: ``[N, H]`` teacher hidden states from a no-grad forward, or ``None``
            (then ``kl`` is zeros and no teacher matmul runs). Never receives a gradient.
        weight: ``[V_local, H]`` this rank's shard of the output layer; rank ``r`` of ``tp_group``
            holds global rows ``[r * V_local, (r + 1) * V_local)``.
        targets: ``[N]`` global token ids in ``[0, vocab_size)``.
        vocab_size: the true vocabulary; rows at or beyond it (Megatron padding) are masked out.
        temperature: divides the student logits.
        teacher_temperature: divides the teacher logits.
        chunk_size: memory knob, in tokens: each of the three workspace buffers holds
            ``chunk_size * V_local`` elements (vocabulary blocks over all tokens, see the module
            docstring). ``None`` fits the buffers in 256 MiB
            (``kl_head_math.DEFAULT_CHUNK_BUDGET_BYTES``).
        tp_group: process group splitting the vocabulary, or ``None`` for a single process.
        backend: ``torch`` (aten ops per block; the CPU implementation), ``triton`` (cuBLAS GEMMs
            and two fused Triton kernels per block; CUDA, or CPU under Triton's interpreter), or
            ``auto``: triton on CUDA when Triton is importable, torch elsewhere
            (``kl_head_backends``). A ValueError when triton is asked for where it cannot run.
        teacher_weight: ``[V_local, H]`` the teacher's own shard of the output layer, when the
            teacher is other weights than the student's (an EMA or the frozen initial policy);
            ``None``: the teacher's logits use ``weight`` (the self-teacher). Never receives a
            gradient; the stacked ``[student; teacher]`` GEMM of each block becomes two GEMMs into
            the same fp32 block (both backends).

    Returns:
        ``kl_N, logprob_N, entropy_N``: float32 (float64 for float64 inputs). Gradients flow to
        ``student_hidden`` and ``weight``. The KL is NOT clamped here (the loss does that).

    Tensor parallelism: every rank passes the same ``[N, H]`` hidden states (with sequence
    parallelism, all-gather them first) and receives the full ``dh``, already summed over
    ``tp_group`` — so do NOT also route the hidden states through Megatron's
    ``copy_to_tensor_model_parallel_region``, whose backward would sum it a second time.
    """
    tp_size, tp_rank = _group_size_rank(tp_group)
    plan = plan_chunks(
        student_hidden,
        teacher_hidden,
        weight,
        targets,
        vocab_size=vocab_size,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        chunk_size=chunk_size,
        tp_size=tp_size,
        tp_rank=tp_rank,
    )
    path = make_path(resolve_backend(backend, student_hidden.device, student_hidden.dtype))
    teacher = None
    if teacher_hidden is not None:
        teacher = teacher_hidden.detach().to(student_hidden.dtype)
    teacher_weight = _teacher_weight(teacher_weight, weight, teacher)
    return _FusedKLHead.apply(
        student_hidden, teacher, weight, targets.long(), plan, tp_group, path, teacher_weight
    )


def _teacher_weight(teacher_weight, weight, teacher_hidden) -> torch.Tensor | None:
    """The teacher's own output-layer shard as a detached operand in the weight's dtype; None
    without teacher hidden states (no teacher logits are formed)."""
    if teacher_weight is None or teacher_hidden is None:
        return None
    if teacher_weight.shape != weight.shape:
        raise ValueError(
            f"teacher_weight must have the weight's shape {tuple(weight.shape)}; "
            f"got {tuple(teacher_weight.shape)}"
        )
    return teacher_weight.detach().to(weight.dtype)


def vocab_parallel_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    tp_group=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(h W^T / T)[target]`` and the entropy per token, fused and vocab-parallel.

    The student-only path of :func:`fused_kl_head` (old-policy and reference log-prob passes,
    and training without a teacher); same arguments, same memory bound.
    """
    _, logprob_N, entropy_N = fused_kl_head(
        hidden,
        None,
        weight,
        targets,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        tp_group=tp_group,
        backend=backend,
    )
    return logprob_N, entropy_N
