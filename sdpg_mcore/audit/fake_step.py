"""What the device audit swaps in so that one training step runs with its model on the fake GPU.

Autograd through fake CUDA tensors aborts this CPU torch build, so the passes run under
``no_grad``: Megatron's ``backward_step`` only checks devices (:func:`backward_step_check`), and the
fused head's backward formula runs right after each forward (:func:`head_with_backward`). The
optimizer step (Megatron's own code, which needs real values) is a no-op (:func:`policy_on_fake_gpu`);
collectives check their tensors' device and do nothing, as on one rank (:func:`checked_collective`).
Megatron's forward code runs as is.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import replace
from types import MethodType, SimpleNamespace

import torch

from sdpg_mcore.audit.fake_cuda import FakeCuda, is_fake_cuda
from sdpg_mcore.models.builder import unwrap_model

COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
)
"""``torch.distributed`` collectives the step may call; each must get device tensors (NCCL)."""


@contextlib.contextmanager
def patched(owner, name: str, value):
    """``owner.name = value`` for the duration of the block."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def fake_model(audit: FakeCuda, chunks) -> None:
    """Every parameter and buffer of the model chunks becomes a fake ``cuda:0`` tensor (no grad)."""
    for chunk in chunks:
        for module in unwrap_model(chunk).modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        audit.to_fake_cuda(param), requires_grad=False
                    )
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = audit.to_fake_cuda(buf)
            for name, value in list(vars(module).items()):  # plain tensor attributes (rotary inv_freq)
                if isinstance(value, torch.Tensor) and not name.startswith("_"):
                    setattr(module, name, audit.to_fake_cuda(value))


def checked_collective(audit: FakeCuda, name: str):
    """``dist.<name>`` that reports host tensors among its arguments and does nothing else."""

    def collective(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
        host = [tuple(t.shape) for t in tensors if not is_fake_cuda(t)]
        if host:
            audit.violation(f"dist.{name} on host tensors {host}: NCCL needs device tensors")

    return collective


def head_with_backward():
    """``fused_kl_head`` that also runs its backward formula (autograd is off on fake CUDA)."""
    head_module = importlib.import_module("sdpg_mcore.ops.fused_kl_head")
    fused_head = head_module._FusedKLHead
    real = head_module.fused_kl_head

    def apply(student, teacher, weight, targets, plan, tp_group, path, teacher_weight=None):
        ctx = SimpleNamespace(set_materialize_grads=lambda _: None, needs_input_grad=(True, False, True))
        ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
        outs = fused_head.forward(
            ctx, student, teacher, weight, targets, plan, tp_group, path, teacher_weight
        )
        fused_head.backward(ctx, *(torch.ones_like(o) for o in outs))
        return outs

    def head(*args, **kwargs):
        with patched(fused_head, "apply", staticmethod(apply)):
            return real(*args, **kwargs)

    return head


def kernel_launch_checks(audit: FakeCuda) -> list[tuple[object, str, object]]:
    """Patches for the fused head's Triton launches (when Triton imports, ``auto`` picks them on the
    fake GPU): every tensor argument must be on the GPU; the kernels themselves do not run (fake
    tensors hold no data)."""
    from sdpg_mcore.ops.triton_support import triton

    if triton is None:
        return []
    from sdpg_mcore.ops import kl_head_kernels

    def checked(name):
        def launch(*args):
            audit.triton_launches = getattr(audit, "triton_launches", 0) + 1
            host = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor) and not is_fake_cuda(t)]
            if host:
                audit.violation(f"Triton {name} on host tensors {host}")

        return launch

    return [(kl_head_kernels, name, checked(name)) for name in ("launch_block_state", "launch_block_grad")]


def backward_step_check(audit: FakeCuda):
    """Megatron's ``backward_step`` reduced to its device check: the loss it would differentiate is on the GPU."""

    def backward_step(input_tensor, output_tensor, output_tensor_grad, model_type, config):
        for t in [output_tensor] if isinstance(output_tensor, torch.Tensor) else output_tensor:
            if not is_fake_cuda(t):
                audit.violation(f"backward of a host tensor {tuple(t.shape)}")
        return None

    return backward_step


def policy_on_fake_gpu(policy, audit: FakeCuda):
    """The policy with its weights on the fake GPU; ``zero_grad`` / ``optimizer_step`` as no-ops."""
    gpt = unwrap_model(policy.chunks[0])
    fake_model(audit, [gpt])
    gpt.config.finalize_model_grads_func = None  # DDP's grad reduction: no gradients here
    fake = replace(policy, chunks=[gpt])
    fake.zero_grad = MethodType(lambda self: None, fake)
    fake.optimizer_step = MethodType(lambda self: (0.0, 1e-6), fake)
    return fake


def step_patches(audit: FakeCuda) -> list[tuple[object, str, object]]:
    """``(owner, name, value)`` of every swap above, for :func:`patched`."""
    from megatron.core.pipeline_parallel import schedules

    from sdpg_mcore import ops
    from sdpg_mcore.audit.colocated import NoStream
    from sdpg_mcore.audit.fake_cuda import CUDA

    patches = [(schedules, "backward_step", backward_step_check(audit))]
    patches += [(torch.distributed, name, checked_collective(audit, name)) for name in COLLECTIVES]
    patches += [(ops, "fused_kl_head", head_with_backward())] + kernel_launch_checks(audit)
    patches += [(torch.cuda, "current_device", lambda: CUDA)]  # Megatron allocates there: the fake GPU
    # The colocated offload's stream sync and cache release: runtime calls that move no data.
    patches += [
        (torch.cuda, "current_stream", lambda *_: NoStream()),
        (torch.cuda, "empty_cache", lambda: None),
    ]
    return patches
