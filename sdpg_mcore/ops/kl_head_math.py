"""The per-chunk arithmetic of the fused KL head: chunk planning, forward statistics, ``dz`` blocks.

Kept apart from the autograd node (``fused_kl_head.py``) so each piece reads on its own. All sums
are taken over max-shifted logits in the accumulation dtype (fp32, or fp64 for fp64 inputs), so a
bf16 model gets fp32 softmax statistics — the reference computes its KL and entropy in bf16.

Matmul precision: on CUDA, bf16/fp16 operands are multiplied with ``out_dtype=float32`` (the logits
are never rounded to bf16); on CPU, low-precision operands are up-cast to fp32 (the CPU path exists
for tests and small runs, and that costs one fp32 copy of the weight shard in the forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BUDGET_BYTES = 256 * 1024**2
"""Budget for the ``[chunk, V_local]`` temporaries of one chunk when ``chunk_size=None``.

256 MiB is ~110 tokens per chunk at Qwen3's 151,936-word vocabulary without TP (three fp32 buffers
per element: student logits, teacher logits, exp), large enough that the matmuls stay efficient."""

_BUFFERS_PER_ELEMENT = 3
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ChunkPlan:
    """Everything fixed for one call: shard geometry, chunking, temperatures, dtypes."""

    tp_size: int
    """Ranks in the tensor-parallel group (1 without a group)."""
    vocab_offset: int
    """Global id of this rank's first weight row (``rank * V_local``)."""
    real_rows: int
    """Rows of this shard below ``vocab_size`` (the rest is Megatron padding)."""
    chunk_tokens: int
    """Tokens per forward chunk."""
    block_rows: int
    """Vocabulary rows per backward block (``block_rows * N ~ chunk_tokens * V_local``)."""
    inv_temperature: float
    inv_teacher_temperature: float
    in_dtype: torch.dtype
    acc_dtype: torch.dtype
    """Dtype of logits and softmax sums: fp64 for fp64 inputs, else fp32."""
    on_cuda: bool

    @property
    def out_dtype(self) -> torch.dtype:
        return self.acc_dtype

    def as_matmul_operand(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype the matmuls take on this device (see the module docstring)."""
        if self.in_dtype in _LOW_PRECISION:
            return x.to(self.in_dtype if self.on_cuda else torch.float32)
        return x.to(self.acc_dtype)

    def prepare_weight(self, weight_VH: torch.Tensor) -> torch.Tensor:
        return self.as_matmul_operand(weight_VH[: self.real_rows])

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` with the result in ``acc_dtype``; low-precision CUDA operands accumulate in fp32."""
        if a.dtype in _LOW_PRECISION:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # builds without the out_dtype overload
                return torch.mm(a, b).float()
        return torch.mm(a, b)

    def grad_coefficients(self, grad_kl, grad_logprob, grad_entropy, log_z_s, log_z_t, kl, entropy):
        """Per-token coefficients of ``dz = p_s * (a*log p_s - b*log p_t + c) + d * onehot``.

        With tempered logits ``z = x / T``: ``dkl/dz = p_s (log p_s - log p_t - kl)``,
        ``dH/dz = -p_s (log p_s + H)``, ``dlogprob/dz = onehot - p_s``; the chain rule through
        ``/T`` divides every coefficient by ``T``. Missing upstream grads count as zero.
        """
        zero = torch.zeros_like(kl)
        g_kl = zero if grad_kl is None else grad_kl.to(self.acc_dtype)
        g_lp = zero if grad_logprob is None else grad_logprob.to(self.acc_dtype)
        g_ent = zero if grad_entropy is None else grad_entropy.to(self.acc_dtype)
        inv_t = self.inv_temperature
        return GradCoefficients(
            a=(g_kl - g_ent) * inv_t,
            b=None if grad_kl is None else g_kl * inv_t,
            c=-(g_kl * kl + g_ent * entropy + g_lp) * inv_t,
            d=None if grad_logprob is None else g_lp * inv_t,
            log_z_s=log_z_s,
            log_z_t=log_z_t,
        )


class GradCoefficients(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor | None
    c: torch.Tensor
    d: torch.Tensor | None
    log_z_s: torch.Tensor
    log_z_t: torch.Tensor


class ChunkStats(NamedTuple):
    kl: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor
    log_z_s: torch.Tensor
    log_z_t: torch.Tensor


def plan_chunks(
    student_NH: torch.Tensor,
    teacher_NH: torch.Tensor | None,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float,
    teacher_temperature: float,
    chunk_size: int | None,
    tp_size: int,
    tp_rank: int,
) -> ChunkPlan:
    """Validate the arguments of ``fused_kl_head`` and fix the chunking."""
    if student_NH.dim() != 2 or weight_VH.dim() != 2 or student_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"student_hidden must be [N, H] and weight [V_local, H] with the same H; got "
            f"{tuple(student_NH.shape)} and {tuple(weight_VH.shape)}"
        )
    if teacher_NH is not None and teacher_NH.shape != student_NH.shape:
        raise ValueError(
            f"teacher_hidden must have the student's shape {tuple(student_NH.shape)}; got {tuple(teacher_NH.shape)}"
        )
    num_tokens = student_NH.shape[0]
    if targets_N.shape != (num_tokens,) or targets_N.is_floating_point():
        raise ValueError(
            f"targets must be an integer tensor of shape [{num_tokens}]; got {targets_N.dtype} {tuple(targets_N.shape)}"
        )
    if not student_NH.is_floating_point() or student_NH.dtype != weight_VH.dtype:
        raise ValueError(
            f"student_hidden and weight must share one floating dtype; got {student_NH.dtype} and {weight_VH.dtype}"
        )
    local_rows = weight_VH.shape[0]
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= local_rows * tp_size:
        raise ValueError(
            f"vocab_size must be an int in [1, V_local * tp_size = {local_rows * tp_size}]; got {vocab_size!r}"
        )
    for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if num_tokens > 0:
        low, high = int(targets_N.min()), int(targets_N.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"targets must lie in [0, vocab_size={vocab_size}); got values in [{low}, {high}]"
            )

    acc_dtype = torch.float64 if student_NH.dtype == torch.float64 else torch.float32
    vocab_offset = tp_rank * local_rows
    real_rows = max(0, min(local_rows, vocab_size - vocab_offset))
    width = max(real_rows, 1)
    if chunk_size is None:
        per_token = _BUFFERS_PER_ELEMENT * width * torch.finfo(acc_dtype).bits // 8
        chunk_size = max(1, DEFAULT_CHUNK_BUDGET_BYTES // per_token)
    chunk_tokens = max(1, min(chunk_size, num_tokens))
    block_rows = max(1, min(width, chunk_tokens * width // max(num_tokens, 1)))
    return ChunkPlan(
        tp_size=tp_size,
        vocab_offset=vocab_offset,
        real_rows=real_rows,
        chunk_tokens=chunk_tokens,
        block_rows=block_rows,
        inv_temperature=1.0 / temperature,
        inv_teacher_temperature=1.0 / teacher_temperature,
        in_dtype=student_NH.dtype,
        acc_dtype=acc_dtype,
        on_cuda=student_NH.is_cuda,
    )


def _logits(hidden_CH: torch.Tensor, weight_BH: torch.Tensor, inv_t: float, plan: ChunkPlan) -> torch.Tensor:
    logits_CB = plan.matmul(plan.as_matmul_operand(hidden_CH), weight_BH.t())
    if inv_t != 1.0:
        logits_CB.mul_(inv_t)
    return logits_CB


def _row_max(logits_CB: torch.Tensor) -> torch.Tensor:
    if logits_CB.shape[1] == 0:  # a shard made only of padding rows
        return logits_CB.new_full((logits_CB.shape[0],), -math.inf)
    return logits_CB.amax(dim=1)


def _row_dot(a_CB: torch.Tensor, b_CB: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without a ``[C, B]`` temporary."""
    return torch.bmm(a_CB.unsqueeze(1), b_CB.unsqueeze(2)).view(-1)


def _local_target(
    targets_N: torch.Tensor, first_row: int, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each target in a block of ``num_rows`` rows starting at global ``first_row``."""
    local = targets_N - first_row
    inside = (local >= 0) & (local < num_rows)
    return local.clamp(0, max(num_rows - 1, 0)), inside


def chunk_statistics(
    student_CH: torch.Tensor,
    teacher_CH: torch.Tensor | None,
    weight_real_VH: torch.Tensor,
    targets_C: torch.Tensor,
    plan: ChunkPlan,
    all_reduce: Callable[[torch.Tensor, dist.ReduceOp], torch.Tensor],
) -> ChunkStats:
    """Forward for one chunk of tokens: one MAX and one SUM all-reduce over the vocab shards."""
    z_s = _logits(student_CH, weight_real_VH, plan.inv_temperature, plan)
    z_t = (
        None
        if teacher_CH is None
        else _logits(teacher_CH, weight_real_VH, plan.inv_teacher_temperature, plan)
    )
    maxes = torch.stack([_row_max(z_s), _row_max(z_s if z_t is None else z_t)])
    m_s, m_t = all_reduce(maxes, dist.ReduceOp.MAX)
    z_s.sub_(m_s.unsqueeze(1))
    exp_s = torch.exp(z_s)
    local, inside = _local_target(targets_C - plan.vocab_offset, 0, z_s.shape[1])
    if z_s.shape[1] > 0:
        target_logit = z_s.gather(1, local.unsqueeze(1)).squeeze(1) * inside
    else:
        target_logit = torch.zeros_like(m_s)
    sum_s = exp_s.sum(dim=1)
    ent_num = _row_dot(exp_s, z_s)  # sum p~ (z - m)
    if z_t is not None:
        z_t.sub_(m_t.unsqueeze(1))
        kl_num = _row_dot(exp_s, z_s.sub_(z_t))  # sum p~ ((z_s - m_s) - (z_t - m_t))
        sum_t = z_t.exp_().sum(dim=1)
    else:
        kl_num, sum_t = torch.zeros_like(sum_s), torch.ones_like(sum_s)
    del z_s, z_t, exp_s
    sum_s, sum_t, kl_num, ent_num, target_logit = all_reduce(
        torch.stack([sum_s, sum_t, kl_num, ent_num, target_logit]), dist.ReduceOp.SUM
    )
    log_s, log_t = sum_s.log(), sum_t.log()
    return ChunkStats(
        kl=kl_num / sum_s - log_s + log_t,
        logprob=target_logit - log_s,
        entropy=log_s - ent_num / sum_s,
        log_z_s=m_s + log_s,
        log_z_t=m_t + log_t,
    )


def block_grad_logits(
    student_NH: torch.Tensor,
    teacher_NH: torch.Tensor | None,
    weight_BH: torch.Tensor,
    targets_N: torch.Tensor,
    block_start: int,
    coeffs: GradCoefficients,
    plan: ChunkPlan,
) -> torch.Tensor:
    """``d loss / d raw logits`` for all tokens and the vocabulary rows of one block: ``[N, B]``."""
    log_p_s = _logits(student_NH, weight_BH, plan.inv_temperature, plan)
    log_p_s.sub_(coeffs.log_z_s.unsqueeze(1))
    dz = torch.exp(log_p_s)
    inner = log_p_s.mul_(coeffs.a.unsqueeze(1)).add_(coeffs.c.unsqueeze(1))
    if coeffs.b is not None:
        log_p_t = _logits(teacher_NH, weight_BH, plan.inv_teacher_temperature, plan)
        log_p_t.sub_(coeffs.log_z_t.unsqueeze(1))
        inner.sub_(log_p_t.mul_(coeffs.b.unsqueeze(1)))
        del log_p_t
    dz.mul_(inner)
    del inner, log_p_s
    if coeffs.d is not None:
        local, inside = _local_target(targets_N, plan.vocab_offset + block_start, dz.shape[1])
        dz.scatter_add_(1, local.unsqueeze(1), (coeffs.d * inside).unsqueeze(1))
    return dz
