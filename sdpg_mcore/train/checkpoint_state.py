"""What a trainer checkpoint stores besides the files: sharded model/optimizer state, RNG states,
the layout and model signature a resume must match, and two Megatron optimizer quirks handled at load.

The quirks (Megatron's distributed optimizer on the torch-Adam path, i.e. without Transformer Engine
or Apex, as on CPU): a never-stepped optimizer has no state to load into
(:func:`allocate_distributed_optimizer_state`), and the loaded Adam step count is wrong
(:func:`restore_adam_steps`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sdpg_mcore.models.builder import unwrap_model

#: How the distributed optimizer lays its state out: one tensor per DP-local buffer, no gathers.
#: Resharding is DP-only, which is all a same-layout resume needs.
DIST_OPTIM_SHARDING = "dp_reshardable"


def parallel_layout(model_chunks: Sequence[torch.nn.Module], optimizer) -> dict[str, Any]:
    """The parallel layout and optimizer kind a checkpoint's shards (and RNG files) belong to."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "num_model_chunks": len(model_chunks),
        "distributed_optimizer": any(isinstance(o, DistributedOptimizer) for o in inner),
    }


def model_signature(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The model-config values that fix the shapes of every stored tensor."""
    gpt = unwrap_model(model_chunks[0])
    c = gpt.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups,
        "kv_channels": c.kv_channels,
        "padded_vocab_size": getattr(gpt, "vocab_size", None),
        "tied_embeddings": bool(getattr(gpt, "share_embeddings_and_output_weights", False)),
        "qk_layernorm": bool(c.qk_layernorm),
        "add_qkv_bias": bool(c.add_qkv_bias),
        "params_dtype": str(c.params_dtype),
    }


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "megatron_tracker": tracker,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def _torch_adam_distributed(optimizer) -> list:
    """The ``DistributedOptimizer``s inside ``optimizer`` when Megatron runs torch's Adam (no
    Transformer Engine / Apex, e.g. on CPU): the path with the two load quirks handled below."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in inner if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its Adam state (a no-op step: zero grads, lr 0).

    Why: ``DistributedOptimizer.state_dict()`` (called to build the sharded state dict for loading)
    reads the ``step`` of every torch-Adam state and asserts there is exactly one; a fresh optimizer
    has none. The dummy values are overwritten by the load.
    """
    for opt in _torch_adam_distributed(optimizer):
        if len(opt.optimizer.state) > 0:
            continue
        inner = opt.optimizer
        saved_lr = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        for group, lr in zip(inner.param_groups, saved_lr):
            group["lr"] = lr
            for param in group["params"]:
                param.grad = None


def restore_adam_steps(optimizer) -> None:
    """Set every torch-Adam state's ``step`` to its own tensor holding the checkpoint's step count.

    Why: ``DistributedOptimizer`` saves the step count in its param groups, but its load puts one
    shared ``step`` tensor into every state and then copies the per-bucket tensors over it, which
    (measured) leaves the count of the placeholder state made by
    ``allocate_distributed_optimizer_state``. torch's Adam increments steps in place, so
    each state needs its own tensor with the saved count, or the bias correction is wrong.
    """
    for opt in _torch_adam_distributed(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def sharded_state_dict(model_chunks: Sequence[torch.nn.Module], optimizer, *, is_loading: bool) -> dict:
    """Model chunks as ``model{i}`` and the optimizer state over them, as ``dist_checkpointing`` wants."""
    metadata = {"distrib_optim_sharding_type": DIST_OPTIM_SHARDING, "chained_optim_avoid_prefix": True}
    state: dict[str, Any] = {
        f"model{i}": unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(model_chunks)
    }
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state
