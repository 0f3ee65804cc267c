"""Colocated rollout engines and the trainer taking turns with the GPUs' memory (``rollout.colocated``).

The SGLang engines run on the trainer's GPUs. Each side holds its device memory only during its
own phase: the engines (weights, KV cache, CUDA graphs; SGLang's ``--enable-memory-saver``) while
they generate, the trainer (weights, fp32 gradient buffers, optimizer states) while it trains.
:class:`Colocation` moves between the two states, on every rank at the same phase boundary:

    training   --sync(push)-->  generating:
        trainer offloads gradients + optimizer states -> engines resume their weights ->
        push the new weights -> trainer offloads its weights -> engines resume KV cache + graphs
    generating --to_training()-->  training:
        engines release everything -> trainer reloads what it offloaded

The release runs before the other side resumes, with a barrier between, so the two never hold
their memory at once (``tools/plan.py --rollout colocated`` counts each phase's peak). The engines
drop their weights' contents on release (no CPU backup), so every turn to ``generating`` carries a
weight push; a checkpoint, which needs the trainer's state, turns back to ``training`` and the next
rollout pushes again. This is how verl's Megatron workers and slime's colocated mode take turns
(offload optimizer and gradients, resume the engine's weights, sync, offload the weights, resume
the KV cache); the trainer side here frees storages instead of hooking the CUDA allocator.

:class:`TrainerOffload` frees whole storages (``untyped_storage().resize_(0)``), so every view —
each parameter of Megatron's contiguous buffers, ``main_grad``, the distributed optimizer's
shards — stays valid and points at the same bytes after :meth:`TrainerOffload.reload`; contents
that matter (weights, fp32 main weights, Adam moments) wait in one pinned host buffer per storage
and come back bit for bit; gradient buffers are only freed and come back zeroed (every update
zeroes them before its backward). Nothing may read the trainer's tensors while they are offloaded:
their storages are empty (a read is an invalid memory access, as with verl's offload).

    colocation = Colocation(TrainerOffload(policy.chunks, policy.optimizer), session.memory)
    colocation.sync(lambda: weights(step))     # all ranks, the weight-sync phase
    colocation.to_training()                   # all ranks, after the rollout
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from sdpg_mcore.models.builder import unwrap_model

logger = logging.getLogger(__name__)

WEIGHTS = "weights"
"""SGLang's memory tag of the engine's weights (the others: ``kv_cache``, ``cuda_graph``)."""
GROUPS = ("params", "grads", "optimizer")
"""What :class:`TrainerOffload` moves; :meth:`Colocation.sync` frees the weights last, after the push."""


class _Storages:
    """Distinct storages of some tensors on one device, freed and restored together. Each storage
    comes with one tensor of it, through which its bytes are read and written (so the copies are
    ordinary tensor copies: the fake-GPU audit checks them)."""

    def __init__(self, owners: list[torch.Tensor], keep_contents: bool):
        self.owners = owners
        self.keep_contents = keep_contents
        self.sizes = [t.untyped_storage().nbytes() for t in owners]
        self.host: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def offload(self, pin: bool) -> None:
        """Copy the contents (if kept) to pinned host buffers, then free every storage."""
        if self.keep_contents:
            self.host = []
            for owner, size in zip(self.owners, self.sizes):
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
                buffer.copy_(_bytes_of(owner, size), non_blocking=pin)
                self.host.append(buffer)
        if pin:  # the copies must finish before the memory is handed to another process
            torch.cuda.current_stream().synchronize()
        for owner in self.owners:
            owner.untyped_storage().resize_(0)

    def reload(self, pin: bool) -> None:
        """Allocate every storage again at its old size; copy the contents back (or zero them)."""
        for index, (owner, size) in enumerate(zip(self.owners, self.sizes)):
            owner.untyped_storage().resize_(size)
            data = _bytes_of(owner, size)
            if self.keep_contents:
                data.copy_(self.host[index], non_blocking=pin)
            else:
                data.zero_()
        self.host = []


def _bytes_of(owner: torch.Tensor, size: int) -> torch.Tensor:
    """A ``uint8`` tensor over all ``size`` bytes of ``owner``'s storage, on its device."""
    return owner.new_empty(0, dtype=torch.uint8).set_(owner.untyped_storage(), 0, (size,))


def _distinct_storages(tensors: Iterable[torch.Tensor], device: torch.device, exclude: set[int]):
    """One tensor per distinct storage of ``tensors`` on ``device``'s type, without the storages in
    ``exclude``; ``exclude`` grows by the ones returned. A storage is known by its C++ object
    (``_cdata``: shared by every view, kept across a resize; a fake tensor's has no data pointer)."""
    out = []
    for t in tensors:
        if t is None or t.device.type != device.type:
            continue
        storage = t.untyped_storage()
        key = storage._cdata
        if storage.nbytes() == 0 or key in exclude:
            continue
        exclude.add(key)
        out.append(t)
    return out


def _ddp_buffers(chunk) -> list:
    """Megatron DDP's parameter-and-gradient buffers of a chunk (none for a bare model)."""
    buffers = getattr(chunk, "buffers", None)
    if not isinstance(buffers, list):  # a bare module: ``buffers`` is nn.Module's method
        return []
    return [*buffers, *getattr(chunk, "expert_parallel_buffers", [])]


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return [o.optimizer for o in (chained if chained is not None else [optimizer])]


def trainer_tensors(
    chunks: list, optimizer, extra_models: list | None = None, extra_states: list | None = None
) -> dict[str, list[torch.Tensor]]:
    """The trainer's device state by group: ``params`` (every model weight, also of ``extra_models``,
    e.g. a resident reference model), ``grads`` (Megatron DDP's gradient buffers, ``main_grad`` and
    the main weights' ``.grad``), ``optimizer`` (the main weights, every optimizer state tensor and
    ``extra_states``, e.g. an EMA teacher's average: needed only by the next step)."""
    models = [unwrap_model(c) for c in chunks] + list(extra_models or [])
    params = [p for model in models for p in model.parameters()]
    grads = [b.grad_data for c in chunks for b in _ddp_buffers(c)]
    grads += [getattr(p, "main_grad", None) for p in params]
    states = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for main in group["params"]:
                grads.append(main.grad)
                states.append(main)
                states += [v for v in inner.state.get(main, {}).values() if isinstance(v, torch.Tensor)]
    return {"params": params, "grads": grads, "optimizer": states + list(extra_states or [])}


class TrainerOffload:
    """The trainer's device memory handed over and taken back (module docstring), on one rank.

    ``offload(groups)`` frees the named groups' storages (weights and optimizer states copied to
    pinned host memory first); ``reload()`` brings back everything offloaded. The tensors are
    collected at each offload: optimizer states appear at the first step.
    """

    def __init__(
        self,
        chunks: list,
        optimizer,
        device: torch.device,
        extra_models: list | None = None,
        extra_states: list | None = None,
    ):
        self.chunks, self.optimizer = chunks, optimizer
        self.extra_models, self.extra_states = extra_models, extra_states
        self.device = device
        self.pin = device.type == "cuda"
        self.offloaded: dict[str, _Storages] = {}

    @torch.no_grad()
    def offload(self, groups: Iterable[str]) -> int:
        """Free ``groups`` (of :data:`GROUPS`) not yet offloaded; returns the bytes freed."""
        owned = self._owned()
        freed = 0
        for group in groups:
            if group in self.offloaded:
                continue
            part = _Storages(owned[group], keep_contents=group != "grads")
            part.offload(self.pin)
            self.offloaded[group] = part
            freed += part.nbytes
        if self.pin:
            torch.cuda.empty_cache()  # give the freed blocks back to the driver, for the engines
        return freed

    def _owned(self) -> dict[str, list[torch.Tensor]]:
        """Each group's distinct storages on the device, each storage in the first group that names it:
        fp32 main weights of the optimizer that are the model's own (fp32 models, fp32 norm weights
        under the distributed optimizer) stay with the weights; fp32 gradients viewed by the main
        weights stay with the gradient buffers."""
        tensors = trainer_tensors(self.chunks, self.optimizer, self.extra_models, self.extra_states)
        claimed: set[int] = set()
        return {g: _distinct_storages(tensors[g], self.device, claimed) for g in GROUPS}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each group holds on the device now (0 for an offloaded group)."""
        return {g: sum(t.untyped_storage().nbytes() for t in owners) for g, owners in self._owned().items()}

    @torch.no_grad()
    def reload(self) -> int:
        """Allocate and fill everything offloaded (weights first); returns the bytes restored."""
        restored = 0
        for group in GROUPS:
            part = self.offloaded.pop(group, None)
            if part is not None:
                part.reload(self.pin)
                restored += part.nbytes
        return restored


class Colocation:
    """Which side holds the GPUs' memory: ``training`` or ``generating`` (module docstring).

    Collective: every rank calls the same transitions in the same order. ``engines`` is rank 0's
    :class:`~sdpg_mcore.rollout.servers.MemoryOccupation` (None elsewhere); ``offload`` None means
    the servers have GPUs of their own, and the transitions only run the push.
    """

    def __init__(self, offload: TrainerOffload | None, engines=None, state: str = "training"):
        self.offload = offload
        self.engines = engines
        self.state = state
        self.events: deque[str] = deque(maxlen=64)
        """The latest turns, in order (``trainer_offload:grads,optimizer``, ``engines_resume:weights``, ...)."""

    @property
    def enabled(self) -> bool:
        return self.offload is not None

    def _record(self, event: str) -> None:
        self.events.append(event)
        logger.debug("colocation: %s", event)

    def _offload(self, groups: list[str]) -> None:
        freed = self.offload.offload(groups)
        self._record(f"trainer_offload:{','.join(groups)}")
        logger.debug("colocation: trainer freed %.2f GiB (%s)", freed / 2**30, ", ".join(groups))

    def _engines(self, action: str, tags: list[str] | None = None) -> None:
        _barrier()  # every rank's trainer memory is free (or its own phase is over) first
        if self.engines is not None:
            getattr(self.engines, action)(tags)
        self._record(f"engines_{action}:{','.join(tags) if tags else 'all'}")
        _barrier()

    def start_engines(self, start: Callable[[], object]):
        """Start the engines with the trainer offloaded (SGLang sizes its KV cache from the memory
        free at start-up); they then hold the initial weights: state ``generating``."""
        if not self.enabled:
            return start()
        self._offload(list(GROUPS))
        _barrier()
        session = start()
        self._record("engines_started")
        _barrier()
        self.state = "generating"
        return session

    def sync(self, push: Callable[[], None]) -> None:
        """The weight-sync phase (after the step, every rank): ``push`` the new weights; colocated,
        the memory goes to the engines on the way (``training`` -> ``generating``)."""
        if not self.enabled:
            push()
            return
        self.to_training()  # a no-op after a rollout; at a resumed start the engines hand back first
        self._to_generating(push)

    def before_generation(self, push: Callable[[], None]) -> None:
        """Before a rollout: colocated engines released for a checkpoint get the memory back and the
        current weights (``push``); otherwise nothing to do."""
        if self.enabled and self.state == "training":
            self._to_generating(push)

    def _to_generating(self, push: Callable[[], None]) -> None:
        self._offload(["grads", "optimizer"])
        self._engines("resume", [WEIGHTS])
        push()
        self._record("pushed")
        self._offload(["params"])
        self._engines("resume")
        self.state = "generating"

    def to_training(self) -> None:
        """Take the memory back from the engines (they release everything first); every rank."""
        if not self.enabled or self.state == "training":
            return
        self._engines("release")
        self.offload.reload()
        self._record("trainer_reload")
        self.state = "training"


def release_before_start(engines) -> None:
    """Engines that started before the trainer (external servers, started by the Slurm script) release
    their memory before the trainer allocates its own; collective (rank 0 holds ``engines``). The
    trainer then starts in ``training``, and the first rollout pushes the weights."""
    _barrier()
    if engines is not None:
        engines.release()
    _barrier()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
