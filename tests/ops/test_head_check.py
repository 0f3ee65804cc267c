"""The GPU check's fp64 accuracy check (``audit.head_check``) can fail: a fixed tolerance that the
real heads pass and a head with bf16-rounded logits fails, by orders of magnitude."""

from __future__ import annotations

import torch

from sdpg_mcore.audit.head_check import (
    HEAD_TOL_CPU,
    HEAD_TOL_GPU,
    bf16_logit_head,
    check_head_fp64,
    fp64_reference,
    fused_head,
    head_fp64_report,
    head_inputs,
)
from sdpg_mcore.ops import fused_kl_head


def test_real_heads_pass_and_the_bf16_logit_head_fails():
    """The stage's own report at the ``--cpu`` shape (64 tokens, H = 64, 4,096 rows): both backends
    within 1e-5 of fp64, the control off by ~1e-2 (7e-3 to 1.2e-2), over 50x even the GPU shape's 1e-4."""
    heads = {"triton": fused_head("triton"), "torch": fused_head("torch")}
    report = head_fp64_report(heads, 64, 64, 4096, "cpu", HEAD_TOL_CPU)
    assert report["ok"]
    for result in report["heads"].values():
        assert result["ok"] and result["tol"] == HEAD_TOL_CPU
        assert max(result["max_abs_err"].values()) <= HEAD_TOL_CPU
        assert result["grads"]["ok"] and max(result["grads"]["max_rel_err"].values()) <= 1e-5
    control = report["control_bf16_logits"]
    assert not control["ok"] and min(control["max_abs_err"].values()) > 50 * HEAD_TOL_GPU
    assert report["diagnostics"]["logit_delta"] < 1e-5  # the fp32 GEMM itself is far inside


def test_the_tolerance_does_not_move_with_the_head():
    """A head that is off by a small, logit-sized error fails at the same fixed tolerance."""
    inputs = head_inputs(32, 64, 2048, "cpu", seed=1)
    reference = fp64_reference(*inputs, chunk=32)
    exact = check_head_fp64(fused_head("torch"), inputs, reference, 2048, HEAD_TOL_CPU)

    def shifted(student, teacher, weight, targets, vocab_size):  # every target logit 1e-4 too high
        kl, logprob, entropy = fused_kl_head(student, teacher, weight, targets, vocab_size=vocab_size)
        return kl, logprob + 1e-4, entropy

    wrong = check_head_fp64(shifted, inputs, reference, 2048, HEAD_TOL_CPU)
    control = check_head_fp64(bf16_logit_head, inputs, reference, 2048, HEAD_TOL_CPU)
    assert exact["ok"] and not wrong["ok"] and not control["ok"]
    assert exact["tol"] == wrong["tol"] == control["tol"] == HEAD_TOL_CPU
    assert wrong["max_abs_err"]["logprob"] > HEAD_TOL_CPU >= wrong["max_abs_err"]["kl"]
    assert exact["dtypes"] == ["torch.float32"] * 3


def test_gemm_capabilities_hold_the_heads_assumptions_to_the_ops():
    """The GPU check probes the mixed-precision GEMMs the head assumes (on CPU: none, and none
    found; with the CUDA GEMMs registered for CPU, both assumed and both found)."""
    from sdpg_mcore.audit.head_check import gemm_capabilities
    from sdpg_mcore.ops.kl_head_traffic import cuda_gemms_on_cpu

    cpu = torch.device("cpu")
    plain = gemm_capabilities(cpu)
    assert plain["ok"] and not any(plain["assumed"].values())
    assert all(str(v).startswith("no: ") for v in plain["found"].values())
    with cuda_gemms_on_cpu():
        registered = gemm_capabilities(cpu)
    assert registered == {
        "assumed": dict.fromkeys(plain["assumed"], True),
        "found": dict.fromkeys(plain["found"], True),
        "ok": True,
    }


def test_grad_check_fails_a_head_with_a_wrong_temperature():
    """A head that differentiates at T = 0.75 instead of 0.7 misses the fp64 gradients by far more
    than the 1e-5 the real head meets."""
    from sdpg_mcore.audit.head_check import GRAD_TOL, check_head_grads

    def wrong(*args, **kwargs):
        return fused_kl_head(*args[:4], vocab_size=args[4], **(kwargs | {"temperature": 0.75}))

    assert check_head_grads(fused_head("torch"), "cpu")["ok"]
    result = check_head_grads(wrong, "cpu")
    assert not result["ok"] and min(result["max_rel_err"].values()) > 100 * GRAD_TOL
