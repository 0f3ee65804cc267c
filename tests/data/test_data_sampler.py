"""PromptSampler: deterministic order by seed, exact resume from a saved state, epoch boundaries."""

import itertools

import pytest

from sdpg_mcore.data import PromptSampler


def draw(sampler, num_batches):
    return [sampler.next_batch() for _ in range(num_batches)]


def test_each_epoch_is_a_permutation_and_depends_only_on_seed():
    a = PromptSampler(10, batch_size=3, seed=5)
    batches = draw(a, 6)  # 3 full batches per epoch (the tail of 1 is dropped), 2 epochs
    assert all(len(b) == 3 for b in batches)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9
    assert epoch0 != epoch1  # reshuffled per epoch
    assert draw(PromptSampler(10, batch_size=3, seed=5), 6) == batches
    assert draw(PromptSampler(10, batch_size=3, seed=6), 6) != batches
    assert a.epoch == 1 and a.batches_per_epoch == 3


@pytest.mark.parametrize("stop_after", [1, 3, 4, 7])
def test_resume_gives_the_same_batches_across_epoch_boundaries(stop_after):
    reference = draw(PromptSampler(10, batch_size=3, seed=1), 10)
    first = PromptSampler(10, batch_size=3, seed=1)
    head = draw(first, stop_after)
    state = first.state_dict()
    resumed = PromptSampler(10, batch_size=3, seed=999)  # the seed comes from the state
    resumed.load_state_dict(dict(state))
    assert head + draw(resumed, 10 - stop_after) == reference


def test_iter_yields_rest_of_epoch_and_keeps_state():
    sampler = PromptSampler(7, batch_size=2, seed=0, drop_last=False)
    first_epoch = list(sampler)
    assert [len(b) for b in first_epoch] == [2, 2, 2, 1]
    assert sorted(sum(first_epoch, [])) == list(range(7))
    second_epoch = list(sampler)
    assert sorted(sum(second_epoch, [])) == list(range(7)) and second_epoch != first_epoch
    sampler2 = PromptSampler(7, batch_size=2, seed=0, drop_last=False)
    part = list(itertools.islice(iter(sampler2), 2))
    state = sampler2.state_dict()
    sampler3 = PromptSampler(7, batch_size=2, seed=0, drop_last=False)
    sampler3.load_state_dict(state)
    assert part + list(sampler3) == first_epoch


def test_no_shuffle_is_sequential():
    assert draw(PromptSampler(5, batch_size=2, shuffle=False), 3) == [[0, 1], [2, 3], [0, 1]]


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="batch_size=8 > 5 prompts"):
        PromptSampler(5, batch_size=8)
    with pytest.raises(ValueError, match="num_samples=0"):
        PromptSampler(0, batch_size=1)
    sampler = PromptSampler(5, batch_size=2)
    with pytest.raises(ValueError, match="sampler state is for 6 prompts"):
        sampler.load_state_dict(PromptSampler(6, batch_size=2).state_dict())
