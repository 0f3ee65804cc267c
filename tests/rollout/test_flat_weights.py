"""FlatBucketReceiver: flattened buckets land in the parameters, in place from the second update on."""

from __future__ import annotations

import torch

from sdpg_mcore.rollout.flat_weights import FlatBucketReceiver


def _model() -> dict[str, torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2), "d": (7,)}
    return {n: torch.nn.Parameter(torch.randn(s), requires_grad=False) for n, s in shapes.items()}


def _sender(values: dict[str, torch.Tensor], names: list[str]):
    """``recv`` that writes the flattened ``values`` of ``names`` (what the broadcast would deliver)."""
    flat = torch.cat([values[n].reshape(-1) for n in names])
    return lambda buffer: buffer.copy_(flat)


def _new_values(params, scale: float) -> dict[str, torch.Tensor]:
    return {n: torch.full_like(p, scale) + torch.arange(p.numel()).view_as(p) for n, p in params.items()}


def test_first_update_binds_then_later_ones_land_in_place():
    params, receiver = _model(), FlatBucketReceiver()
    names = ["a", "b", "c"]
    for step in range(3):
        values = _new_values(params, float(step))
        before = {n: params[n].data_ptr() for n in names}
        receiver.receive(names, [params[n] for n in names], torch.float32, _sender(values, names))
        for n in names:
            assert torch.equal(params[n], values[n])
        if step > 0:  # received straight into the parameters: nothing moved
            assert {n: params[n].data_ptr() for n in names} == before
    assert receiver.num_in_place == 2
    # The untouched parameter keeps its own storage.
    assert params["d"].untyped_storage().data_ptr() != params["a"].untyped_storage().data_ptr()


def test_overlapping_layout_rebinds_and_stays_correct():
    params, receiver = _model(), FlatBucketReceiver()
    first, second = ["a", "b"], ["b", "c", "d"]
    for step in range(2):
        for layout in (first, second):
            values = _new_values(params, 10.0 * step + len(layout))
            receiver.receive(layout, [params[n] for n in layout], torch.float32, _sender(values, layout))
            for n in layout:
                assert torch.equal(params[n], values[n])
    # "b" moves between the layouts every time, so neither is ever received in place ...
    assert receiver.num_in_place == 0
    # ... and only the latest layout stays remembered (no buffers kept alive for stale ones).
    assert list(receiver._bound) == [tuple(second)]


def test_dtype_mismatch_and_repeated_parameter_are_copied():
    params, receiver = _model(), FlatBucketReceiver()
    values = _new_values(params, 3.0)
    bf16 = {n: v.to(torch.bfloat16) for n, v in values.items()}
    receiver.receive(["a", "b"], [params["a"], params["b"]], torch.bfloat16, _sender(bf16, ["a", "b"]))
    assert params["a"].dtype == torch.float32 and torch.equal(params["a"], bf16["a"].float())
    tied = ["c", "c"]  # one parameter under two names (tied embeddings): views would alias
    ptr = params["c"].data_ptr()
    receiver.receive(tied, [params["c"], params["c"]], torch.float32, _sender(values, tied))
    assert params["c"].data_ptr() == ptr and torch.equal(params["c"], values["c"])
    assert receiver._bound == {}
