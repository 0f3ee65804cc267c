"""Where the teacher's hidden states wait between the teacher pass and the train pass
(``trainer.teacher_states``).

An SDPG mini-batch update runs the teacher pass over all its micro-batches, then the train pass
one micro-batch at a time (``train.step._update``); each micro-batch's teacher response states
``[N, H]`` (``[N_local, H]`` under context parallelism) are read only by that micro-batch's fused
KL head.

- ``device``: they stay on the GPU, the whole mini-batch's share of the last stage at once (8 GiB
  per GPU on the 70B recipe, ``tools/plan.py``'s ``teacher_states`` line).
- ``host``: :class:`HostTeacherStates` copies each micro-batch's states into pinned host memory as
  soon as the teacher pass has made them (``forward.hidden_pass(keep=...)``), and
  ``forward.train_pass`` copies them back just before that micro-batch's student forward: the GPU
  holds one micro-batch's states at a time.

Both copies are non-blocking and on the current stream: ordered with the kernels that make and
read the states, so no host or event wait is added, and the device block of a state freed after
its device-to-host copy is reused only by kernels queued after that copy. The price is that the
copies do not overlap compute: two of ``N x H x 2`` bytes per micro-batch (128 MiB each for an
8,192-token response at H = 8,192: milliseconds over PCIe, against seconds of forward and backward;
not measured on a GPU here).
"""

from __future__ import annotations

import torch

from sdpg_mcore.train.batch import MicroBatch

PLACES = ("device", "host")


def state_rows(mb: MicroBatch) -> int:
    """Rows of the teacher states the teacher pass hands this rank for ``mb`` (its own student tokens under CP)."""
    return mb.num_tokens if mb.cp_index_N is None else mb.cp_index_N.numel()


class HostTeacherStates:
    """One flat pinned host buffer holding a mini-batch's teacher states, reused by every mini-batch.

    Why one buffer and not a pinned tensor per micro-batch from torch's caching host allocator: that
    allocator rounds every block up to a power of two and caches blocks per size, so its pinned
    cache follows the largest count of each size over the run (more than 2x the states when lengths
    vary). The buffer grows only when a mini-batch needs more than any before, to a power of two
    elements (what the allocator would round to anyway), so at most ``log2`` times; the outgrown
    buffer goes back to torch's pinned cache, which has recorded the copies' events, so a copy still
    in flight stays safe. Reuse is safe without a wait: the next mini-batch's device-to-host copies
    are queued on the same stream after this one's host-to-device copies, and the host never reads
    the buffer.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._rows = 0
        self._next = 0

    @property
    def nbytes(self) -> int:
        """Host bytes held (the planner's ``teacher_states_host``)."""
        return 0 if self._flat is None else self._flat.numel() * self._flat.element_size()

    def start(self, rows: int) -> None:
        """A new mini-batch of ``rows`` teacher-state rows in all; the previous one's are done with."""
        self._rows, self._next = rows, 0

    def keep(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """Copy one micro-batch's states into the buffer (non-blocking); returns their host view."""
        n, h = hidden_NH.shape
        end = self._next + n * h
        if end > self._rows * h:
            raise RuntimeError(
                f"teacher states of {end // h} rows, but the mini-batch was started with {self._rows}"
            )
        self._reserve(self._rows * h, hidden_NH)
        view_NH = self._flat[self._next : end].view(n, h)
        view_NH.copy_(hidden_NH, non_blocking=True)
        self._next = end
        return view_NH

    def _reserve(self, numel: int, like: torch.Tensor) -> None:
        flat = self._flat
        if flat is not None and flat.numel() >= numel and flat.dtype == like.dtype:
            return
        capacity = 1 << max(numel - 1, 0).bit_length()
        # Pinned for an accelerator (DMA, and the copies are really non-blocking); plain memory on a CPU run.
        self._flat = torch.empty(capacity, dtype=like.dtype, pin_memory=like.device.type != "cpu")


def host_store(place: str) -> HostTeacherStates | None:
    """The store for ``trainer.teacher_states=place`` (None: the states stay on the device)."""
    if place not in PLACES:
        raise ValueError(f"teacher_states={place!r} is not one of {', '.join(PLACES)}")
    return HostTeacherStates() if place == "host" else None
