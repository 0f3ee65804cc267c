"""Move weights between a live Megatron-Core model (this rank's TP/PP shard) and HF tensors.

- ``load_hf_into_model``: every rank reads only the rows/columns of its own shard from the HF
  safetensors (row-parallel weights: one full tensor at a time, then narrowed).
- ``load_mcore_into_model``: ``dist_checkpointing.load`` of a converted checkpoint, after checking
  that it was converted from the same model config.
- ``iter_hf_tensors``: this pipeline stage's parameters as full HF-named, HF-shaped tensors,
  all-gathered over the TP group one tensor at a time (padded vocabulary rows dropped) — what the
  rollout weight sync streams to the inference servers. At TP1 a yielded tensor may be a view of
  the live parameter: consumers copy or send it, never modify it.

Model chunks may be wrapped (DDP, Float16Module): anything with a ``.module`` is unwrapped. Layer
indices come from each ``TransformerLayer.layer_number``, so PP (and virtual PP) offsets need no
bookkeeping here.

    load_hf_into_model(model_chunks, "ckpt/qwen3")
    for name, tensor_full in iter_hf_tensors(model_chunks, hf_config): ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpoints_convert.arch_maps import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    ModelDims,
    ParamRule,
    Shard,
    rule_by_mcore_name,
)
from checkpoints_convert.convert import check_mcore_matches_config
from checkpoints_convert.dcp_io import DcpChunkReader
from checkpoints_convert.hf_io import CheckpointError, HfCheckpointReader
from checkpoints_convert.transforms import build_mcore_shard, gather_mcore_shards, split_mcore_full
from sdpg_mcore.models.builder import unwrap_model

_LAYER_PREFIX = "decoder.layers."


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return hf_config
    if isinstance(hf_config, (str, Path)):
        return json.loads((Path(hf_config) / "config.json").read_text())
    return hf_config.to_dict()


def _tp_coords(tp_group) -> tuple[int, int]:
    if tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def named_rules(
    model_chunks: list[torch.nn.Module], dims: ModelDims
) -> Iterator[tuple[str, torch.nn.Parameter, ParamRule, int | None]]:
    """(in-memory name, parameter, rule, global layer index or None) for every parameter of the chunks."""
    table = rule_by_mcore_name(dims)
    for chunk in model_chunks:
        module = unwrap_model(chunk)
        for name, param in module.named_parameters():
            if name.startswith(_LAYER_PREFIX):
                local, rest = name[len(_LAYER_PREFIX) :].split(".", 1)
                layer = module.decoder.layers[int(local)].layer_number - 1
                rule = table.get(rest)
            else:
                layer = None
                rule = {
                    EMBEDDING.mcore: EMBEDDING,
                    FINAL_NORM.mcore: FINAL_NORM,
                    # tied: the last stage's copy of the embedding (PP > 1)
                    OUTPUT_LAYER.mcore: EMBEDDING if dims.tie_word_embeddings else OUTPUT_LAYER,
                }.get(name)
            if rule is None:
                raise CheckpointError(
                    f"model parameter {name!r} has no HF mapping for model_type={dims.model_type!r}; the model was "
                    "built with options the maps in checkpoints_convert/arch_maps.py do not cover"
                )
            yield name, param, rule, layer


@torch.no_grad()
def load_hf_into_model(model_chunks: list[torch.nn.Module], hf_dir: str | Path, *, tp_group=None) -> None:
    """Copy HF safetensors weights into this rank's Megatron model chunks (each rank reads its shard).

    Raises ``CheckpointError`` when a tensor is missing or a shard shape does not match the model.
    """
    reader = HfCheckpointReader(hf_dir)
    dims = ModelDims.from_hf_config(reader.config)
    shapes = reader.shapes()
    tp_rank, tp_size = _tp_coords(tp_group)
    for name, param, rule, layer in named_rules(model_chunks, dims):
        padded = param.shape[0] * tp_size if rule.shard is Shard.VOCAB else 0
        shard = build_mcore_shard(rule, reader.read, shapes, dims, layer, tp_rank, tp_size, padded)
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{hf_dir}: HF tensors {rule.hf_names(layer)} give shape {tuple(shard.shape)} for {name}, the model "
                f"has {tuple(param.shape)}; the model was built from a different config.json than this checkpoint"
            )
        param.copy_(shard)


@torch.no_grad()
def load_mcore_into_model(model_chunks: list[torch.nn.Module], mcore_dir: str | Path, hf_config: Any) -> None:
    """Load a checkpoint written by ``convert_hf.py to-mcore`` into the model chunks (any TP/PP).

    Refuses (``CheckpointError``) a checkpoint converted from a different model config. Padded
    vocabulary rows beyond the real vocabulary are zeroed, so loading at a TP whose padding differs
    from the conversion's leaves no stale rows.
    """
    config = _config_dict(hf_config)
    check_mcore_matches_config(mcore_dir, config)
    from megatron.core import dist_checkpointing

    modules = [unwrap_model(c) for c in model_chunks]
    stored = DcpChunkReader(mcore_dir).metadata.state_dict_metadata
    sharded = {
        f"model{i}": _drop_absent_extra_state(m.sharded_state_dict(), stored) for i, m in enumerate(modules)
    }
    loaded = dist_checkpointing.load(sharded, str(mcore_dir))
    for i, module in enumerate(modules):
        result = module.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{mcore_dir} did not provide {missing[:4]} for model chunk {i}")
    dims = ModelDims.from_hf_config(config)
    tp_rank, _ = _tp_coords(None)
    for _, param, rule, _ in named_rules(model_chunks, dims):
        if rule.shard is Shard.VOCAB:
            first_real = dims.vocab_size - tp_rank * param.shape[0]
            param[max(first_real, 0) :].zero_()


def _drop_absent_extra_state(sharded: dict, stored: dict) -> dict:
    """Drop ``_extra_state`` objects the checkpoint does not hold.

    Why: Transformer-Engine modules (e.g. ``core_attention``) carry FP8 metadata objects that a
    converted checkpoint cannot have; TE initialises them itself when they are not loaded.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {
        k: v
        for k, v in sharded.items()
        if not (isinstance(v, ShardedObject) and k.endswith("_extra_state") and v.unique_key not in stored)
    }


@torch.no_grad()
def iter_hf_tensors(
    model_chunks: list[torch.nn.Module], hf_config: Any, *, tp_group=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full HF tensor) for this pipeline stage's parameters, one at a time.

    Collective over the TP group: every TP rank of the stage must iterate it to the end in step
    (each tensor is all-gathered once). The tied output layer of the last stage is skipped (HF has
    no ``lm_head`` for tied models; the first stage yields ``model.embed_tokens.weight``).
    """
    dims = ModelDims.from_hf_config(_config_dict(hf_config))
    _, tp_size = _tp_coords(tp_group)
    if tp_group is None and tp_size > 1:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, param, rule, layer in named_rules(model_chunks, dims):
        if name == OUTPUT_LAYER.mcore and dims.tie_word_embeddings:
            continue
        local = param.detach()
        if tp_size > 1 and rule.shard is not Shard.REPLICATED:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
            full = gather_mcore_shards(rule, shards)
        else:
            full = local
        yield from split_mcore_full(rule, full, dims, layer)
