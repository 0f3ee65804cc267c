"""The block arithmetic of the fused KL head: planning, mergeable softmax statistics, ``dz`` blocks.

Kept apart from the autograd node (``fused_kl_head.py``) so each piece reads on its own. All sums
are taken over max-shifted logits in the accumulation dtype (fp32, or fp64 for fp64 inputs), so a
bf16 model gets fp32 softmax statistics — the reference computes its KL and entropy in bf16.

Matmul precision, chosen once per call from the device (``ChunkPlan.fp32_output_gemm``), never by
catching an error: where ``torch.mm(..., out_dtype=torch.float32)`` has a kernel (CUDA, from torch
2.8, the floor in ``setup.py``), bf16/fp16 operands go to it (cuBLAS accumulates in fp32 and writes
fp32: the logits are never rounded to bf16); on CPU, where that overload has no kernel, low-precision
operands are up-cast to fp32 block by block (the CPU path exists for tests and small runs; CPUs
rarely have fast bf16 GEMMs). ``dh += dz W`` accumulates in place through ``addmm``'s
``out_dtype`` form where it takes an fp32 accumulator with bf16 operands (CUDA, assumed from torch
2.11: pytorch/pytorch#167931 allowed it, older releases rejected it, #154086; the GPU check's
``head_fp64`` stage probes it), else through a product and an add.

How the plan is chosen (``plan_chunks``), from ``N`` tokens, the shard's ``V_local`` weight rows and
``chunk_size`` (tokens; ``None``: ``DEFAULT_CHUNK_BUDGET_BYTES``):

1. budget: ``chunk_size * V_local`` elements per ``[tokens, rows]`` workspace buffer;
2. tokens per group: all ``N`` while the budget still gives every token ``ROW_ALIGN`` rows, else
   ``budget // ROW_ALIGN`` (each further group costs two more all-reduces in the forward);
3. rows per block: ``budget // group_tokens`` rounded DOWN to a multiple of ``ROW_ALIGN`` (128), or
   the whole shard when it fits (a shard of at most 128 rows is one block of its own width). So the
   fp32 logits of a block lie ``4 * block_rows`` bytes apart row to row and a bf16 ``dz``
   ``2 * block_rows`` — multiples of 512 and 256 B, aligned for cuBLAS's and Triton's vector loads;
   at Qwen3's shape (8,192 tokens, 151,936 rows, default budget) 21 x 128 = 2,688 rows instead of
   the 2,726 (10,904-B fp32 rows) of an unaligned split.
4. the last block holds what is left of the real rows; the Triton path still multiplies
   ``gemm_rows`` = that count rounded UP to 128 (the weight's own padding rows, which Megatron keeps
   to a multiple of ``128 * TP``, or as many rows as the shard has) so its logits keep the aligned
   width, and masks the columns past the real rows.

Every rank plans from ``V_local``, not from its real rows, so all ranks make the same groups.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BUDGET_BYTES = 256 * 1024**2
"""Budget for the three ``[tokens, rows]`` fp32 workspace buffers when ``chunk_size=None``.

``chunk_size = budget // (3 * V_local * 4)``: 147 tokens' worth at Qwen3's 151,936-word vocabulary
without TP, i.e. blocks of ~2,700 vocabulary rows for 8,192 tokens — wide enough for efficient
matmuls; the three buffers together are ~1/19 of ONE materialised fp32 ``[8192, 151936]`` tensor."""

_BUFFERS_PER_ELEMENT = 3
ROW_ALIGN = 128
"""Vocabulary blocks are multiples of this many rows (module docstring, "How the plan is chosen")."""
MIN_BLOCK_ROWS = ROW_ALIGN
"""Thinnest vocabulary block worth a matmul; below it the tokens are split into groups instead."""
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_ADDMM_FP32_ACCUMULATOR = torch.torch_version.TorchVersion(torch.__version__) >= (2, 11)
"""CUDA's ``addmm(fp32, bf16, bf16, out_dtype=float32, out=fp32)``: assumed accepted from torch 2.11
(``audit.head_check.gemm_capabilities`` checks the assumption on a GPU)."""


def _has_kernel(op: str, device: torch.device) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, device.type.upper())


def fp32_output_gemm_on(device: torch.device) -> bool:
    """``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on ``device``: always on CUDA; on CPU
    only where a kernel is registered (none in torch 2.13; ``ops.kl_head_traffic`` registers one
    to replay the CUDA path's ops on CPU)."""
    return device.type == "cuda" or _has_kernel("aten::mm.dtype", device)


def fp32_accumulating_gemm_on(device: torch.device) -> bool:
    """``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` accumulates bf16 products into an
    fp32 ``c`` in place on ``device``."""
    if device.type == "cuda":
        return _ADDMM_FP32_ACCUMULATOR
    return _has_kernel("aten::addmm.dtype_out", device)


@dataclass(frozen=True)
class ChunkPlan:
    """Everything fixed for one call: shard geometry, chunking, temperatures, dtypes."""

    tp_size: int
    """Ranks in the tensor-parallel group (1 without a group)."""
    vocab_offset: int
    """Global id of this rank's first weight row (``rank * V_local``)."""
    local_rows: int
    """Rows of this shard's weight (``V_local``, padding included)."""
    real_rows: int
    """Rows of this shard below ``vocab_size`` (the rest is Megatron padding)."""
    group_tokens: int
    """Tokens per group: all of them unless that would make vocabulary blocks thinner than
    ``MIN_BLOCK_ROWS`` (then each group costs two more all-reduces in the forward)."""
    block_rows: int
    """Vocabulary rows per block, a multiple of ``ROW_ALIGN`` unless one block holds the whole
    shard: ``group_tokens * block_rows <= chunk_size * V_local``."""
    inv_temperature: float
    inv_teacher_temperature: float
    in_dtype: torch.dtype
    acc_dtype: torch.dtype
    """Dtype of logits and softmax sums: fp64 for fp64 inputs, else fp32."""
    has_fp32_output_gemm: bool
    """``fp32_output_gemm_on`` the inputs' device."""

    @property
    def out_dtype(self) -> torch.dtype:
        return self.acc_dtype

    def blocks(self) -> range:
        """First rows of the vocabulary blocks over this shard's real rows."""
        return range(0, self.real_rows, self.block_rows)

    def block_end(self, start: int) -> int:
        """One past the last real row of the block starting at ``start``."""
        return min(start + self.block_rows, self.real_rows)

    def gemm_rows(self, start: int) -> int:
        """Weight rows the Triton path multiplies for the block at ``start``: its real rows rounded
        up to ``ROW_ALIGN`` within the shard (aligned logit rows even for a ragged last block)."""
        real = self.block_end(start) - start
        return min(-(-real // ROW_ALIGN) * ROW_ALIGN, self.local_rows - start)

    @property
    def fp32_output_gemm(self) -> bool:
        """Low-precision operands multiplied straight into fp32 (CUDA); else operands up-cast (CPU)."""
        return self.has_fp32_output_gemm and self.in_dtype in _LOW_PRECISION

    def as_matmul_operand(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype the matmuls take on this device (see the module docstring)."""
        return x.to(self.in_dtype if self.fp32_output_gemm else self.acc_dtype)

    def grad_coefficients(self, grad_kl, grad_logprob, grad_entropy, log_z_s, log_z_t, kl, entropy):
        """Per-token coefficients of ``dz = p_s * (a*log p_s - b*z_t + c) + d * onehot``.

        With tempered logits ``z = x / T``: ``dkl/dz = p_s (log p_s - log p_t - kl)``,
        ``dH/dz = -p_s (log p_s + H)``, ``dlogprob/dz = onehot - p_s``; the chain rule through
        ``/T`` divides every coefficient by ``T``; ``log p_t = z_t - log Z_t`` is folded into ``c``.
        Missing upstream grads count as zero.
        """
        zero = torch.zeros_like(kl)
        g_kl = zero if grad_kl is None else grad_kl.to(self.acc_dtype)
        g_lp = zero if grad_logprob is None else grad_logprob.to(self.acc_dtype)
        g_ent = zero if grad_entropy is None else grad_entropy.to(self.acc_dtype)
        inv_t = self.inv_temperature
        return GradCoefficients(
            a=(g_kl - g_ent) * inv_t,
            b=None if grad_kl is None else g_kl * inv_t,
            c=(g_kl * (log_z_t - kl) - g_ent * entropy - g_lp) * inv_t,
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

    def rows(self, start: int, stop: int) -> GradCoefficients:
        return GradCoefficients(*(None if x is None else x[start:stop] for x in self))


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
    if isinstance(vocab_size, numbers.Integral) and not isinstance(vocab_size, bool):
        vocab_size = int(vocab_size)  # numpy / torch integers from configs and tokenizers
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= local_rows * tp_size:
        raise ValueError(
            f"vocab_size must be an int in [1, V_local * tp_size = {local_rows * tp_size}]; got {vocab_size!r}"
        )
    for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    _check_targets(targets_N, vocab_size)

    acc_dtype = torch.float64 if student_NH.dtype == torch.float64 else torch.float32
    vocab_offset = tp_rank * local_rows
    real_rows = max(0, min(local_rows, vocab_size - vocab_offset))
    width = local_rows  # not real_rows: every rank must make the same groups (same all-reduces)
    if chunk_size is None:
        per_token = _BUFFERS_PER_ELEMENT * width * torch.finfo(acc_dtype).bits // 8
        chunk_size = max(1, DEFAULT_CHUNK_BUDGET_BYTES // per_token)
    budget = chunk_size * width  # elements per workspace buffer
    thinnest = min(MIN_BLOCK_ROWS, width)
    group_tokens = max(1, min(num_tokens, budget // thinnest))
    block_rows = _aligned_block_rows(budget // group_tokens, width)
    return ChunkPlan(
        tp_size=tp_size,
        vocab_offset=vocab_offset,
        local_rows=local_rows,
        real_rows=real_rows,
        group_tokens=group_tokens,
        block_rows=block_rows,
        inv_temperature=1.0 / temperature,
        inv_teacher_temperature=1.0 / teacher_temperature,
        in_dtype=student_NH.dtype,
        acc_dtype=acc_dtype,
        has_fp32_output_gemm=fp32_output_gemm_on(student_NH.device),
    )


def _aligned_block_rows(rows: int, width: int) -> int:
    """``rows`` rounded down to a multiple of ``ROW_ALIGN`` (at least one), or the whole ``width``
    when it fits in one block."""
    if rows >= width or width <= ROW_ALIGN:
        return max(1, width)
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)


def _check_targets(targets_N: torch.Tensor, vocab_size: int) -> None:
    """Targets in ``[0, vocab_size)``: a clear error on the host; on an accelerator an asynchronous
    device assert, so the check costs no host sync (the batch builder's ids come from the engine)."""
    if targets_N.numel() == 0:
        return
    if targets_N.device.type != "cpu":
        torch._assert_async(((targets_N >= 0) & (targets_N < vocab_size)).all())
        return
    low, high = int(targets_N.min()), int(targets_N.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size}); got values in [{low}, {high}]")


def matmul_into(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, accumulate: bool = False
) -> torch.Tensor:
    """``out = alpha * a @ b`` (or ``out += a @ b`` with ``accumulate``) with no fresh allocation.

    On CPU a fresh ``[G, B]`` tensor per block costs page faults comparable to the elementwise
    work, so every block reuses the same workspace; ``beta=0`` makes GEMM ignore ``out``'s
    contents. Three dtype cases, each decided by the dtypes alone:

    - operands in ``out``'s dtype: one ``addmm`` into ``out``;
    - bf16/fp16 operands, fp32 ``out`` (CUDA, ``ChunkPlan.fp32_output_gemm``): fp32 accumulation
      and output, the logits are never rounded to bf16. Accumulating (``dh``): one ``addmm`` in
      place where ``fp32_accumulating_gemm_on``; else ``torch.mm(..., out_dtype=torch.float32)``
      into a transient fp32 product, then one copy or add into ``out``;
    - fp32 operands, bf16/fp16 ``out`` (the weight gradient on CPU, where operands are up-cast): the
      fp32 product rounded once into ``out``, the gradient's own dtype.
    """
    if a.dtype == out.dtype:
        return torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)
    if a.dtype in _LOW_PRECISION and out.dtype == torch.float32 and fp32_output_gemm_on(out.device):
        if accumulate and fp32_accumulating_gemm_on(out.device):
            return torch.addmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
        product = torch.mm(a, b, out_dtype=torch.float32)
    elif a.dtype == torch.float32 and out.dtype in _LOW_PRECISION:
        product = torch.mm(a, b)
    else:
        raise TypeError(f"matmul_into: no GEMM for {a.dtype} operands into {out.dtype} on {out.device}")
    if accumulate:
        return out.add_(product, alpha=alpha)
    return out.copy_(product) if alpha == 1.0 else out.copy_(product.mul_(alpha))


def _col(x_C: torch.Tensor) -> torch.Tensor:
    return x_C.unsqueeze(1)


def _local_target(
    targets_N: torch.Tensor, first_row: int, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each target in a block of ``num_rows`` rows starting at global ``first_row``."""
    local = targets_N - first_row
    inside = (local >= 0) & (local < num_rows)
    return local.clamp(0, max(num_rows - 1, 0)), inside


class Workspace:
    """Reusable buffers, the whole O(chunk) peak: ``logits`` (accumulation dtype) holds the stacked
    ``[student; teacher]`` logits of a block (``[2G, B]``, or ``[G, B]`` without a teacher) so one
    GEMM computes both, ``aux`` (``[G, B]``, ``aux_dtype``; none when ``aux_dtype`` is None) the
    exponentials or ``dz``.

    With ``plan.fp32_output_gemm`` (CUDA) there is no ``logits`` buffer: the GEMM's own fresh fp32
    output is the block's logits (the caching allocator hands the same block back each time), which
    saves a read and a write of every logit against copying it into a buffer."""

    def __init__(
        self,
        rows: int,
        cols: int,
        plan: ChunkPlan,
        device: torch.device,
        with_teacher: bool,
        aux_dtype: torch.dtype | None,
    ):
        self.stack = 2 if with_teacher else 1
        self.logits = self.aux = None
        if not plan.fp32_output_gemm:
            self.logits = torch.empty(self.stack * rows * cols, dtype=plan.acc_dtype, device=device)
        if aux_dtype is not None:
            self.aux = torch.empty(rows * cols, dtype=aux_dtype, device=device)

    def views(self, rows: int, cols: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``[stack * rows, cols]`` logits (None: the GEMM allocates) and ``[rows, cols]`` aux views."""
        logits = aux = None
        if self.logits is not None:
            logits = self.logits[: self.stack * rows * cols].view(self.stack * rows, cols)
        if self.aux is not None:
            aux = self.aux[: rows * cols].view(rows, cols)
        return logits, aux


def stack_hidden(student_GH: torch.Tensor, teacher_GH: torch.Tensor | None) -> torch.Tensor:
    """``[student; teacher]`` hidden states (``[2G, H]``), the left operand of the stacked GEMM."""
    return student_GH if teacher_GH is None else torch.cat([student_GH, teacher_GH])


def raw_logits(
    hidden_KH: torch.Tensor,
    weight_BH: torch.Tensor,
    out_KB: torch.Tensor | None,
    teacher_weight_BH: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hidden_KH @ weight_BH^T`` into ``out_KB``, or, when None, the fp32-output GEMM's own fresh
    tensor (``Workspace``); no temperature (the Triton kernels fold it). With ``teacher_weight_BH``
    the lower (teacher) half of the stacked hidden states takes the teacher's rows instead
    (``two_weight_logits``)."""
    if teacher_weight_BH is not None:
        return two_weight_logits(hidden_KH, weight_BH, teacher_weight_BH, out_KB, (1.0, 1.0))
    if out_KB is None:
        return torch.mm(hidden_KH, weight_BH.t(), out_dtype=torch.float32)
    return matmul_into(out_KB, hidden_KH, weight_BH.t())


def two_weight_logits(
    hidden_KH: torch.Tensor,
    weight_BH: torch.Tensor,
    teacher_weight_BH: torch.Tensor,
    out_KB: torch.Tensor | None,
    scales: tuple[float, float],
) -> torch.Tensor:
    """``[h_s W_s^T * scales[0]; h_t W_t^T * scales[1]]`` for stacked ``[student; teacher]`` hidden
    states: a teacher other than the current policy has its own output layer, so the one stacked
    GEMM becomes one GEMM per half, both into the same fp32 block (``out_KB``; a fresh one when None,
    as ``Workspace`` expects on CUDA)."""
    num_rows = hidden_KH.shape[0] // 2
    if out_KB is None:
        out_KB = torch.empty(
            (hidden_KH.shape[0], weight_BH.shape[0]), dtype=torch.float32, device=hidden_KH.device
        )
    out_KB = out_KB[: hidden_KH.shape[0]]
    halves = ((hidden_KH[:num_rows], weight_BH), (hidden_KH[num_rows:], teacher_weight_BH))
    for rows_GB, (h_GH, w_BH), scale in zip((out_KB[:num_rows], out_KB[num_rows:]), halves, scales):
        matmul_into(rows_GB, h_GH, w_BH.t(), alpha=scale)
    return out_KB


def _stacked_logits(
    hidden_KH: torch.Tensor,
    weight_BH: torch.Tensor,
    num_rows: int,
    plan: ChunkPlan,
    out_KB: torch.Tensor | None,
    teacher_weight_BH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tempered ``[student; teacher]`` logits of one block (``num_rows`` tokens each) in one GEMM
    (into ``out_KB``, or the GEMM's fresh fp32 output when None: ``Workspace``).

    ``teacher_weight_BH``: the teacher's own rows of the output layer (a teacher other than the
    current policy); its logits then take a second GEMM into the lower half (``two_weight_logits``)."""
    teacher_rows = hidden_KH.shape[0] > num_rows
    inv_s, inv_t = plan.inv_temperature, plan.inv_teacher_temperature
    if teacher_weight_BH is not None and teacher_rows:
        return two_weight_logits(hidden_KH, weight_BH, teacher_weight_BH, out_KB, (inv_s, inv_t))
    one_scale = not teacher_rows or inv_s == inv_t
    if out_KB is None:
        out_KB = raw_logits(hidden_KH, weight_BH, None)
        if one_scale and inv_s != 1.0:
            out_KB.mul_(inv_s)
    else:
        out_KB = out_KB[: hidden_KH.shape[0]]
        matmul_into(out_KB, hidden_KH, weight_BH.t(), alpha=inv_s if one_scale else 1.0)
    if not one_scale:
        out_KB[:num_rows].mul_(inv_s)
        out_KB[num_rows:].mul_(inv_t)
    return out_KB


class HeadState(NamedTuple):
    """Per-token softmax statistics of a slice of the vocabulary, relative to its own maxima.

    ``sum_s = sum e_s``, ``ent_num = sum e_s (z_s - m_s)``,
    ``kl_num = sum e_s ((z_s - m_s) - (z_t - m_t))``, ``sum_t = sum e_t`` with
    ``e_s = exp(z_s - m_s)``, ``e_t = exp(z_t - m_t)``; ``target`` is the raw target logit where the
    target lies in the slice, else 0. States of disjoint slices merge exactly (``merge_states``).
    """

    m_s: torch.Tensor
    sum_s: torch.Tensor
    ent_num: torch.Tensor
    kl_num: torch.Tensor
    m_t: torch.Tensor
    sum_t: torch.Tensor
    target: torch.Tensor


def _rescale(state: HeadState, m_s: torch.Tensor, m_t: torch.Tensor) -> HeadState:
    """The same statistics relative to larger maxima ``m_s >= state.m_s``, ``m_t >= state.m_t``."""
    zero = torch.zeros_like(m_s)
    shift_s = torch.where(state.sum_s > 0, state.m_s - m_s, zero)  # empty slices have m = -inf
    shift_t = torch.where(state.sum_t > 0, state.m_t - m_t, zero)
    scale_s = torch.exp(state.m_s - m_s)
    return HeadState(
        m_s=m_s,
        sum_s=scale_s * state.sum_s,
        ent_num=scale_s * (state.ent_num + shift_s * state.sum_s),
        kl_num=scale_s * (state.kl_num + (shift_s - shift_t) * state.sum_s),
        m_t=m_t,
        sum_t=torch.exp(state.m_t - m_t) * state.sum_t,
        target=state.target,
    )


def merge_states(a: HeadState, b: HeadState) -> HeadState:
    """Statistics of the union of two disjoint vocabulary slices."""
    m_s, m_t = torch.maximum(a.m_s, b.m_s), torch.maximum(a.m_t, b.m_t)
    ra, rb = _rescale(a, m_s, m_t), _rescale(b, m_s, m_t)
    return HeadState(
        m_s, *(x + y for x, y in zip(ra[1:4], rb[1:4])), m_t, ra.sum_t + rb.sum_t, a.target + b.target
    )


def empty_state(num_tokens: int, plan: ChunkPlan, device: torch.device) -> HeadState:
    """The statistics of no vocabulary rows (a shard made only of padding)."""
    zero = torch.zeros(num_tokens, dtype=plan.acc_dtype, device=device)
    ninf = torch.full_like(zero, -math.inf)
    return HeadState(ninf, zero, zero, zero, ninf.clone(), zero.clone(), zero.clone())


def all_reduce_state(
    state: HeadState, all_reduce: Callable[[torch.Tensor, dist.ReduceOp], torch.Tensor]
) -> HeadState:
    """Merge the states of all vocab shards: one MAX all-reduce, one SUM all-reduce."""
    m_s, m_t = all_reduce(torch.stack([state.m_s, state.m_t]), dist.ReduceOp.MAX)
    local = _rescale(state, m_s, m_t)
    summed = all_reduce(
        torch.stack([local.sum_s, local.ent_num, local.kl_num, local.sum_t, local.target]), dist.ReduceOp.SUM
    )
    sum_s, ent_num, kl_num, sum_t, target = summed
    return HeadState(m_s, sum_s, ent_num, kl_num, m_t, sum_t, target)


def finalize(state: HeadState) -> ChunkStats:
    """kl, log-prob, entropy and both log-partition functions from full-vocabulary statistics."""
    log_s, log_t = state.sum_s.log(), state.sum_t.log()
    return ChunkStats(
        kl=state.kl_num / state.sum_s - log_s + log_t,
        logprob=state.target - state.m_s - log_s,
        entropy=log_s - state.ent_num / state.sum_s,
        log_z_s=state.m_s + log_s,
        log_z_t=state.m_t + log_t,
    )


def block_state(
    hidden_KH: torch.Tensor,
    weight_BH: torch.Tensor,
    targets_G: torch.Tensor,
    block_start: int,
    plan: ChunkPlan,
    workspace: Workspace,
    teacher_weight_BH: torch.Tensor | None = None,
) -> HeadState:
    """Statistics of one block of vocabulary rows for a group of tokens, all in place.

    ``hidden_KH`` is ``stack_hidden(student, teacher)``. Shift by the block maxima, exponentiate,
    and form ``sum e_s (z_s - m_s)``, ``sum e_s (z_t - m_t)`` by multiplying in place, then summing.
    ``teacher_weight_BH``: the teacher's rows when they are not the student's (``_stacked_logits``).
    """
    num_rows, block_cols = targets_G.shape[0], weight_BH.shape[0]
    z_KB, e_s = workspace.views(num_rows, block_cols)
    z_KB = _stacked_logits(hidden_KH, weight_BH, num_rows, plan, z_KB, teacher_weight_BH)
    z_s = z_KB[:num_rows]
    local, inside = _local_target(targets_G, plan.vocab_offset + block_start, block_cols)
    target = z_s.gather(1, _col(local)).squeeze(1) * inside
    m_K = z_KB.amax(dim=1)
    z_KB.sub_(_col(m_K))
    sum_s = torch.exp(z_s, out=e_s).sum(dim=1)
    ent_num = z_s.mul_(e_s).sum(dim=1)  # z_s is free afterwards
    if z_KB.shape[0] == num_rows:  # no teacher
        zero = torch.zeros_like(sum_s)
        return HeadState(m_K, sum_s, ent_num, zero, zero, zero, target)
    z_t = z_KB[num_rows:]
    sum_t = torch.exp(z_t, out=z_s).sum(dim=1)
    kl_num = ent_num - z_t.mul_(e_s).sum(dim=1)
    return HeadState(m_K[:num_rows], sum_s, ent_num, kl_num, m_K[num_rows:], sum_t, target)


def block_grad_logits(
    hidden_KH: torch.Tensor,
    weight_BH: torch.Tensor,
    targets_G: torch.Tensor,
    block_start: int,
    coeffs: GradCoefficients,
    plan: ChunkPlan,
    workspace: Workspace,
    teacher_weight_BH: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d loss / d raw logits`` for a group of tokens and one block of vocabulary rows: ``[G, B]``.

    ``dz = p_s * (a * log p_s - b * z_t + c) + d * onehot`` (``GradCoefficients``), in place;
    ``hidden_KH`` stacks the teacher under the student only when the KL has an upstream grad.
    """
    num_rows, block_cols = targets_G.shape[0], weight_BH.shape[0]
    z_KB, dz = workspace.views(num_rows, block_cols)
    z_KB = _stacked_logits(hidden_KH, weight_BH, num_rows, plan, z_KB, teacher_weight_BH)
    log_p_s = z_KB[:num_rows].sub_(_col(coeffs.log_z_s))
    torch.exp(log_p_s, out=dz)
    torch.addcmul(_col(coeffs.c), log_p_s, _col(coeffs.a), out=log_p_s)
    if coeffs.b is not None:
        log_p_s.addcmul_(z_KB[num_rows:], _col(coeffs.b), value=-1.0)
    dz.mul_(log_p_s)
    if coeffs.d is not None:
        local, inside = _local_target(targets_G, plan.vocab_offset + block_start, block_cols)
        dz.scatter_add_(1, _col(local), _col(coeffs.d * inside))
    return dz
