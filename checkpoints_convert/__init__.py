"""Hugging Face <-> Megatron-Core checkpoint conversion: per-architecture maps, streaming, resharding.

Public API (all streaming: at most about two of the largest tensor in memory per process):

- ``hf_to_mcore(hf_dir, out_dir, tp=1, pp=1) -> ConvertStats``: HF safetensors -> Megatron
  ``torch_dist`` distributed checkpoint (loadable at any TP/PP) + ``sdpg_convert.json`` + ``hf_assets/``.
- ``mcore_to_hf(mcore_dir, out_dir, max_shard_bytes=5 << 30) -> ConvertStats``: the way back.
- ``check_mcore_matches_config(mcore_dir, hf_config_dict)``: ``CheckpointError`` if converted from
  a different model config.
- ``load_hf_into_model(model_chunks, hf_dir, *, tp_group=None)``: each rank reads its own shard.
- ``load_mcore_into_model(model_chunks, mcore_dir, hf_config)``: ``dist_checkpointing.load`` of a
  converted checkpoint after the config check.
- ``iter_hf_tensors(model_chunks, hf_config, *, tp_group=None)``: this PP stage's parameters as
  (HF name, full HF tensor), TP-gathered one tensor at a time (collective over the TP group).

CLIs: ``tools/convert_hf.py``, ``tools/check_parity.py``, ``tools/bench_convert.py``.
"""

from checkpoints_convert.convert import (
    ConvertStats,
    check_mcore_matches_config,
    hf_to_mcore,
    mcore_to_hf,
)
from checkpoints_convert.hf_io import CheckpointError
from checkpoints_convert.model_io import iter_hf_tensors, load_hf_into_model, load_mcore_into_model

__all__ = [
    "CheckpointError",
    "ConvertStats",
    "check_mcore_matches_config",
    "hf_to_mcore",
    "iter_hf_tensors",
    "load_hf_into_model",
    "load_mcore_into_model",
    "mcore_to_hf",
]
