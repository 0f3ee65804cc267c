"""Offline conversion HF safetensors <-> Megatron-Core distributed checkpoint, streaming, one process.

The Megatron checkpoint holds full (TP-unsharded) tensors stacked over layers, exactly the global
layout of ``GPTModel.sharded_state_dict()``, so ``dist_checkpointing.load`` reads it at any TP/PP;
``tp`` only fixes the vocabulary padding (a multiple of 128*tp; other TPs load it through Megatron's
``allow_shape_mismatch`` on the embedding and output layer). Next to the DCP files it keeps
``sdpg_convert.json`` (arch, config hash, source) and ``hf_assets/`` (config.json, tokenizer files)
so the export can rebuild an HF directory and a loader can refuse a different model config.

    hf_to_mcore("ckpt/qwen3", "ckpt/qwen3_mcore", tp=2, pp=2)
    mcore_to_hf("ckpt/qwen3_mcore", "ckpt/qwen3_hf")
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoints_convert.arch_maps import (
    Fuse,
    ModelDims,
    ParamRule,
    config_diff,
    config_hash,
    padded_vocab_size,
    rules_for,
    validate_parallel,
)
from checkpoints_convert.dcp_io import DcpChunkReader, LazyChunk, write_dcp_checkpoint
from checkpoints_convert.hf_io import (
    CheckpointError,
    HfCheckpointReader,
    SafetensorsShardWriter,
    copy_hf_assets,
)
from checkpoints_convert.transforms import build_mcore_shard, mcore_full_shape, split_mcore_full

logger = logging.getLogger(__name__)

METADATA_FILE = "sdpg_convert.json"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1
_EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class ConvertStats:
    """What a conversion moved: for throughput and memory reports."""

    num_tensors: int
    total_bytes: int
    largest_tensor_bytes: int


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> ConvertStats:
    """Convert an HF model directory into a Megatron distributed checkpoint (vocab padded for ``tp``).

    ``tp``/``pp`` are validated against the model (query groups, layers) so a checkpoint is never
    written for a layout that cannot be built; the stored tensors themselves are TP/PP independent.
    """
    reader = HfCheckpointReader(hf_dir)
    dims = ModelDims.from_hf_config(reader.config)
    validate_parallel(dims, tp, pp)
    padded = padded_vocab_size(dims.vocab_size, tp)
    shapes = reader.shapes()
    sizes: list[int] = []

    def make(rule: ParamRule, layer: int | None):
        def _make() -> torch.Tensor:
            full = build_mcore_shard(rule, reader.read, shapes, dims, layer, 0, 1, padded)
            return full.unsqueeze(0) if rule.per_layer else full

        return _make

    chunks: list[LazyChunk] = []
    for rule in rules_for(dims):
        for layer in range(dims.num_layers) if rule.per_layer else [None]:
            names = rule.hf_names(layer)
            for name in names:
                reader._entry(name)  # fail before writing anything when a tensor is missing
            dtype = reader._entry(names[0]).dtype
            full = mcore_full_shape(rule, shapes, layer, padded)
            if rule.per_layer:
                global_shape, offsets, chunk = (dims.num_layers, *full), (layer, *[0] * len(full)), (1, *full)
            else:
                global_shape, offsets, chunk = full, tuple([0] * len(full)), full
            chunks.append(LazyChunk(rule.mcore_key(), global_shape, offsets, chunk, dtype, make(rule, layer)))
    objects = [
        f"decoder.layers.{m}._extra_state/shard_{i}_{dims.num_layers}"
        for m in _EXTRA_STATE_MODULES
        for i in range(dims.num_layers)
    ]
    if not dims.tie_word_embeddings:
        objects.append("output_layer._extra_state/shard_0_1")
    out = Path(out_dir)
    write_dcp_checkpoint(out, chunks, objects, on_resolve=sizes.append)
    copy_hf_assets(hf_dir, out / ASSETS_DIR)
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": dims.model_type,
        "config_hash": config_hash(reader.config),
        "source": str(Path(hf_dir).resolve()),
        "tp": tp,
        "pp": pp,
        "vocab_size": dims.vocab_size,
        "padded_vocab_size": padded,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %d tensors (%.3f GB) to %s", len(sizes), sum(sizes) / 1e9, out)
    return ConvertStats(len(sizes), sum(sizes), max(sizes, default=0))


def read_convert_metadata(mcore_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``sdpg_convert.json``, the HF ``config.json`` it was converted from) of a converted checkpoint."""
    root = Path(mcore_dir)
    meta_path, config_path = root / METADATA_FILE, root / ASSETS_DIR / "config.json"
    if not meta_path.is_file() or not config_path.is_file():
        raise CheckpointError(
            f"{root} has no {METADATA_FILE} / {ASSETS_DIR}/config.json: it was not written by "
            "`tools/convert_hf.py to-mcore`; convert the HF model with that command first"
        )
    return json.loads(meta_path.read_text()), json.loads(config_path.read_text())


def check_mcore_matches_config(mcore_dir: str | Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """Raise ``CheckpointError`` naming the differing fields when ``mcore_dir`` was converted from a
    model whose config differs from ``hf_config``; return the checkpoint's metadata otherwise."""
    meta, stored = read_convert_metadata(mcore_dir)
    if meta["config_hash"] == config_hash(hf_config):
        return meta
    diffs = config_diff(stored, hf_config)
    raise CheckpointError(
        f"Megatron checkpoint {mcore_dir} was converted from a different model config "
        f"({'; '.join(diffs[:6]) or 'config hash differs'}). Load it with the model config it was converted "
        f"from ({meta['source']}), or convert this model again with `tools/convert_hf.py to-mcore`."
    )


def _hf_plan(rule: ParamRule, full: tuple[int, ...], dims: ModelDims, layer: int | None, dtype: torch.dtype):
    names = rule.hf_names(layer)
    rest = full[1:]
    if rule.fuse is Fuse.COPY:
        shapes = [full]
    elif rule.fuse is Fuse.VOCAB:
        shapes = [(dims.vocab_size, *rest)]
    elif rule.fuse is Fuse.GATE_UP:
        shapes = [(full[0] // 2, *rest)] * 2
    else:
        kv = dims.num_query_groups * dims.head_dim
        shapes = [(dims.num_heads * dims.head_dim, *rest), (kv, *rest), (kv, *rest)]
    return [(n, tuple(s), dtype) for n, s in zip(names, shapes)]


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 << 30) -> ConvertStats:
    """Export a checkpoint written by ``hf_to_mcore`` (or by Megatron with the same layout) to HF.

    Writes the stored ``config.json`` and tokenizer files and safetensors (sharded with an index
    above ``max_shard_bytes``); padded vocabulary rows are dropped; tied models get no ``lm_head``.
    """
    meta, config = read_convert_metadata(mcore_dir)
    dims = ModelDims.from_hf_config(config)
    reader = DcpChunkReader(mcore_dir)
    work: list[tuple[ParamRule, int | None, tuple[int, ...]]] = []
    plan = []
    for rule in rules_for(dims):
        key = rule.mcore_key()
        if key not in reader.metadata.state_dict_metadata:
            raise CheckpointError(
                f"{mcore_dir} has no tensor {key!r}; it does not match its hf_assets/config.json"
            )
        shape = reader.shape(key)
        for layer in range(dims.num_layers) if rule.per_layer else [None]:
            full = shape[1:] if rule.per_layer else shape
            work.append((rule, layer, full))
            plan += _hf_plan(rule, full, dims, layer, reader.dtype(key))
    writer = SafetensorsShardWriter(out_dir, plan, max_shard_bytes)
    sizes: list[int] = []
    for rule, layer, full in work:
        if rule.per_layer:
            tensor = reader.read(rule.mcore_key(), (layer, *[0] * len(full)), (1, *full))[0]
        else:
            tensor = reader.read(rule.mcore_key(), tuple([0] * len(full)), full)
        sizes.append(tensor.nbytes)
        for name, hf_tensor in split_mcore_full(rule, tensor, dims, layer):
            writer.write(name, hf_tensor)
        del tensor
    writer.close()
    copy_hf_assets(Path(mcore_dir) / ASSETS_DIR, out_dir)
    logger.info("exported %d tensors (%.3f GB) to %s", len(plan), writer.total_bytes / 1e9, out_dir)
    return ConvertStats(len(plan), writer.total_bytes, max(sizes, default=0))
