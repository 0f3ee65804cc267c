"""Compile the fused KL head's Triton kernels for a GPU target on a machine without one.

Triton's interpreter runs the kernels' arithmetic on CPU but never compiles them, so it cannot see
what only the compiler sees: a non-``constexpr`` ``tl.arange``, a tile that is not a power of two,
a dtype mismatch, register spills. ``compile_kernels`` builds each kernel variant the head
launches (teacher or not, one-hot or not) through Triton's own pipeline down to a cubin for
``sm_<arch>`` (the wheel ships ``ptxas``), at the tile the plan's block width selects, with the
pointer and stride alignment the launch would specialise on, and reads the resource use from the
cubin (``cuobjdump --dump-resource-usage``) and the vector width of the global loads from the PTX.

Runs only where the kernels are real JIT functions, i.e. without ``TRITON_INTERPRET=1``
(``tools/bench_kl.py --compile`` and ``tests/ops/test_kl_head_compile.py`` use a clean process).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from sdpg_mcore.ops.triton_support import interpreting, triton

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _variants(dz_dtype: str) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, signature, constexprs) of every variant the head launches."""
    from sdpg_mcore.ops import kl_head_kernels as K

    ptr, i32 = "*fp32", "i32"
    fwd = {"logits_ptr": ptr, "logits_stride": i32, "teacher_offset": i32, "state_ptr": ptr,
           "state_stride": i32, "targets_ptr": "*i64", "first_id": i32, "num_rows": i32,
           "num_cols": i32, "width": i32, "inv_temp": "fp32", "inv_teacher_temp": "fp32"}  # fmt: skip
    bwd = {"logits_ptr": ptr, "logits_stride": i32, "teacher_offset": i32, "dz_ptr": f"*{dz_dtype}",
           "dz_stride": i32, "coeff_ptr": ptr, "coeff_stride": i32, "targets_ptr": "*i64",
           "first_id": i32, "num_rows": i32, "num_cols": i32, "out_cols": i32, "inv_temp": "fp32",
           "inv_teacher_temp": "fp32"}  # fmt: skip
    out = []
    for teacher in (True, False):
        tag = "+teacher" if teacher else ""
        out.append((f"block_state{tag}", K.block_state_kernel, fwd, {"HAS_TEACHER": teacher}))
        for onehot in (True, False):
            name = f"block_grad{tag}" + ("+onehot" if onehot else "")
            out.append((name, K.block_grad_kernel, bwd, {"HAS_TEACHER": teacher, "HAS_ONEHOT": onehot}))
    return out


def _aligned_attrs(kernel, signature: dict, aligned: set[str]) -> dict:
    """Triton's ``tt.divisibility = 16`` on every pointer and on the named integer arguments: what
    the launch specialises on when data pointers and strides are multiples of 16."""
    names = [n for n in kernel.arg_names if n in signature]
    keep = [n for n in names if signature[n].startswith("*") or n in aligned]
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in keep}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local (spill) and static shared bytes of a cubin's one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        text = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in fields.items()}


def compile_kernels(arch: int, block_rows: int, dtype: str = "bfloat16", aligned: bool = True) -> list[dict]:
    """Compile every kernel variant for ``sm_<arch>`` at the tile of ``block_rows``-column blocks.

    ``dtype``: the model dtype (``dz`` is written in it); ``aligned``: strides are multiples of 16
    elements (the plan's 128-row blocks) — ``False`` compiles what an unaligned block width gets.
    Returns one dict per variant: registers, spill (local) and stack bytes, shared memory (static +
    Triton's dynamic), and the 128-bit (``v4``) vs scalar global loads in the PTX.
    """
    if interpreting():
        raise RuntimeError("compile_kernels needs real JIT kernels: run it without TRITON_INTERPRET=1")
    from sdpg_mcore.ops import kl_head_kernels as K

    gpu_target, ast_source = triton.backends.compiler.GPUTarget, triton.compiler.ASTSource

    tile = K.tile_cols(block_rows)
    strides = {"logits_stride", "teacher_offset", "dz_stride", "width", "out_cols"} if aligned else set()
    results = []
    for name, kernel, signature, flags in _variants(_DTYPES[dtype]):
        constexprs = {**flags, "ROWS": 1, "TILE": tile}
        source = ast_source(
            kernel,
            {**signature, **dict.fromkeys(constexprs, "constexpr")},
            constexprs=constexprs,
            attrs=_aligned_attrs(kernel, signature, strides),
        )
        options = {"num_warps": K.NUM_WARPS, "enable_fp_fusion": True}
        compiled = triton.compile(source, target=gpu_target("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        usage = resource_usage(compiled.asm["cubin"])
        results.append(
            {
                "kernel": name,
                "arch": f"sm_{arch}",
                "tile": tile,
                "num_warps": K.NUM_WARPS,
                "registers": usage["reg"],
                "spill_bytes": usage["local"],
                "stack_bytes": usage["stack"],
                "shared_bytes": usage["shared"] + int(compiled.metadata.shared),
                "global_loads_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                "global_loads_scalar": len(re.findall(r"ld\.global(?:\.\w+)*\.b32 ", ptx)),
            }
        )
    return results
