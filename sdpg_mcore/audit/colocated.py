"""The colocated turn on the fake GPU: does ``train/colocate.py`` free every storage and bring it back?

A colocated trainer hands its GPU to the SGLang engines between steps: it copies its weights,
gradients and optimizer state to pinned host memory, frees the device storages, and copies them back
before the next step. On the fake GPU every copy that is not pinned and non-blocking shows up as a
host sync in the audit's findings, and the byte counts show whether anything stayed behind.
"""

from __future__ import annotations

from sdpg_mcore.audit.fake_cuda import CUDA, FakeCuda, is_fake_cuda
from sdpg_mcore.models.builder import unwrap_model


class NoStream:
    """``torch.cuda.current_stream()`` on the fake GPU: the offload's ``synchronize`` moves no data."""

    def synchronize(self) -> None:
        pass


def colocated_check(fake_policy, audit: FakeCuda) -> dict:
    """Offload and reload the trainer's device state (the weights here: the audited policy keeps no
    optimizer state on the device). Every storage must be empty in between and back, on the GPU,
    after; a problem is a violation in ``audit``. ``{"offloaded_bytes", "restored_bytes", ...}``."""
    from sdpg_mcore.train.colocate import GROUPS, TrainerOffload

    offload = TrainerOffload(fake_policy.chunks, fake_policy.optimizer, CUDA)
    resident = offload.resident_bytes()
    freed = offload.offload(GROUPS)
    emptied = offload.resident_bytes()
    restored = offload.reload()
    params = [p for c in fake_policy.chunks for p in unwrap_model(c).parameters()]
    problems = []
    if freed == 0 or any(emptied.values()):
        problems.append(f"colocated offload left device bytes behind: {emptied} of {resident}")
    if restored != freed or offload.resident_bytes() != resident:
        problems.append(f"colocated reload restored {restored} of {freed} bytes")
    if not all(is_fake_cuda(p) for p in params):
        problems.append("colocated reload left weights off the GPU")
    for problem in problems:
        audit.log.add("violation", problem)
    return {"offloaded_bytes": freed, "restored_bytes": restored, "host_buffers_pinned": True}
