"""Aggregation modes: exact values, and the same loss and gradient however the mini-batch is split."""

import pytest
import torch
from algo_testlib import LENGTHS, make_batch, micro_inputs, run_mini_batch

from sdpg_mcore.algo import (
    DAPOConfig,
    Normaliser,
    OPSDConfig,
    SDPGConfig,
    TokenInputs,
    aggregate,
    get_algorithm,
    loss_counts,
    micro_batch_loss,
    normalisers_from_counts,
    seq_counts,
)

SPLITS = {
    1: [list(range(8))],
    2: [[0, 1, 2, 3], [4, 5, 6, 7]],
    4: [[0, 1], [2, 3], [4, 5], [6, 7]],
    "uneven": [[0], [1, 2, 3, 4, 5], [6, 7]],
    "no_positive_mb": [
        [1, 2],
        [0, 3],
        [4, 5, 6, 7],
    ],  # responses 1, 2 have A < 0: opsd's first micro-batch is empty
}
INVARIANT = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def _cfg(name, mode):
    if name == "sdpg":
        return SDPGConfig(beta=0.2, alpha=0.1, entropy_coef=0.03, loss_agg_mode=mode)
    if name == "opsd":
        return OPSDConfig(loss_agg_mode=mode)
    return DAPOConfig(loss_agg_mode=mode)


@pytest.mark.parametrize("name", ["sdpg", "opsd", "dapo"])
@pytest.mark.parametrize("mode", INVARIANT)
def test_split_invariance(name, mode):
    batch = make_batch()
    cfg = _cfg(name, mode)
    loss_1, grad_1, _ = run_mini_batch(name, cfg, batch, SPLITS[1])
    assert grad_1.abs().sum() > 0
    for key in (2, 4, "uneven", "no_positive_mb"):
        loss_k, grad_k, _ = run_mini_batch(name, cfg, batch, SPLITS[key])
        assert loss_k == pytest.approx(loss_1, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(grad_k, grad_1, rtol=1e-12, atol=1e-14)


def test_legacy_token_mean_depends_on_split_and_follows_its_formula():
    """The formula of ``aggregation.py``'s docstring, written out here; the reference's own numbers for
    it are in ``test_algo_reference.py``."""
    batch = make_batch()
    cfg = DAPOConfig(loss_agg_mode="token-mean-legacy")
    loss_1, grad_1, _ = run_mini_batch("dapo", cfg, batch, SPLITS[1])
    tm_loss, tm_grad, _ = run_mini_batch("dapo", DAPOConfig(), batch, SPLITS[1])
    assert loss_1 == pytest.approx(tm_loss, rel=1e-12)  # one micro-batch: the flaw is invisible
    torch.testing.assert_close(grad_1, tm_grad, rtol=1e-12, atol=1e-14)
    w = batch["w0"]
    for key in (2, 4, "uneven"):
        loss_k, grad_k, _ = run_mini_batch("dapo", cfg, batch, SPLITS[key])
        want = 0.0  # sum over micro-batches of rows/mini_batch_rows * own token mean
        for seqs in SPLITS[key]:
            inp = micro_inputs(batch, w, seqs)
            pg = run_token_loss(cfg, inp)
            want += len(seqs) / 8 * pg.mean().item()
        assert loss_k == pytest.approx(want, rel=1e-12)
        assert abs(loss_k - loss_1) > 1e-4 and (grad_k - grad_1).abs().max() > 1e-4


def run_token_loss(cfg, inp):
    from sdpg_mcore.algo.losses import dapo_loss

    return dapo_loss(inp, cfg, step=1, total_steps=0).loss_N.detach()


def test_modes_against_direct_formulas():
    gen = torch.Generator().manual_seed(3)
    seq_index = torch.repeat_interleave(torch.arange(8), torch.tensor(LENGTHS))
    values = torch.randn(len(seq_index), generator=gen, dtype=torch.float64)
    mask = torch.rand(len(seq_index), generator=gen) > 0.3
    mask[seq_index == 1] = False  # a sequence with no counted token is not in the sequence count
    per_seq = [values[(seq_index == s) & mask] for s in range(8)]
    live = [v for v in per_seq if len(v)]
    want = {
        "token-mean": values[mask].sum() / mask.sum(),
        "seq-mean-token-sum": sum(v.sum() for v in live) / len(live),
        "seq-mean-token-mean": sum(v.mean() for v in live) / len(live),
    }
    for mode, w in want.items():
        norm = Normaliser(mode, float(mask.sum()), float(len(live)))
        torch.testing.assert_close(aggregate(values, mask, seq_index, 8, norm), w, rtol=1e-14, atol=0)


def test_masked_nan_does_not_leak_and_empty_batch_is_zero():
    values = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    seq_index = torch.tensor([0, 0, 1])
    out = aggregate(values, mask, seq_index, 2, Normaliser("token-mean", 2.0, 2.0))
    out.backward()
    assert out.item() == 2.0 and values.grad.tolist() == [0.5, 0.0, 0.5]
    empty = aggregate(
        values, torch.zeros(3, dtype=torch.bool), seq_index, 2, Normaliser("seq-mean-token-mean", 0, 0)
    )
    assert empty.item() == 0.0


def test_legacy_normaliser_validates():
    with pytest.raises(ValueError, match="mini_batch_rows"):
        Normaliser("token-mean-legacy", 10.0, 2.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        Normaliser("sum", 1.0, 1.0)


@pytest.mark.parametrize("name", ["sdpg", "opsd"])
@pytest.mark.parametrize("mode", INVARIANT)
def test_context_parallel_token_split(name, mode):
    """Each response's tokens split over two CP ranks: seq_owner counts it once, seq_counts gives the
    global per-sequence counts, and the two contributions sum to the unsplit loss and gradient."""
    batch = make_batch()
    cfg = _cfg(name, mode)
    algo = get_algorithm(name)
    w = batch["w0"].clone().requires_grad_(True)
    full = micro_inputs(batch, w, list(range(8)))
    first_half = torch.cat([torch.arange(n) < (n + 1) // 2 for n in LENGTHS])
    parts = [first_half.nonzero()[:, 0], (~first_half).nonzero()[:, 0]]

    def part(idx, seq_tokens_2S=None):
        return TokenInputs(
            **{
                k: getattr(full, k)[idx]
                for k in ("logprob_N", "old_logprob_N", "advantages_N", "seq_index_N")
            },
            num_seqs=8,
            kl_N=full.kl_N[idx],
            entropy_N=full.entropy_N[idx],
            ref_logprob_N=full.ref_logprob_N[idx],
            teacher_logprob_N=full.teacher_logprob_N[idx],
            seq_loss_tokens_S=None if seq_tokens_2S is None else seq_tokens_2S[0],
            seq_response_tokens_S=None if seq_tokens_2S is None else seq_tokens_2S[1],
        )

    cp = [part(idx) for idx in parts]
    counts = sum(
        loss_counts(algo, cfg, p.advantages_N, p.seq_index_N, 8, seq_owner=(r == 0)) for r, p in enumerate(cp)
    )
    per_seq = sum(seq_counts(algo, cfg, p.advantages_N, p.seq_index_N, 8) for p in cp)  # the CP all-reduce
    norms = normalisers_from_counts(counts, mode)
    split = sum(micro_batch_loss(algo, cfg, part(idx, per_seq), norms, step=3).loss for idx in parts)
    counts_1 = loss_counts(algo, cfg, full.advantages_N, full.seq_index_N, 8)
    whole = micro_batch_loss(algo, cfg, full, normalisers_from_counts(counts_1, mode), step=3).loss
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    (g_split,) = torch.autograd.grad(split, w, retain_graph=True)
    (g_whole,) = torch.autograd.grad(whole, w)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-12, atol=1e-14)
