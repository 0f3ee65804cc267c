"""fused_kl_head / vocab_parallel_logprob_entropy against a naive full-softmax reference (fp64)."""

from __future__ import annotations

import pytest
import torch
from headlib import F64, make_case, naive_reference, values_and_grads

from sdpg_mcore.ops import fused_kl_head, vocab_parallel_logprob_entropy


# vocab 11: one block per group; vocab 700 (MIN_BLOCK_ROWS = 64): several vocabulary blocks, and
# for chunk_size 1 several token groups too (700 // 64 = 10 tokens per group, blocks of 70 rows).
@pytest.mark.parametrize(
    "num_tokens,chunk_size,vocab,padded",
    [(7, None, 11, 16), (7, 3, 11, 16), (7, 1, 11, 16), (7, 100, 11, 16), (1, None, 11, 16), (1, 1, 11, 16),
     (23, 1, 700, 768), (23, 2, 700, 768), (23, 5, 700, 768), (1, 1, 700, 768)],
)  # fmt: skip
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_matches_naive_reference(num_tokens, chunk_size, vocab, padded, temps, with_teacher):
    h_s, h_t, weight, targets, upstream = make_case(num_tokens, 5, vocab, padded)
    if num_tokens > 3:
        targets[1], targets[2] = 0, vocab // 2  # first row, a row inside a middle block
    teacher = h_t if with_teacher else None
    t_s, t_t = temps
    got, got_grads = values_and_grads(
        lambda: fused_kl_head(
            h_s, teacher, weight, targets, vocab_size=vocab, temperature=t_s,
            teacher_temperature=t_t, chunk_size=chunk_size,
        ),
        h_s, weight, upstream,
    )  # fmt: skip
    want, want_grads = values_and_grads(
        lambda: naive_reference(h_s, teacher, weight, targets, vocab, t_s, t_t), h_s, weight, upstream
    )
    for g, w in zip(got, want):
        assert g.dtype == F64 and g.shape == (num_tokens,)
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)
    assert torch.all(got_grads[1][vocab:] == 0)  # padded rows never get a gradient
    if with_teacher:
        assert torch.all(got[0] > 0)  # two different distributions: KL strictly positive


@pytest.mark.parametrize(
    "num_tokens,chunk_size,vocab,padded",
    [(7, None, 11, 16), (7, 1, 11, 16), (23, 2, 700, 768), (23, 5, 700, 768)],
)
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
def test_teacher_weight_matches_naive_reference(num_tokens, chunk_size, vocab, padded, temps):
    """A teacher with its own output layer (an EMA or the initial policy): its logits take
    ``teacher_weight``, the student's and every gradient only ``weight``; ``teacher_weight`` gets none."""
    h_s, h_t, weight, targets, upstream = make_case(num_tokens, 5, vocab, padded)
    gen = torch.Generator().manual_seed(7)
    teacher_weight = (
        weight.detach() + 0.5 * torch.randn(padded, 5, generator=gen, dtype=F64)
    ).requires_grad_()
    t_s, t_t = temps
    got, got_grads = values_and_grads(
        lambda: fused_kl_head(
            h_s, h_t, weight, targets, vocab_size=vocab, temperature=t_s, teacher_temperature=t_t,
            chunk_size=chunk_size, teacher_weight=teacher_weight,
        ),
        h_s, weight, upstream,
    )  # fmt: skip
    want, want_grads = values_and_grads(
        lambda: naive_reference(h_s, h_t, weight, targets, vocab, t_s, t_t, teacher_weight),
        h_s, weight, upstream,
    )  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)
    same_weight = naive_reference(h_s, h_t, weight, targets, vocab, t_s, t_t)[0]
    assert (got[0] - same_weight.detach()).abs().max() > 1e-2  # the teacher's own weight was used
    assert teacher_weight.grad is None


def test_kl_of_identical_distributions_is_zero():
    h_s, _, weight, targets, _ = make_case(6, 4, 9, 12)
    kl, _, _ = fused_kl_head(
        h_s, h_s.detach(), weight, targets, vocab_size=9, temperature=0.5, teacher_temperature=0.5
    )
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-14, rtol=0)


def test_gradcheck_hidden_with_teacher():
    h_s, h_t, weight, targets, _ = make_case(5, 3, 7, 9)

    def fn(h):
        return fused_kl_head(
            h,
            h_t,
            weight.detach(),
            targets,
            vocab_size=7,
            temperature=0.8,
            teacher_temperature=1.7,
            chunk_size=2,
        )

    assert torch.autograd.gradcheck(fn, (h_s,))


def test_gradcheck_hidden_and_weight_student_only():
    h_s, _, weight, targets, _ = make_case(4, 3, 7, 9)

    def fn(h, w):
        return vocab_parallel_logprob_entropy(h, w, targets, vocab_size=7, temperature=0.6, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (h_s, weight))


def test_partial_use_of_outputs_and_frozen_weight():
    h_s, h_t, weight, targets, _ = make_case(6, 4, 10, 10)
    kl, _, _ = fused_kl_head(h_s, h_t, weight, targets, vocab_size=10, chunk_size=4)
    (grad_h,) = torch.autograd.grad(kl.sum(), (h_s,))
    want, _, _ = naive_reference(h_s, h_t, weight, targets, 10)
    (want_h,) = torch.autograd.grad(want.sum(), (h_s,))
    torch.testing.assert_close(grad_h, want_h, rtol=1e-11, atol=1e-12)

    frozen = weight.detach()
    h_t_grad = h_t.clone().requires_grad_()
    _, logprob, entropy = fused_kl_head(h_s, h_t_grad, frozen, targets, vocab_size=10)
    (logprob + entropy).sum().backward()
    assert h_s.grad is not None and h_t_grad.grad is None  # the teacher never gets a gradient


def test_int32_targets_and_noncontiguous_hidden():
    h_s, h_t, weight, targets, _ = make_case(6, 4, 10, 12)
    h_s_t = h_s.detach().t().contiguous().t().requires_grad_()  # column-major [N, H]
    got = fused_kl_head(h_s_t, h_t, weight, targets.int(), vocab_size=10, chunk_size=2)
    want = naive_reference(h_s, h_t, weight, targets, 10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12)


def test_empty_batch():
    h_s, h_t, weight, targets, _ = make_case(0, 4, 10, 12)
    kl, logprob, entropy = fused_kl_head(h_s, h_t, weight, targets, vocab_size=10)
    assert kl.shape == logprob.shape == entropy.shape == (0,)
    (kl.sum() + logprob.sum() + entropy.sum()).backward()
    assert h_s.grad.shape == (0, 4) and torch.all(weight.grad == 0)


def test_bf16_accumulates_in_fp32():
    """bf16 inputs: fp32 outputs near the fp64 reference, closer than a pure-bf16 computation."""
    vocab, hidden, num_tokens = 3000, 64, 24
    h_s, h_t, weight, targets, _ = make_case(
        num_tokens, hidden, vocab, vocab, dtype=torch.bfloat16, scale=0.6
    )
    kl, logprob, entropy = fused_kl_head(h_s, h_t, weight, targets, vocab_size=vocab, chunk_size=10)
    assert kl.dtype == logprob.dtype == entropy.dtype == torch.float32
    exact = naive_reference(h_s.double(), h_t.double(), weight.double(), targets, vocab)
    with torch.no_grad():  # the reference's precision, emulated: bf16 logits and softmax (its own numbers: test_kl_head_reference.py)
        log_p_s = torch.log_softmax(h_s @ weight.t(), dim=-1)
        log_p_t = torch.log_softmax(h_t @ weight.t(), dim=-1)
        p_s = log_p_s.exp()
        bf16 = (
            (p_s * (log_p_s - log_p_t)).sum(-1),
            log_p_s.gather(1, targets[:, None])[:, 0],
            -(p_s * log_p_s).sum(-1),
        )
    for fused, pure, ref in zip((kl, logprob, entropy), bf16, exact):
        err_fused = (fused.double() - ref).abs().max().item()
        err_bf16 = (pure.double() - ref).abs().max().item()
        assert err_fused < 1e-4 * max(1.0, ref.abs().max().item())
        assert err_fused < err_bf16 / 10
    (kl.sum() + logprob.sum() - entropy.sum()).backward()
    assert h_s.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h64, w64 = h_s.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_kl, ref_lp, ref_ent = naive_reference(h64, h_t.double(), w64, targets, vocab)
    (ref_kl.sum() + ref_lp.sum() - ref_ent.sum()).backward()
    for got, want in ((h_s.grad, h64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _gemms_on_fake_cuda(num_tokens: int, hidden: int, vocab: int, chunk_size: int, own_teacher_weight=False):
    """Forward and backward of the bf16 head on fake CUDA tensors (shapes and dtypes only, so this
    CPU build runs the CUDA branch); every GEMM as ``(op, operand dtypes, output dtype, shape)``.

    Autograd on fake CUDA tensors is not available here, so the backward is called directly."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from sdpg_mcore.audit.fake_cuda import FakeCuda
    from sdpg_mcore.ops.fused_kl_head import _FusedKLHead
    from sdpg_mcore.ops.kl_head_backends import TorchPath
    from sdpg_mcore.ops.kl_head_math import plan_chunks

    gemms = []

    class RecordGemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                operands = [a.dtype for a in args if isinstance(a, torch.Tensor)][-2:]
                gemms.append((str(func), operands, out.dtype, tuple(out.shape)))
            return out

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    with FakeCuda() as audit, RecordGemms(), torch.no_grad():
        h_s, h_t = torch.empty(num_tokens, hidden, **bf16), torch.empty(num_tokens, hidden, **bf16)
        weight = torch.empty(vocab, hidden, **bf16)
        targets = torch.zeros(num_tokens, dtype=torch.long, device="cuda")
        plan = plan_chunks(
            h_s, h_t, weight, targets, vocab_size=vocab, temperature=1.0, teacher_temperature=1.0,
            chunk_size=chunk_size, tp_size=1, tp_rank=0,
        )  # fmt: skip
        assert plan.fp32_output_gemm
        ctx = SimpleNamespace(set_materialize_grads=lambda _: None, needs_input_grad=(True, False, True))
        ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
        teacher_weight = torch.empty(vocab, hidden, **bf16) if own_teacher_weight else None
        outs = _FusedKLHead.forward(ctx, h_s, h_t, weight, targets, plan, None, TorchPath(), teacher_weight)
        grads = _FusedKLHead.backward(ctx, *(torch.empty_like(o) for o in outs))
        assert [o.dtype for o in outs] == [torch.float32] * 3
        assert grads[0].dtype == grads[2].dtype == torch.bfloat16
    assert audit.report() == {"violations": [], "host_syncs": []}  # no sync in the head either way
    return plan, gemms


@pytest.mark.parametrize("own_teacher_weight", [False, True])
def test_cuda_path_multiplies_bf16_logits_into_fp32(own_teacher_weight):
    """The path CUDA takes, checked on this CPU build with fake CUDA tensors: every GEMM whose output
    is logits (``[tokens or 2 x tokens, block rows]``; ``[tokens, block rows]`` twice per block with
    the teacher's own output layer) takes bf16 operands and writes fp32 through ``mm.dtype`` — no
    logit is ever rounded to bf16; only the weight gradient is written in bf16."""
    num_tokens, hidden, vocab = 24, 64, 3000
    from sdpg_mcore.ops.kl_head_math import fp32_accumulating_gemm_on

    plan, gemms = _gemms_on_fake_cuda(
        num_tokens, hidden, vocab, chunk_size=10, own_teacher_weight=own_teacher_weight
    )
    per_block = 2 if own_teacher_weight else 1  # logits GEMMs per block and pass (the teacher's own one)
    logits = [g for g in gemms if g[3][1] != hidden and g[3][0] in (num_tokens, 2 * num_tokens)]
    assert len(logits) == 2 * per_block * -(-vocab // plan.block_rows)  # forward and backward, every block
    for op, operands, out_dtype, _ in logits:
        assert operands == [torch.bfloat16, torch.bfloat16] and out_dtype == torch.float32, (op, operands)
        assert op == "aten.mm.dtype"
    bf16_out = [g for g in gemms if g[2] == torch.bfloat16]
    assert bf16_out and all(g[3][1] == hidden for g in bf16_out)  # dW blocks [B, H] only
    grad_h = [g for g in gemms if g[3] == (num_tokens, hidden)]
    assert len(grad_h) == len(logits) // (2 * per_block)  # dh accumulates in place, one GEMM per block
    in_place = fp32_accumulating_gemm_on(torch.device("cuda"))  # torch >= 2.11
    op = "aten.addmm.dtype_out" if in_place else "aten.mm.dtype"
    assert all(g[:3] == (op, [torch.bfloat16] * 2, torch.float32) for g in grad_h)


def test_cpu_path_upcasts_bf16_operands():
    """On CPU (no ``mm.dtype`` kernel) the plan up-casts bf16 operands to fp32, so the logits are fp32."""
    from sdpg_mcore.ops.kl_head_math import plan_chunks

    h = torch.zeros(4, 8, dtype=torch.bfloat16)
    w = torch.zeros(16, 8, dtype=torch.bfloat16)
    plan = plan_chunks(
        h, h, w, torch.zeros(4, dtype=torch.long), vocab_size=16, temperature=1.0, teacher_temperature=1.0,
        chunk_size=None, tp_size=1, tp_rank=0,
    )  # fmt: skip
    assert not plan.fp32_output_gemm and plan.as_matmul_operand(h).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"vocab_size": 20}, "vocab_size"),
        ({"vocab_size": 10, "temperature": 0.0}, "temperature"),
        ({"vocab_size": 10, "chunk_size": 0}, "chunk_size"),
        ({"vocab_size": 5}, "targets"),
    ],
)
def test_user_errors(kwargs, match):
    h_s, h_t, weight, targets, _ = make_case(6, 4, 10, 12)
    targets[0] = 9
    with pytest.raises(ValueError, match=match):
        fused_kl_head(h_s, h_t, weight, targets, **kwargs)


@pytest.mark.parametrize("tp_size", [1, 2, 8])
def test_default_plan_bounds_memory_at_qwen3_scale(tp_size):
    """chunk_size=None keeps the three fp32 buffers within the 256 MiB budget, with wide blocks."""
    from sdpg_mcore.ops.kl_head_math import DEFAULT_CHUNK_BUDGET_BYTES, plan_chunks

    vocab, padded, hidden, tokens = 151936, 151936 + 128 * 8 - 151936 % (128 * 8), 2560, 8192
    h = torch.zeros(1, dtype=torch.bfloat16).expand(tokens, hidden)  # shapes only, no memory
    w = torch.zeros(1, dtype=torch.bfloat16).expand(padded // tp_size, hidden)
    for rank in range(tp_size):
        plan = plan_chunks(
            h, h, w, torch.zeros(tokens, dtype=torch.long), vocab_size=vocab, temperature=1.0,
            teacher_temperature=1.0, chunk_size=None, tp_size=tp_size, tp_rank=rank,
        )  # fmt: skip
        assert plan.group_tokens == tokens  # one group: two all-reduces for the whole call
        assert 3 * plan.group_tokens * plan.block_rows * 4 <= DEFAULT_CHUNK_BUDGET_BYTES
        assert plan.block_rows >= 128
        assert plan.real_rows == max(0, min(padded // tp_size, vocab - rank * (padded // tp_size)))


def test_bf16_head_at_qwen3_vocab_within_1e5_of_fp64():
    """The issue's bar on a Qwen3-sized vocabulary (151,936 rows, the default chunk plan): KL, log-prob
    and entropy from bf16 inputs within 1e-5 absolute of fp64 computed from the same bf16 values.

    Why 1e-5 holds here: every bf16 x bf16 product is exact in fp32, and the fp32 sum of 64 of them
    errs by at most ~64 * 2**-24 * sum|x w| (errors measured here: ~1e-6 on all three); a bf16-rounded logit would
    err by ~2**-9 |z| (about 1e-2). At H=2560 on GPU tensor cores the logit error grows ~40x (see
    tools/gpu_check.py's derived bound)."""
    vocab, hidden, num_tokens = 151936, 64, 12
    h_s, h_t, weight, targets, _ = make_case(
        num_tokens,
        hidden,
        vocab,
        vocab,
        dtype=torch.bfloat16,
        scale=0.3,  # logits up to ~13, KL ~5 nats
    )
    with torch.no_grad():
        got = fused_kl_head(h_s, h_t, weight, targets, vocab_size=vocab)
        exact = naive_reference(h_s.double(), h_t.double(), weight.double(), targets, vocab)
    for name, g, want in zip(("kl", "logprob", "entropy"), got, exact):
        assert g.dtype == torch.float32
        err = (g.double() - want).abs().max().item()
        assert err <= 1e-5, (name, err)
