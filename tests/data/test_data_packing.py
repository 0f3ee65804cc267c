"""Micro-batching by token budget, packing with cu_seqlens and masks, right-padded batches."""

import random

import pytest
import torch

from sdpg_mcore.data import pack_sequences, pad_batch, split_into_micro_batches, unpack_response


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("balanced", [True, False])
def test_every_sample_exactly_once_and_budget_respected(seed, balanced):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
    budget = rng.randint(40, 120)
    groups = split_into_micro_batches(lengths, budget, balanced=balanced)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= budget for g in groups)
    assert all(g == sorted(g) for g in groups) and [g[0] for g in groups] == sorted(g[0] for g in groups)
    # No more micro-batches than first-fit decreasing needs, and at least the lower bound.
    assert len(groups) >= -(-sum(lengths) // budget)
    assert len(groups) <= len(split_into_micro_batches(lengths, budget, balanced=False))


def test_balanced_split_evens_out_the_load():
    lengths = [10, 10, 10, 10, 10, 10, 10, 10, 10, 2]
    ffd = split_into_micro_batches(lengths, 60, balanced=False)
    bal = split_into_micro_batches(lengths, 60, balanced=True)
    assert len(ffd) == len(bal) == 2
    assert sorted(sum(lengths[i] for i in g) for g in ffd) == [32, 60]
    assert sorted(sum(lengths[i] for i in g) for g in bal) == [42, 50]  # the best split of 9 x 10 + 2


def test_min_num_micro_batches_and_errors():
    groups = split_into_micro_batches([3, 3, 3], 100, min_num_micro_batches=3)
    assert groups == [[0], [1], [2]]
    with pytest.raises(ValueError, match="sample 1 has 50 tokens > the micro-batch budget max_tokens=40"):
        split_into_micro_batches([5, 50], 40)
    with pytest.raises(ValueError, match="min_num_micro_batches=4 > 3 samples"):
        split_into_micro_batches([1, 1, 1], 10, min_num_micro_batches=4)
    assert split_into_micro_batches([], 10) == []


def naive_mask(seq_len, prompt_len):
    return [prompt_len - 1 <= t <= seq_len - 2 for t in range(seq_len)]


@pytest.mark.parametrize(("per_seq", "total"), [(1, 1), (4, 1), (1, 8), (4, 16)])
def test_pack_layout_masks_and_unpack(per_seq, total):
    seqs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
    prompt_lens = [2, 3, 4]  # the second sample has an empty response
    packed = pack_sequences(
        seqs,
        prompt_lens,
        sample_indices=[7, 3, 9],
        pad_id=0,
        pad_sequence_to_multiple_of=per_seq,
        pad_total_to_multiple_of=total,
    )
    T = packed.num_tokens
    assert T % total == 0 and T == int(packed.cu_seqlens_padded[-1])
    assert packed.cu_seqlens.tolist() == [0, 5, 8, 15]
    assert packed.num_padding == T - 15 and packed.sample_indices == [7, 3, 9]
    starts = packed.cu_seqlens_padded.tolist()
    assert all((b - a) % per_seq == 0 for a, b in zip(starts[:-2], starts[1:-1]))
    for start, seq, p in zip(starts, seqs, prompt_lens):
        n = len(seq)
        assert packed.input_ids_T[start : start + n].tolist() == seq
        assert packed.position_ids_T[start : start + n].tolist() == list(range(n))
        assert packed.loss_mask_T[start : start + n].tolist() == naive_mask(n, p)
        assert packed.target_ids_T[start : start + n - 1].tolist() == seq[1:]
    assert int(packed.loss_mask_T.sum()) == sum(len(s) - p for s, p in zip(seqs, prompt_lens))
    # Every response token is predicted exactly once, in order.
    assert packed.target_ids_T[packed.loss_mask_T].tolist() == [13, 14, 15, 35, 36, 37]
    per_sample = unpack_response(packed.target_ids_T, packed)
    assert [x.tolist() for x in per_sample] == [s[p:] for s, p in zip(seqs, prompt_lens)]
    assert packed.max_seqlen == max(b - a for a, b in zip(starts[:-1], starts[1:]))


def test_pad_batch_matches_packing():
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11]]
    prompt_lens = [1, 2, 3]
    padded = pad_batch(seqs, prompt_lens, pad_id=-1, pad_to_multiple_of=4)
    assert padded.input_ids_BT.shape == (3, 8)
    assert padded.attention_mask_BT.sum(1).tolist() == [4, 2, 5]
    assert padded.input_ids_BT[1].tolist() == [5, 6, -1, -1, -1, -1, -1, -1]
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        assert padded.loss_mask_BT[b, : len(s)].tolist() == naive_mask(len(s), p)
        assert not padded.loss_mask_BT[b, len(s) :].any()
    packed = pack_sequences(seqs, prompt_lens)
    assert (
        padded.target_ids_BT[padded.loss_mask_BT].tolist() == packed.target_ids_T[packed.loss_mask_T].tolist()
    )
    assert torch.equal(padded.position_ids_BT[0], torch.arange(8))


def test_bad_prompt_lengths():
    with pytest.raises(ValueError, match=r"sample 1: prompt_len=0 must lie in \[1, 2\]"):
        pack_sequences([[1, 2], [3, 4]], [1, 0])
    with pytest.raises(ValueError, match="2 sequences but 1 prompt lengths"):
        pad_batch([[1], [2]], [1])
