"""The model built the trainer's way with a GPU "available": does every tensor land on it?

The step audit moves a CPU-built model to the fake GPU itself, so a builder that leaves modules on
the host (torch norms of the local spec) passes it; this check builds the stage as the trainer does
(``model_setup.build_model``: ``build_gpt_model`` + the HF weights) with ``torch.cuda`` claiming a
device, where Megatron's layers allocate on ``torch.cuda.current_device()``.
"""

from __future__ import annotations

import contextlib

import torch

from sdpg_mcore.audit.fake_cuda import CUDA, FakeCuda, is_fake_cuda
from sdpg_mcore.audit.fake_step import patched
from sdpg_mcore.models.builder import unwrap_model


def _module_cuda(audit: FakeCuda):
    """``Module.cuda`` for fake tensors: each host parameter and buffer becomes a fake ``cuda:0`` one.

    Why: ``Module._apply`` swaps tensor subclasses with ``swap_tensors``, which a ``FakeTensor`` refuses.
    """

    def cuda(module, device=None):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.device.type != "cuda":
                    sub._parameters[name] = torch.nn.Parameter(audit.to_fake_cuda(param), param.requires_grad)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device.type != "cuda":
                    sub._buffers[name] = audit.to_fake_cuda(buf)
        return module

    return cuda


def construction_check(model_dir, layout) -> dict:
    """Build this rank's stage with a GPU "available": every parameter, buffer and tensor attribute
    must land on that one device. ``{"tensors": N, "off_device": ["name on cpu", ...], "violations": [...]}``."""
    from sdpg_mcore.train.model_setup import build_model

    audit = FakeCuda()
    patches = [(torch.cuda, "is_available", lambda: True), (torch.cuda, "current_device", lambda: CUDA)]
    patches += [(torch.nn.Module, "cuda", _module_cuda(audit))]
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(patched(owner, name, value))
        stack.enter_context(audit)
        stack.enter_context(torch.no_grad())
        model = build_model(model_dir, layout, dtype=torch.bfloat16)
    tensors = {}
    for prefix, module in unwrap_model(model).named_modules():
        named = [*module._parameters.items(), *module._buffers.items()]
        named += [
            (k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("_")
        ]
        tensors.update({f"{prefix}.{k}".lstrip("."): v for k, v in named if v is not None})
    off = sorted(f"{name} on {t.device}" for name, t in tensors.items() if not is_fake_cuda(t))
    return {
        "tensors": len(tensors),
        "off_device": off,
        "violations": [f"built model: {len(off)} of {len(tensors)} tensors not on {CUDA}: {off[:4]}"]
        if off
        else [],
    }
