"""The step-time model's fused-head bytes per (token, vocab) pair (``plan/workload.FUSED_HEAD_BYTES``)
are what ``ops/kl_head_traffic`` counts the head moving, per backend and per pass, so they cannot drift
from the kernels.

The head runs its GPU op sequence on CPU (bf16, Triton under its interpreter) at an aligned shape
(vocabulary = padded rows, two blocks that fill their GEMM width) in a fresh process with
``TRITON_INTERPRET=1`` (``spawn_ranks``, one rank: the interpreter must be on before the kernels are
imported, and this process may run them compiled on a GPU). Three calls per backend: train with a
teacher (``kl_head_traffic.count_call``, what ``bench_kl.py --count`` reports), train without one,
and a forward-only log-prob pass; the constants are their differences, exactly.
"""

from __future__ import annotations

import pytest
import torch

from sdpg_mcore.ops import kl_head_traffic as traffic
from sdpg_mcore.parallel.spawn import spawn_ranks
from sdpg_mcore.plan.recipe_time import recipe_timing
from sdpg_mcore.plan.workload import FUSED_HEAD_BYTES, HEAD_BACKENDS_ON_GPU, Rollout

TOKENS, HIDDEN, VOCAB, CHUNK = 64, 48, 1024, 32  # blocks of 32 * 1024 / 64 = 512 rows: two, full


def _pair_bytes(t: traffic.Traffic) -> float:
    return (t.kernel_pair_bytes + t.aten_pair_bytes) / (TOKENS * VOCAB)


def _count(backend: str, teacher: bool, backward: bool) -> float:
    """Bytes per pair of one call of ``fused_kl_head`` as ``kl_head_traffic.count_call`` counts it,
    with or without a teacher, with or without the backward (all used outputs get a gradient)."""
    from sdpg_mcore.ops import fused_kl_head
    from sdpg_mcore.ops.kl_head_math import plan_chunks

    gen = torch.Generator().manual_seed(0)
    h_s = (torch.randn(TOKENS, HIDDEN, generator=gen) / HIDDEN**0.25).bfloat16().requires_grad_(backward)
    h_t = (torch.randn(TOKENS, HIDDEN, generator=gen) / HIDDEN**0.25).bfloat16() if teacher else None
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.25).bfloat16().requires_grad_(backward)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    counted = traffic.Traffic()
    with traffic.cuda_gemms_on_cpu():
        plan = plan_chunks(
            h_s, h_t, weight, targets, vocab_size=VOCAB, temperature=1.0, teacher_temperature=1.0,
            chunk_size=CHUNK, tp_size=1, tp_rank=0,
        )  # fmt: skip
        assert len(plan.blocks()) == 2 and plan.group_tokens == TOKENS
        aten = traffic._AtenCounter(counted, {TOKENS, 2 * TOKENS}, {plan.block_rows})
        with traffic._kernel_counter(counted, aten), aten, torch.set_grad_enabled(backward):
            kl, logprob, entropy = fused_kl_head(
                h_s, h_t, weight, targets, vocab_size=VOCAB, chunk_size=CHUNK, backend=backend
            )
            if backward:
                (logprob.sum() + 0.5 * entropy.sum() + (kl.sum() if teacher else 0.0)).backward()
    return _pair_bytes(counted)


def _count_all(rank: int, world_size: int) -> dict:
    out = {}
    for backend in FUSED_HEAD_BYTES:
        bench, _ = traffic.count_call(backend, TOKENS, HIDDEN, VOCAB, VOCAB, CHUNK)
        out[backend] = {
            "bench": _pair_bytes(bench),
            "train_teacher": _count(backend, teacher=True, backward=True),
            "train": _count(backend, teacher=False, backward=True),
            "logprob": _count(backend, teacher=False, backward=False),
        }
    return out


@pytest.fixture(scope="module")
def counted() -> dict:
    """The counts, from a child that starts with ``TRITON_INTERPRET=1`` in its environment (set
    before it imports anything: importing torch's counters may import Triton)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        return spawn_ranks(_count_all, 1, timeout_s=300)[0]


@pytest.mark.parametrize("backend", sorted(FUSED_HEAD_BYTES))
def test_head_bytes_are_what_the_head_moves(counted, backend):
    """Exact: every count is whole bytes per pair at this aligned shape (one ragged block's padding
    columns are what lifts ``bench_kl.py --count``'s triton figure to 38.9)."""
    c, model = counted[backend], FUSED_HEAD_BYTES[backend]
    assert c["bench"] == c["train_teacher"]  # the bench's own call and ours count the same
    assert c["train"] == model.train
    assert c["train_teacher"] - c["train"] == model.teacher
    assert c["logprob"] == model.logprob


def test_triton_moves_under_a_third_of_the_torch_path():
    triton, torch_path = FUSED_HEAD_BYTES["triton"], FUSED_HEAD_BYTES["torch"]
    assert 3 * (triton.train + triton.teacher) < torch_path.train + torch_path.teacher
    assert 3 * triton.logprob < torch_path.logprob


def test_the_recipe_backend_picks_the_head_bytes_as_on_a_gpu():
    """``trainer.logprob_backend`` resolves as ``kl_head_backends.resolve_backend`` does on CUDA
    (auto: triton, which the dev install brings), and the recipe's setting sets the train head."""
    from sdpg_mcore.ops.kl_head_backends import resolve_backend

    cuda = torch.device("cuda")
    for name, backend in HEAD_BACKENDS_ON_GPU.items():
        assert resolve_backend(name, cuda, torch.bfloat16) == backend

    def head(trainer: dict) -> tuple[str, float, float]:
        timing = recipe_timing(
            {"algorithm": {"name": "sdpg"}, "trainer": trainer},
            max_prompt_len=1024,
            max_response_len=1024,
            micro_batch_tokens=4096,
            recompute="none",
            rollout=Rollout(gpus=8, tp=8),
        )
        return (
            timing.assumed["head_backend"],
            timing.assumed["head_bytes_per_pair"],
            timing.impl.head_bytes_logprob,
        )

    assert head({}) == head({"logprob_backend": "auto"}) == ("triton", 38.0, 8.0)
    assert head({"logprob_backend": "torch"}) == ("torch", 130.0, 40.0)
    with pytest.raises(ValueError, match="trainer.logprob_backend='cuda'"):
        head({"logprob_backend": "cuda"})
