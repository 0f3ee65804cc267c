"""Stage ``head_fp64``: both fused heads (Triton: compiled on the GPU, under the interpreter with
``--cpu``; torch) at bf16 on a Qwen3-sized vocabulary (151,936 rows) against an fp64 reference from the
same bf16 inputs, within a FIXED tolerance (``sdpg_mcore.audit.head_check``), and a head that rounds
its logits to bf16 as a negative control that must fail; the logit-GEMM and softmax-reduction errors
are reported beside (they explain the margin, decide nothing)."""

from __future__ import annotations

import os

from sdpg_mcore.audit.gpu_check import common


def run(cpu: bool) -> dict:
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    from sdpg_mcore.audit.head_check import HEAD_TOL_CPU, HEAD_TOL_GPU, fused_head, head_fp64_report

    n, h, v = (64, 64, 4096) if cpu else (2048, 2560, 151936)
    heads = {backend: fused_head(backend) for backend in ("triton", "torch")}
    common.progress(
        f"head_fp64: {n} tokens, H={h}, V={v}; heads {', '.join(heads)} and the bf16-logit control"
    )
    return head_fp64_report(heads, n, h, v, common.device(cpu), HEAD_TOL_CPU if cpu else HEAD_TOL_GPU)
