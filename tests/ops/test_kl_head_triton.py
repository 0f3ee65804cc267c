"""The Triton path of the fused head (``backend="triton"``) against fp64 and against the torch path.

Here the kernels run under Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``; on a
GPU machine on CUDA). Bars (fp32 and bf16 inputs; fp64 computed from the same rounded inputs):
KL, log-prob and entropy within 1e-5 absolute; with fp32 inputs the gradients of ``student_hidden``
and ``weight`` within 1e-5 of fp64 relative to their largest entry. Why they hold: every logit is an
fp32 GEMM over ``H <= 48`` products (error ~ H * 2**-24 * sum|x w|, below 1e-6 here) and every sum
runs in fp32 over at most a few thousand terms. With bf16 inputs ``dz`` is written in bf16 (the GEMM
operand on a GPU), so gradients carry its 2**-9 relative rounding: checked at 1e-2.

Interpreter launches cost ~0.05 s each (``INTERPRETER_ROWS`` tokens per program): shapes are tiny.
"""

from __future__ import annotations

import random

import pytest
import torch
from headlib import F64, make_case, naive_reference, teacher_weight_like, values_and_grads

from sdpg_mcore.ops import fused_kl_head
from sdpg_mcore.ops.kl_head_backends import resolve_backend
from sdpg_mcore.parallel.spawn import spawn_ranks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VALUE_TOL = 1e-5
GRAD_TOL = 1e-5  # relative to the largest entry, fp32 inputs
BF16_GRAD_TOL = 1e-2


@pytest.fixture(autouse=True)
def _kernels_can_run():
    """Fail, never skip, when the kernels cannot run here (e.g. triton missing or imported early)."""
    assert resolve_backend("triton", DEVICE, torch.float32) == "triton"


def _errors(
    case, vocab, padded, dtype, *, teacher=True, temps=(1.0, 1.0), chunk=None, scale=None, own_weight=False
):
    """Max errors of the triton head against fp64 and the torch head, on the same rounded inputs;
    ``own_weight``: the teacher's logits from its own output layer (``teacher_weight``)."""
    num_tokens, hidden, seed = case
    scale = 3.0 / hidden**0.5 if scale is None else scale  # logits ~ N(0, 9)
    h_s, h_t, weight, targets, upstream = make_case(num_tokens, hidden, vocab, padded, dtype, seed, scale)
    h_s, weight = (x.detach().to(DEVICE).requires_grad_() for x in (h_s, weight))
    h_t, targets, upstream = (
        h_t.to(DEVICE) if teacher else None,
        targets.to(DEVICE),
        [u.to(DEVICE) for u in upstream],
    )
    teacher_w = teacher_weight_like(weight, spread=scale) if own_weight else None
    kwargs = dict(vocab_size=vocab, temperature=temps[0], teacher_temperature=temps[1], chunk_size=chunk)
    kwargs["teacher_weight"] = teacher_w
    got, got_grads = values_and_grads(
        lambda: fused_kl_head(h_s, h_t, weight, targets, backend="triton", **kwargs), h_s, weight, upstream
    )
    torch_vals, _ = values_and_grads(
        lambda: fused_kl_head(h_s, h_t, weight, targets, backend="torch", **kwargs), h_s, weight, upstream
    )
    h64, w64 = (x.detach().double().requires_grad_() for x in (h_s, weight))
    t64 = None if h_t is None else h_t.double()
    tw64 = None if teacher_w is None else teacher_w.double()
    want, want_grads = values_and_grads(
        lambda: naive_reference(h64, t64, w64, targets, vocab, *temps, tw64), h64, w64, upstream
    )
    names = ("kl", "logprob", "entropy")
    return {
        "values": {n: float((g.double() - w).abs().max()) for n, g, w in zip(names, got, want)},
        "vs_torch": {
            n: float((g.double() - t.double()).abs().max()) for n, g, t in zip(names, got, torch_vals)
        },
        "grads": {
            n: float((g.double() - w).abs().max() / w.abs().max())
            for n, g, w in zip(("student_hidden", "weight"), got_grads, want_grads)
        },
        "padding_grad": float(got_grads[1][vocab:].abs().max()) if padded > vocab else 0.0,
        "dtypes": [g.dtype for g in got_grads],
    }


def _check(errors, dtype):
    assert max(errors["values"].values()) <= VALUE_TOL, errors
    assert max(errors["vs_torch"].values()) <= VALUE_TOL, errors
    assert errors["padding_grad"] == 0.0, errors  # rows past vocab_size never get a gradient
    assert errors["dtypes"] == [dtype, dtype]
    limit = GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    assert max(errors["grads"].values()) <= limit, errors


# 300 of 384 rows, 16 tokens: chunk 8 gives blocks of 128 rows (16 x 128 <= 8 x 384) and a ragged
# last block of 44 real rows in a 128-row GEMM; chunk 2 splits the tokens into groups of 6 as well.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "teacher,temps,chunk,own_weight",
    [
        (True, (0.7, 1.3), 8, False),
        (False, (1.0, 1.0), 8, False),
        (True, (1.3, 0.6), 2, False),
        (True, (0.7, 1.3), 8, True),
        (True, (1.3, 0.6), 2, True),
    ],
    ids=["teacher-temps", "no-teacher", "token-groups", "teacher-weight", "teacher-weight-groups"],
)
def test_matches_fp64_and_torch_path(dtype, teacher, temps, chunk, own_weight):
    """``teacher-weight``: a teacher with its own output layer (an EMA or the initial policy): two
    GEMMs per block into the one logits block, the kernels unchanged, no gradient to that layer."""
    errors = _errors(
        (16, 24, 0), 300, 384, dtype, teacher=teacher, temps=temps, chunk=chunk, own_weight=own_weight
    )
    _check(errors, dtype)
    if not teacher:
        assert errors["values"]["kl"] == 0.0


def _drawn_cases(count: int, seed: int = 24) -> list[tuple]:
    """Shapes drawn from a seeded RNG, not picked: tokens, hidden, vocab, padding, chunk, temps."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        vocab = rng.randint(1, 1200)
        padded = vocab + rng.choice([0, rng.randint(1, 200), -vocab % 128])
        temps = (rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0))
        tokens = rng.randint(1, 32)
        chunk = rng.choice([None, rng.randint(max(1, tokens // 8), tokens)])  # 1 to ~8 blocks
        cases.append(((tokens, rng.randint(1, 48), i), vocab, padded, chunk, temps, rng.random() < 0.7))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _drawn_cases(4), ids=lambda c: f"N{c[0][0]}-H{c[0][1]}-V{c[1]}of{c[2]}")
def test_shapes_drawn_at_random(case, dtype):
    shape, vocab, padded, chunk, temps, teacher = case
    _check(_errors(shape, vocab, padded, dtype, teacher=teacher, temps=temps, chunk=chunk), dtype)


TP_CASES = ((300, False), (200, False), (300, True))
"""(vocab, the teacher's own output layer?) of 512 padded rows: with TP 2, rank 1 holds 44 real rows
behind 212 of padding, then only padding. Targets lie anywhere in ``[0, vocab)``, so most are in the
other rank's shard."""


def _tp_rank(rank: int, world_size: int, backend: str):
    """One rank's outputs and gradients with its weight shard (fp32 inputs), for each of TP_CASES."""
    import torch.distributed as dist

    results = []
    for vocab, own_weight in TP_CASES:
        h_s, h_t, weight, targets, upstream = make_case(11, 12, vocab, 512, torch.float32, seed=3, scale=0.8)
        rows = slice(rank * 512 // world_size, (rank + 1) * 512 // world_size)
        w = weight.detach()[rows].clone().requires_grad_()
        w_t = teacher_weight_like(weight, spread=0.3)[rows] if own_weight else None
        outs = fused_kl_head(
            h_s, h_t, w, targets, vocab_size=vocab, temperature=0.8, teacher_temperature=1.2,
            chunk_size=4, tp_group=dist.group.WORLD if world_size > 1 else None, backend=backend,
            teacher_weight=w_t,
        )  # fmt: skip
        sum((o.double() * g).sum() for o, g in zip(outs, upstream)).backward()
        results.append([t.detach().double().numpy() for t in (torch.stack(outs), h_s.grad, w.grad)])
    return results


def test_tp2_over_gloo_matches_single_rank():
    want_all = _tp_rank(0, 1, "torch")
    by_rank = spawn_ranks(_tp_rank, 2, args=("triton",), timeout_s=300)
    for case, (vocab, _) in enumerate(TP_CASES):
        want = [torch.from_numpy(a) for a in want_all[case]]
        ranks = [[torch.from_numpy(a) for a in results[case]] for results in by_rank]
        for outs, grad_h, _ in ranks:
            assert (outs - want[0]).abs().max() <= VALUE_TOL
            assert (grad_h - want[1]).abs().max() <= GRAD_TOL * want[1].abs().max()
        grad_w = torch.cat([r[2] for r in ranks])
        assert (grad_w - want[2]).abs().max() <= GRAD_TOL * want[2].abs().max()
        assert torch.all(grad_w[vocab:] == 0) and grad_w[:vocab].abs().sum() > 0


def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"  # importable here
    assert resolve_backend("auto", cuda, torch.float64) == "torch"
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        resolve_backend("cuda", cpu, torch.float32)
    with pytest.raises(ValueError, match="fp64"):
        resolve_backend("triton", cuda, F64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # without the interpreter, CPU tensors cannot run
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu, torch.float32)
