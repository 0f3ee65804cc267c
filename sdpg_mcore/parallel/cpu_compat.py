"""The CPU compatibility layer: the only place that patches Megatron-Core's CUDA-only calls.

Megatron-Core assumes a CUDA device in a handful of places that are not about computation at all
(where to allocate a buffer, which RNG state to save, whether to wait for a stream). On a CPU-only
torch build those calls raise, so nothing above them can be tested. ``apply_cpu_compat()`` replaces
exactly those calls, each with the reason next to it, and does nothing when CUDA is available.

Measured on megatron-core 0.16.1 / torch 2.13 (CPU) by building ``GPTModel`` at TP2/PP2 on gloo,
running ``get_forward_backward_func()`` forward/backward, wrapping in Megatron DDP, stepping
``get_megatron_optimizer`` (plain and distributed optimizer) and ``dist_checkpointing.save/load``.

    from sdpg_mcore.parallel.cpu_compat import apply_cpu_compat
    apply_cpu_compat()   # once per process, before building models; idempotent; no-op with CUDA

The patches (each function below says why):
- ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (buffer allocation everywhere);
- ``torch.cuda.synchronize`` is a no-op (``dist_checkpointing.save``, DDP buffers);
- the RNG tracker (``megatron.core.tensor_parallel.random``) keeps CPU generator states:
  ``CudaRNGStatesTracker.add/fork`` and ``_get/_set_cuda_rng_state`` (activation recompute);
- a process-wide ``CpuDeviceMode`` (a ``TorchFunctionMode``): ``device="cuda"`` allocations become
  CPU ones, ``pin_memory`` is dropped and ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names,
  for the optimizers' (incl. distributed optimizer) type checks, grad scalers, clip-grad, the
  pipeline schedules and the context-parallel RoPE slicing.

Callers should still pass an explicit ``attention_mask`` to ``GPTModel`` (``sdpg_mcore.models``
does): the default one is built with ``device="cuda"`` and only works here through the mode.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False


def cuda_available() -> bool:
    """Whether real CUDA devices exist (then no patch is applied)."""
    return torch.cuda.is_available()


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare CUDA index


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
}


class CpuDeviceMode(TorchFunctionMode):
    """Run code written for CUDA on CPU tensors.

    Why: Megatron's optimizers allocate scalars with ``device='cuda'`` (found-inf flag, loss scale,
    grad-norm buffers) and accept only parameters whose ``Tensor.type()`` is
    ``'torch.cuda.FloatTensor'`` (or Half/BFloat16). Inside this mode ``device='cuda'`` means CPU,
    ``.cuda()`` is the identity, and ``Tensor.type()`` reports the CUDA type name of a CPU tensor.
    Pinned host memory needs an accelerator, so ``pin_memory=True`` / ``.pin_memory()`` are dropped
    (the RoPE slicing for context parallelism stages its indices through pinned memory).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) >= 2 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` for CPU: the tracked state is a CPU generator state.

    Why: the original reads and seeds ``torch.cuda`` RNG state, which does not exist here. A fresh
    generator seeded with ``seed`` gives the same per-name state without touching the default one.
    """
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    generator = torch.Generator()
    generator.manual_seed(seed)
    self.states_[name] = generator.get_state()


@contextlib.contextmanager
def _cpu_rng_tracker_fork(self, name: str = "model-parallel-rng"):
    """``CudaRNGStatesTracker.fork`` for CPU: swap the tracked state into the CPU default generator.

    Why: on CPU every random op (init of TP-sharded weights, dropout) draws from the CPU default
    generator, so that is the generator a fork must switch. The original also warns when the CPU
    state changes inside a fork, which here is every fork that draws numbers, so that check is
    dropped (the state handling is otherwise the original's).
    """
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current rng state {self._current_state_name} is not the forked state {name}")
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Why: activation recompute (``CheckpointFunction``) saves "the CUDA RNG state" to replay
    dropout; on CPU that is the CPU generator."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    """Why: the counterpart of ``_get_cpu_rng_state`` (restoring state for recompute and forks)."""
    torch.set_rng_state(new_state)


def _cpu_current_device() -> torch.device:
    """Why: Megatron allocates buffers with ``device=torch.cuda.current_device()`` everywhere."""
    return torch.device("cpu")


def _no_op(*args, **kwargs) -> None:
    """Why: ``torch.cuda.synchronize`` only orders device work; there is none here, and the CPU
    build raises instead of returning (``dist_checkpointing.save`` and DDP buffers call it)."""


def apply_cpu_compat() -> bool:
    """Patch Megatron-Core's CUDA-only calls for a CPU-only process; return whether patches are active.

    Idempotent. A no-op (returns False) when CUDA is available, so GPU runs use Megatron unchanged.
    """
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_op  # dist_checkpointing.save and DDP buffer (de)allocation call it
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    mcore_random.CudaRNGStatesTracker.add = _cpu_rng_tracker_add
    mcore_random.CudaRNGStatesTracker.fork = _cpu_rng_tracker_fork
    # Why process-wide: device='cuda' allocations sit in the optimizers, the pipeline schedules
    # (token counters), grad scalers and clip-grad; scoping the mode to each would patch them all.
    CpuDeviceMode().__enter__()
    _APPLIED = True
    logger.debug("sdpg_mcore CPU compatibility layer applied")
    return True
