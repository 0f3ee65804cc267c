"""train/teacher_states.py: the host buffer keeps each micro-batch's states at its own place, reuses
its memory across mini-batches and grows only when a mini-batch needs more."""

import pytest
import torch

from sdpg_mcore.train.teacher_states import HostTeacherStates, host_store


def _states(rows: list[int], h: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, generator=g, dtype=torch.float64).to(torch.bfloat16) for n in rows]


def test_kept_states_are_equal_copies_in_one_reused_buffer():
    store = HostTeacherStates()
    first = _states([5, 3, 7])
    store.start(15)
    kept = [store.keep(x) for x in first]
    for k, x in zip(kept, first):  # copies (the source may be freed), equal bit for bit
        assert torch.equal(k, x) and k.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    storage = kept[0].untyped_storage().data_ptr()
    assert all(k.untyped_storage().data_ptr() == storage for k in kept)  # one buffer, side by side
    assert store.nbytes == 128 * 2  # 15 x 8 elements -> the next power of two, bf16
    second = _states([6, 6], seed=1)  # the next mini-batch: fits, same memory
    store.start(12)
    again = [store.keep(x) for x in second]
    assert all(k.untyped_storage().data_ptr() == storage for k in again) and store.nbytes == 256
    assert all(torch.equal(k, x) for k, x in zip(again, second))
    store.start(40)  # more rows than the buffer holds: a new, larger buffer
    grown = store.keep(_states([40])[0])
    assert grown.untyped_storage().data_ptr() != storage and store.nbytes == 512 * 2


def test_more_rows_than_started_is_an_error_and_a_bad_place_names_the_choices():
    store = HostTeacherStates()
    store.start(4)
    store.keep(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="teacher states of 5 rows, but the mini-batch was started with 4"):
        store.keep(torch.zeros(2, 2))
    assert host_store("device") is None and isinstance(host_store("host"), HostTeacherStates)
    with pytest.raises(ValueError, match="teacher_states='disk' is not one of device, host"):
        host_store("disk")
