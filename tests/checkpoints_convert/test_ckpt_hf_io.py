"""Streaming safetensors reader/writer: sharding with an index, slices, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert.hf_io import CheckpointError, HfCheckpointReader, SafetensorsShardWriter


def _write_model(tmp_path, max_shard_bytes):
    tensors = {
        "a": torch.arange(40, dtype=torch.float32).reshape(10, 4),
        "b": torch.randn(7, 3).to(torch.bfloat16),
        "c": torch.arange(5, dtype=torch.int64),
    }
    writer = SafetensorsShardWriter(
        tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_shard_bytes
    )
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    (tmp_path / "config.json").write_text("{}")
    return tensors, writer.files


def test_sharded_write_read_matches_safetensors(tmp_path):
    tensors, files = _write_model(tmp_path, max_shard_bytes=100)
    assert len(files) == 2 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["c"] == files[1] and index["weight_map"]["a"] == files[0]
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))  # the reference reader accepts our files
    reader = HfCheckpointReader(tmp_path)
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t) and torch.equal(reader.read(n), t)
    assert torch.equal(reader.read("a", 0, 2, 5), tensors["a"][2:5])
    assert torch.equal(reader.read("a", 1, 1, 3), tensors["a"][:, 1:3])
    assert reader.read("a", 0, 10, 10).shape == (0, 4)


def test_single_file_from_safetensors(tmp_path):
    t = {"x": torch.randn(3, 2)}
    save_file(t, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert torch.equal(HfCheckpointReader(tmp_path).read("x"), t["x"])


def test_truncated_and_missing_shards_name_the_file(tmp_path):
    _, files = _write_model(tmp_path, max_shard_bytes=100)
    path = tmp_path / files[1]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=f"{files[1]}.*truncated.*re-copy"):
        HfCheckpointReader(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match=f"{files[1]} is missing"):
        HfCheckpointReader(tmp_path)


def test_no_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        HfCheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HfCheckpointReader(tmp_path)
