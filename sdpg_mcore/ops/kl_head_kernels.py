"""The fused KL head's two Triton kernels: one pass over a vocabulary block's logits each way.

Per vocabulary block the GPU path runs a cuBLAS GEMM that writes the stacked raw
``[student; teacher]`` logits in fp32 (``[2G, W]``, rows ``W`` apart), then

* ``block_state_kernel`` (forward): one program per token reads its student and teacher logits
  once, in tiles of ``TILE`` columns, folds both temperatures, keeps the online softmax statistics
  of ``kl_head_math.HeadState`` (maxima, ``sum e_s``, the entropy and KL numerators, ``sum e_t``)
  and picks the target logit, then merges them into the running per-token fp32 state
  (``[7, G]``, rows ``STATE_ROWS``) in place: no per-block ``[G]``-vector ops remain;
* ``block_grad_kernel`` (backward): one program per token reads the recomputed logits once and
  writes ``dz = p_s (a log p_s - b z_t + c) + d onehot`` (``kl_head_math.GradCoefficients``) in
  the GEMM operand's dtype (bf16 for bf16 inputs), zeros past the block's real rows.

Both are the torch path's arithmetic (``kl_head_math.block_state``/``merge_states``/
``block_grad_logits``) in the same order of operations per tile; ``tests/ops`` runs them under
Triton's interpreter against fp64 and that path. Loads are converted to fp32 as they arrive (the
interpreter keeps bf16 as raw bits). ``compile_kernels`` builds them for a GPU target without one.
"""

from __future__ import annotations

import torch

from sdpg_mcore.ops.triton_support import IMPORT_ERROR, interpreting, tl, triton

if triton is None:
    raise ImportError(f"sdpg_mcore.ops.kl_head_kernels needs triton: {IMPORT_ERROR}")

STATE_ROWS = ("m_s", "sum_s", "ent_num", "kl_num", "m_t", "sum_t", "target")
"""Rows of the running per-token state, in ``kl_head_math.HeadState``'s field order."""
COEFF_ROWS = ("a", "b", "c", "d", "log_z_s")
"""Rows of the per-token backward coefficients (``GradCoefficients``; absent ones stay zero)."""
TILE_COLS = 1024
"""Columns per tile: each of a program's 4 warps holds 8 fp32 logits of student and teacher per
thread (``bench_kl.py --compile`` reports registers and spills at this size)."""
NUM_WARPS = 4
INTERPRETER_ROWS = 64
"""Most tokens per program under the interpreter (``rows_per_program``)."""


@triton.jit
def _shift(m, s, new_m):
    """``(m - new_m, exp(m - new_m))`` for statistics with maximum ``m`` (shift 0 when empty)."""
    return tl.where(s > 0, m - new_m, 0.0), tl.exp(m - new_m)


@triton.jit
def _merge(m_a, s_a, ent_a, kl_a, mt_a, st_a, m_b, s_b, ent_b, kl_b, mt_b, st_b, HAS_TEACHER: tl.constexpr):
    """``kl_head_math.merge_states`` for one token (at least one side non-empty)."""
    m = tl.maximum(m_a, m_b)
    sh_a, sc_a = _shift(m_a, s_a, m)
    sh_b, sc_b = _shift(m_b, s_b, m)
    ent = sc_a * (ent_a + sh_a * s_a) + sc_b * (ent_b + sh_b * s_b)
    kl, mt, st = kl_a, mt_a, st_a
    if HAS_TEACHER:
        mt = tl.maximum(mt_a, mt_b)
        tsh_a, tsc_a = _shift(mt_a, st_a, mt)
        tsh_b, tsc_b = _shift(mt_b, st_b, mt)
        kl = sc_a * (kl_a + (sh_a - tsh_a) * s_a) + sc_b * (kl_b + (sh_b - tsh_b) * s_b)
        st = tsc_a * st_a + tsc_b * st_b
    return m, sc_a * s_a + sc_b * s_b, ent, kl, mt, st


@triton.jit
def _tile_stats(
    z_rows, teacher_offset, cols, inside, valid, inv_temp, inv_teacher_temp, HAS_TEACHER: tl.constexpr
):
    """Per-row statistics of one ``[ROWS, TILE]`` tile relative to its own maxima
    (``kl_head_math.block_state``); ``z_rows`` points at each row's first logit. Loads cover the
    aligned GEMM width (``inside``: 128-bit vector loads), statistics the real columns (``valid``)."""
    z = tl.load(z_rows + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
    z = tl.where(valid, z, float("-inf"))
    m = tl.max(z, axis=1)
    d = tl.where(valid, z - m[:, None], 0.0)
    e = tl.exp(z - m[:, None])  # 0 past the real columns (z = -inf)
    s, ent = tl.sum(e, axis=1), tl.sum(e * d, axis=1)
    kl, mt, st = ent, m, s
    if HAS_TEACHER:
        zt = tl.load(z_rows + teacher_offset + cols, mask=inside, other=0.0).to(tl.float32)
        zt = tl.where(valid, zt * inv_teacher_temp, float("-inf"))
        mt = tl.max(zt, axis=1)
        st = tl.sum(tl.exp(zt - mt[:, None]), axis=1)
        kl = ent - tl.sum(e * tl.where(valid, zt - mt[:, None], 0.0), axis=1)
    return m, s, ent, kl, mt, st


@triton.jit
def block_state_kernel(
    logits_ptr, logits_stride, teacher_offset, state_ptr, state_stride, targets_ptr, first_id,
    num_rows, num_cols, width, inv_temp, inv_teacher_temp,
    HAS_TEACHER: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """Merge one block's statistics (``num_cols`` real columns of ``width``) into the running state
    of ``ROWS`` tokens (rows of ``state_ptr``: ``STATE_ROWS``, ``state_stride`` apart)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = tl.minimum(rows, num_rows - 1)  # rows past the end recompute the last; never stored
    z_rows = logits_ptr + rows[:, None] * logits_stride
    zero = tl.zeros((ROWS,), tl.float32)
    m, s, ent, kl, mt, st = zero - float("inf"), zero, zero, zero, zero - float("inf"), zero
    for start in range(0, num_cols, TILE):
        cols = start + tl.arange(0, TILE)[None, :]
        m_b, s_b, ent_b, kl_b, mt_b, st_b = _tile_stats(
            z_rows, teacher_offset, cols, cols < width, cols < num_cols, inv_temp, inv_teacher_temp,
            HAS_TEACHER,
        )  # fmt: skip
        m, s, ent, kl, mt, st = _merge(m, s, ent, kl, mt, st, m_b, s_b, ent_b, kl_b, mt_b, st_b, HAS_TEACHER)
    p = state_ptr + rows
    m, s, ent, kl, mt, st = _merge(
        tl.load(p), tl.load(p + state_stride), tl.load(p + 2 * state_stride),
        tl.load(p + 3 * state_stride), tl.load(p + 4 * state_stride), tl.load(p + 5 * state_stride),
        m, s, ent, kl, mt, st, HAS_TEACHER,
    )  # fmt: skip
    target = tl.load(targets_ptr + rows) - first_id
    hit = (target >= 0) & (target < num_cols)
    z_target = tl.load(logits_ptr + rows * logits_stride + target, mask=hit, other=0.0).to(tl.float32)
    tl.store(p, m, mask=row_ok)
    tl.store(p + state_stride, s, mask=row_ok)
    tl.store(p + 2 * state_stride, ent, mask=row_ok)
    tl.store(p + 3 * state_stride, kl, mask=row_ok)
    tl.store(p + 4 * state_stride, mt, mask=row_ok)
    tl.store(p + 5 * state_stride, st, mask=row_ok)
    old_target = tl.load(p + 6 * state_stride)
    tl.store(p + 6 * state_stride, old_target + z_target * inv_temp, mask=row_ok)


@triton.jit
def block_grad_kernel(
    logits_ptr, logits_stride, teacher_offset, dz_ptr, dz_stride, coeff_ptr, coeff_stride,
    targets_ptr, first_id, num_rows, num_cols, out_cols, inv_temp, inv_teacher_temp,
    HAS_TEACHER: tl.constexpr, HAS_ONEHOT: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """``dz`` of ``ROWS`` tokens over ``out_cols`` columns of a block (zero past ``num_cols``)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    dz_rows = dz_ptr + rows[:, None] * dz_stride
    rows = tl.minimum(rows, num_rows - 1)  # rows past the end recompute the last; never stored
    z_rows = logits_ptr + rows[:, None] * logits_stride
    a = tl.load(coeff_ptr + rows)[:, None]
    b = tl.load(coeff_ptr + coeff_stride + rows)[:, None]
    c = tl.load(coeff_ptr + 2 * coeff_stride + rows)[:, None]
    d = tl.load(coeff_ptr + 3 * coeff_stride + rows)[:, None]
    log_z = tl.load(coeff_ptr + 4 * coeff_stride + rows)[:, None]
    target = (tl.load(targets_ptr + rows) - first_id)[:, None]
    for start in range(0, out_cols, TILE):
        cols = start + tl.arange(0, TILE)[None, :]
        inside = cols < out_cols
        log_p = tl.load(z_rows + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp - log_z
        inner = a * log_p + c
        if HAS_TEACHER:
            zt = tl.load(z_rows + teacher_offset + cols, mask=inside, other=0.0).to(tl.float32)
            inner -= b * (zt * inv_teacher_temp)
        grad = tl.exp(log_p) * inner
        if HAS_ONEHOT:
            grad += tl.where(cols == target, d, 0.0)
        grad = tl.where(cols < num_cols, grad, 0.0)
        tl.store(dz_rows + cols, grad.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & inside)


def tile_cols(width: int) -> int:
    """Tile width for a block of ``width`` columns: ``TILE_COLS``, or the next power of two below it."""
    return min(TILE_COLS, triton.next_power_of_2(max(width, 16)))


def rows_per_program(num_rows: int) -> int:
    """Tokens per program: one on a GPU (thousands of programs fill it); under the interpreter,
    which runs programs one after another in Python, up to ``INTERPRETER_ROWS`` at once."""
    if not interpreting():
        return 1
    return min(INTERPRETER_ROWS, triton.next_power_of_2(max(num_rows, 1)))


def _config(num_rows: int, width: int) -> tuple[tuple[int], dict]:
    rows = rows_per_program(num_rows)
    grid = (triton.cdiv(num_rows, rows),)
    return grid, {"ROWS": rows, "TILE": tile_cols(width), "num_warps": NUM_WARPS, "enable_fp_fusion": True}


def launch_block_state(
    logits_KW: torch.Tensor,
    num_rows: int,
    state_7G: torch.Tensor,
    targets_G: torch.Tensor,
    first_id: int,
    num_cols: int,
    inv_temps: tuple[float, float],
) -> None:
    """Fold the block whose raw logits are ``logits_KW`` (``num_rows`` student rows, then as many
    teacher rows when ``K = 2 * num_rows``; real columns ``[0, num_cols)``) into ``state_7G``."""
    width = logits_KW.shape[1]
    grid, config = _config(num_rows, width)
    block_state_kernel[grid](
        logits_KW, logits_KW.stride(0), num_rows * logits_KW.stride(0), state_7G, state_7G.stride(0),
        targets_G, first_id, num_rows, num_cols, width, inv_temps[0], inv_temps[1],
        HAS_TEACHER=logits_KW.shape[0] > num_rows, **config,
    )  # fmt: skip


def launch_block_grad(
    logits_KW: torch.Tensor,
    dz_GW: torch.Tensor,
    coeffs_5G: torch.Tensor,
    targets_G: torch.Tensor,
    first_id: int,
    num_cols: int,
    inv_temps: tuple[float, float],
    has_onehot: bool,
) -> None:
    """Write ``dz_GW`` (all its columns; zero past ``num_cols``) from the block's raw logits."""
    num_rows = dz_GW.shape[0]
    grid, config = _config(num_rows, dz_GW.shape[1])
    block_grad_kernel[grid](
        logits_KW, logits_KW.stride(0), num_rows * logits_KW.stride(0), dz_GW, dz_GW.stride(0),
        coeffs_5G, coeffs_5G.stride(0), targets_G, first_id, num_rows, num_cols, dz_GW.shape[1],
        inv_temps[0], inv_temps[1], HAS_TEACHER=logits_KW.shape[0] > num_rows,
        HAS_ONEHOT=has_onehot, **config,
    )  # fmt: skip
