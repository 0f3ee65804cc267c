"""The EMA teacher (``algorithm.teacher=ema``): an exponential moving average of the policy's weights.

A guard against the self-teacher eroding: the teacher pass runs with weights that follow the policy
slowly instead of the policy itself. After every optimizer step that updated the weights,

    ema <- ema + (1 - decay) * (weights - ema)        (torch.lerp; ema = the initial weights at start)

per rank, over the rank's own shards of the parameters (its TP slice of its PP stage), the same on
every data- and context-parallel replica (they hold the same weights). The average is fp32 whatever
the model's dtype: with bf16 weights an increment ``(1 - decay) * (w - ema)`` is far below bf16's
resolution (at lr 1e-6 a weight moves ~1e-6 relative per update; bf16 resolves 4e-3), so a bf16
average would never move. It averages the model's weights (bf16 in training), not the optimizer's
fp32 master copy, which the distributed optimizer shards over DP: the average of rounded weights is
within one rounding of the average of exact ones, and every layout keeps it the same way.

Where it lives (``trainer.ema_weights``; ``tools/plan.py`` counts both):

- ``device``: fp32 on the GPU, 4 bytes per parameter of the rank, resident; the update is one
  ``lerp`` per parameter on the device; for the teacher pass the live weights wait in a device copy
  (2 bytes per bf16 parameter, only during the teacher pass). No host traffic.
- ``host``: fp32 in one pinned host buffer (4 bytes per parameter of host RAM) plus pinned buffers
  the live weights wait in during the teacher pass (2 bytes per bf16 parameter); the GPU holds one
  parameter's fp32 copy at a time. The update brings each parameter's average to the device,
  ``lerp``s and sends it back (8 bytes per parameter over PCIe per optimizer step); the teacher pass
  sends the average in and the live weights out and back (8 bytes per parameter). The 70B recipe's
  choice: as ``device`` its 4.4 B parameters per GPU (TP8 x PP2) put 16.4 GiB more on the GPU and
  the peak at 85.5 of 80 GiB (``tools/plan.py --config examples/llama3_70b/recipe.yaml --nodes 4
  --teacher ema --ema-weights device``). At ~25 GB/s a rank moves 35 GB per update and per teacher
  pass, ~1.4 s each, 8 of each per step of the recipe (an estimate, not measured on a GPU).

Every copy is non-blocking and on the current stream, ordered with the kernels around it, so
neither place adds a host sync (``tools/device_audit.py --teacher ema --ema-weights host|device``); a
device temporary freed after a copy is reused only by work queued after that copy. Checkpoints store the fp32 average exactly (:meth:`state_dict`), one file per TP/PP
shard written by the first data-parallel replica (``train/checkpoint.py``).

    ema = EMAWeights(policy, decay=0.99, place="host")
    policy.optimizer_step(); policy.finish_param_sync(); ema.update()
    with ema.chunks() as chunks:      # the policy's chunks, holding the average for the block
        hidden = hidden_pass(chunks, mbs, head)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sdpg_mcore.models.builder import unwrap_model

PLACES = ("device", "host")
SHARD_DIR = "teacher_ema"
"""Checkpoint subdirectory of the average's shard files."""


def _buffer(numel: int, dtype: torch.dtype, device: torch.device, place: str) -> torch.Tensor:
    """``numel`` elements on ``device`` (place device), else in host memory, pinned for an accelerator."""
    if place == "device":
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.empty(numel, dtype=dtype, pin_memory=device.type != "cpu")


def _views(like: list[torch.Tensor], dtype_of, alloc) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One flat buffer per dtype (``dtype_of(t)``, allocated by ``alloc(numel, dtype)``) and a view of it
    shaped like each tensor of ``like``, in order: (views, buffers)."""
    sizes: dict[torch.dtype, int] = {}
    for t in like:
        sizes[dtype_of(t)] = sizes.get(dtype_of(t), 0) + t.numel()
    flats = {dtype: alloc(numel, dtype) for dtype, numel in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in like:
        dtype, start = dtype_of(t), offsets[dtype_of(t)]
        views.append(flats[dtype][start : start + t.numel()].view(t.shape))
        offsets[dtype] = start + t.numel()
    return views, list(flats.values())


class EMAWeights:
    """The rank's fp32 average of its policy parameters, its update and the swap for the teacher pass."""

    def __init__(self, policy, decay: float, place: str):
        if place not in PLACES:
            raise ValueError(f"trainer.ema_weights={place!r}: choose one of {', '.join(PLACES)}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"algorithm.teacher_ema_decay={decay} must be in (0, 1)")
        self.decay, self.place, self.updates = decay, place, 0
        self._policy = policy
        self._params = [p for chunk in policy.chunks for p in unwrap_model(chunk).parameters()]
        self._device = self._params[0].device
        self._ema, (self._flat,) = _views(self._params, lambda p: torch.float32, self._alloc)
        self._parked = _views(self._params, lambda p: p.dtype, self._alloc) if place == "host" else None
        with torch.no_grad():
            for ema, p in zip(self._ema, self._params):
                ema.copy_(p.detach())

    @property
    def nbytes(self) -> int:
        """Bytes the average holds (on the device or in host memory, by ``place``)."""
        return self._flat.numel() * self._flat.element_size()

    @property
    def host_nbytes(self) -> int:
        """Host bytes held (``host``: the average and the buffers the live weights wait in; the planner's
        ``teacher_weights_host``)."""
        if self._parked is None:
            return 0
        return self.nbytes + sum(b.numel() * b.element_size() for b in self._parked[1])

    def device_buffers(self) -> list[torch.Tensor]:
        """What it holds in device memory (``device``: the average; ``host``: nothing between steps),
        for ``train/colocate.py`` to offload while the engines generate."""
        return [self._flat] if self.place == "device" else []

    def _alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return _buffer(numel, dtype, self._device, self.place)

    @torch.no_grad()
    def update(self) -> None:
        """``ema += (1 - decay) * (weights - ema)`` for every parameter: call after each optimizer step
        that changed the weights, once they are complete (``Policy.finish_param_sync``)."""
        weight = 1.0 - self.decay
        for ema, p in zip(self._ema, self._params):
            live = p.detach().float()
            if self.place == "device":
                ema.lerp_(live, weight)
                continue
            on_device = ema.to(self._device, non_blocking=True)  # the same tensor on a CPU run
            on_device.lerp_(live, weight)
            ema.copy_(on_device, non_blocking=True)
        self.updates += 1

    @contextlib.contextmanager
    def chunks(self) -> Iterator[list]:
        """The policy's model chunks holding the average (rounded to the weights' dtype) for the block;
        the live weights are put back, bit for bit, when it ends."""
        buffers = self._parked or _views(self._params, lambda p: p.dtype, self._alloc)  # device: the block's
        parked = buffers[0]
        with torch.no_grad():
            for p, keep, ema in zip(self._params, parked, self._ema):
                keep.copy_(p.detach(), non_blocking=True)
                p.copy_(ema.to(self._device, non_blocking=True))
        try:
            yield self._policy.chunks
        finally:
            with torch.no_grad():
                for p, keep in zip(self._params, parked):
                    p.copy_(keep, non_blocking=True)

    def _settled(self) -> torch.Tensor:
        """The average with every queued copy into it complete (host reads of a pinned buffer)."""
        if self.place == "host" and self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        return self._flat

    def state_dict(self) -> dict:
        """The exact fp32 average and its counters, on the host (a checkpoint's shard file)."""
        return {
            "ema": self._settled().detach().to("cpu", copy=True),
            "decay": self.decay,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s average bit for bit (the decay is the run's, as configured)."""
        ema = state["ema"]
        if ema.dtype != torch.float32 or ema.numel() != self._flat.numel():
            raise ValueError(
                f"the stored EMA holds {ema.numel()} {ema.dtype} values; this rank's parameters need "
                f"{self._flat.numel()} float32"
            )
        with torch.no_grad():
            self._settled().copy_(ema)
        self.updates = int(state["updates"])


def shard_file() -> tuple[str, bool]:
    """This rank's shard file of the average (relative to a checkpoint) and whether this rank writes
    it: one file per (pipeline stage, tensor rank), written by the first data/context-parallel replica."""
    from megatron.core import parallel_state as ps

    name = f"{SHARD_DIR}/pp{ps.get_pipeline_model_parallel_rank():03d}_tp{ps.get_tensor_model_parallel_rank():03d}.pt"
    return name, ps.get_data_parallel_rank(with_context_parallel=True) == 0


def ema_teacher(policy, needs, place: str) -> EMAWeights | None:
    """The EMA teacher when the algorithm reads it (``needs``: its ``AlgorithmNeeds``, sdpg's
    ``teacher=ema``), starting from the policy's current weights; None otherwise. The trainer's rule,
    also the device audit's."""
    from sdpg_mcore.algo.config import TeacherWeights

    if needs.teacher_weights is not TeacherWeights.EMA_POLICY:
        return None
    return EMAWeights(policy, needs.ema_decay, place)
