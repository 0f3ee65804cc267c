"""Count what the fused head's GPU path launches and moves, on a CPU (``tools/bench_kl.py --count``).

Nothing here is a model of the head: the head runs (forward and backward, bf16 inputs, its own
plan), and three counters watch it:

* the Triton kernels run under the interpreter, whose every load and store is counted (bytes =
  unmasked elements x element size): 2-D tile accesses are ``[tokens, vocab]`` traffic, 1-D ones
  per-token state;
* every aten op outside the kernels passes a ``TorchDispatchMode`` that counts the kernels it would
  launch on a GPU (views and allocations launch none) and the bytes of its tensor operands and
  results, split the same way: a 2-D tensor with one side a token count and the other a vocabulary
  block's width is ``[tokens, vocab]`` traffic;
* ``FlopCounterMode`` counts the GEMM FLOPs.

CPU torch has no kernel for the CUDA GEMMs the GPU path uses (``mm.dtype``: bf16 operands, fp32
result; ``addmm.dtype_out``: accumulating into fp32), so both are registered for CPU while counting
(``cuda_gemms_on_cpu``): the head then takes exactly the op sequence it takes on CUDA
(``kl_head_math.fp32_output_gemm_on``), and the counts are those of the GPU path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_"}


@dataclass
class Traffic:
    """What one head call launched and moved."""

    kernel_launches: int = 0
    aten_launches: int = 0
    kernel_pair_bytes: int = 0
    kernel_token_bytes: int = 0
    aten_pair_bytes: int = 0
    aten_other_bytes: int = 0
    aten_ops: dict[str, int] = field(default_factory=dict)
    gemm_flops: int = 0


@contextlib.contextmanager
def cuda_gemms_on_cpu():
    """Register CPU kernels for ``aten::mm.dtype`` and ``aten::addmm.dtype_out`` (fp32 products of
    bf16/fp16 operands, as cuBLAS computes them) for the duration; removed on exit."""
    lib = torch.library.Library("aten", "IMPL")

    def mm_dtype(a, b, out_dtype):
        return torch.mm(a.to(out_dtype), b.to(out_dtype))

    def addmm_dtype_out(self, a, b, out_dtype, beta=1, alpha=1, *, out):
        return torch.addmm(self, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)

    lib.impl("mm.dtype", mm_dtype, "CPU")
    lib.impl("addmm.dtype_out", addmm_dtype_out, "CPU")
    try:
        yield
    finally:
        lib._destroy()


class _AtenCounter(TorchDispatchMode):
    """Aten ops outside the Triton kernels: launches and bytes (module docstring)."""

    def __init__(self, traffic: Traffic, token_counts: set[int], widths: set[int]):
        super().__init__()
        self.traffic, self.token_counts, self.widths = traffic, token_counts, widths
        self.in_kernel = False

    def _is_pair(self, t: torch.Tensor) -> bool:
        if t.dim() != 2:
            return False
        a, b = t.shape
        return (a in self.token_counts and b in self.widths) or (b in self.token_counts and a in self.widths)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.in_kernel or func.is_view or name in _NO_LAUNCH:
            return out
        t = self.traffic
        t.aten_launches += 1
        t.aten_ops[name] = t.aten_ops.get(name, 0) + 1
        seen = set()
        for x in tree_flatten((args, kwargs, out))[0]:
            if isinstance(x, torch.Tensor) and id(x) not in seen:
                seen.add(id(x))
                nbytes = x.numel() * x.element_size()
                if self._is_pair(x):
                    t.aten_pair_bytes += nbytes
                else:
                    t.aten_other_bytes += nbytes
        return out


@contextlib.contextmanager
def _kernel_counter(traffic: Traffic, aten: _AtenCounter):
    """Count the interpreter's launches, loads and stores; aten ops inside a launch (its host
    copies of the arguments) are not the head's."""
    from sdpg_mcore.ops.triton_support import interpreter_module

    interp = interpreter_module()
    builder, executor = interp.interpreter_builder, interp.GridExecutor
    load, store, call = builder.create_masked_load, builder.create_masked_store, executor.__call__

    def count(ptrs, mask) -> None:
        nbytes = int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        if ptrs.data.ndim == 2:
            traffic.kernel_pair_bytes += nbytes
        else:
            traffic.kernel_token_bytes += nbytes

    def counted_load(ptrs, mask, other, cache_policy, is_volatile):
        count(ptrs, mask)
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def counted_store(ptrs, value, mask, cache_policy):
        count(ptrs, mask)
        return store(ptrs, value, mask, cache_policy)

    def counted_call(self, *args, **kwargs):
        traffic.kernel_launches += 1
        aten.in_kernel = True
        try:
            return call(self, *args, **kwargs)
        finally:
            aten.in_kernel = False

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    executor.__call__ = counted_call
    try:
        yield
    finally:
        del builder.create_masked_load, builder.create_masked_store
        executor.__call__ = call


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of every ``addmm`` overload (torch's own formula takes ``addmm.dtype``'s ``out_dtype``
    argument for the output shape and fails)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


COUNT_SHAPES = ((64, 48, 1000, 1024, 16), (64, 48, 2000, 2048, 8))
"""(tokens, hidden, vocab, padded rows, chunk_size) of the two counted calls: both plan one group
of 64 tokens and blocks of 256 rows (a ragged last one), 4 and 8 blocks; the difference of their
launch counts over the 4 extra blocks is the launches per block, what is left the per-call ones."""


def count_call(backend: str, tokens: int, hidden: int, vocab: int, padded: int, chunk_size: int):
    """Run the head once (forward and backward, bf16, teacher, all three outputs used) under the
    counters: ``(Traffic, plan)``."""
    from sdpg_mcore.ops import fused_kl_head
    from sdpg_mcore.ops.kl_head_math import plan_chunks

    gen = torch.Generator().manual_seed(0)
    h_s = (torch.randn(tokens, hidden, generator=gen) / hidden**0.25).bfloat16().requires_grad_()
    h_t = (torch.randn(tokens, hidden, generator=gen) / hidden**0.25).bfloat16()
    weight = (torch.randn(padded, hidden, generator=gen) / hidden**0.25).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    upstream = torch.randn(3, tokens, generator=gen)
    traffic = Traffic()
    with cuda_gemms_on_cpu():
        plan = plan_chunks(
            h_s, h_t, weight, targets, vocab_size=vocab, temperature=1.0, teacher_temperature=1.0,
            chunk_size=chunk_size, tp_size=1, tp_rank=0,
        )  # fmt: skip
        widths = {plan.block_end(v0) - v0 for v0 in plan.blocks()} | {
            plan.gemm_rows(v0) for v0 in plan.blocks()
        }
        token_counts = {tokens, plan.group_tokens, tokens % plan.group_tokens}
        aten = _AtenCounter(traffic, token_counts | {2 * n for n in token_counts}, widths)
        flops = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm: _addmm_flops})
        with flops, _kernel_counter(traffic, aten), aten:
            outs = fused_kl_head(
                h_s, h_t, weight, targets, vocab_size=vocab, chunk_size=chunk_size, backend=backend
            )
            sum((o * g).sum() for o, g in zip(outs, upstream)).backward()
        traffic.gemm_flops = flops.get_total_flops()
    return traffic, plan


def count_head(backend: str) -> dict:
    """The GPU path's launches per vocabulary block and per call, bytes per (token, vocab) pair and
    GEMM FLOPs per ``N V H``, from the two calls of ``COUNT_SHAPES``."""
    (small, small_plan), (large, plan) = (count_call(backend, *shape) for shape in COUNT_SHAPES)
    tokens, hidden, vocab = COUNT_SHAPES[1][:3]
    extra_blocks = len(plan.blocks()) - len(small_plan.blocks())
    launches = large.kernel_launches + large.aten_launches
    per_block = (launches - small.kernel_launches - small.aten_launches) / extra_blocks
    kernels_per_block = (large.kernel_launches - small.kernel_launches) / extra_blocks
    pairs = tokens * vocab
    return {
        "backend": backend,
        "shape": {
            "tokens": tokens,
            "hidden": hidden,
            "vocab": vocab,
            "block_rows": plan.block_rows,
            "blocks": len(plan.blocks()),
            "dtype": "bfloat16",
        },  # fmt: skip
        "launches_per_block": per_block,
        "triton_launches_per_block": kernels_per_block,
        "launches_per_call": launches - per_block * len(plan.blocks()),
        "bytes_per_pair": (large.kernel_pair_bytes + large.aten_pair_bytes) / pairs,
        "kernel_bytes_per_pair": large.kernel_pair_bytes / pairs,
        "aten_bytes_per_pair": large.aten_pair_bytes / pairs,
        "other_bytes_per_pair": (large.kernel_token_bytes + large.aten_other_bytes) / pairs,
        "gemm_flops_per_nvh": large.gemm_flops / (tokens * vocab * hidden),
        "aten_ops": dict(sorted(large.aten_ops.items(), key=lambda kv: -kv[1])),
    }
