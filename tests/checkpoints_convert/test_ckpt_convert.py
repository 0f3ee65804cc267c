"""Offline HF -> Megatron dist-checkpoint -> HF: bit-exact round trips and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert.convert import check_mcore_matches_config, hf_to_mcore, mcore_to_hf
from checkpoints_convert.dcp_io import DcpChunkReader
from checkpoints_convert.hf_io import CheckpointError
from sdpg_mcore.models.tiny import save_tiny_hf_model


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    "arch,tp,pp,overrides",
    [
        ("llama", 1, 1, {}),
        ("qwen2", 2, 2, {}),
        ("qwen3", 2, 1, {"tie_word_embeddings": False}),
        ("llama", 1, 2, {"dtype": torch.bfloat16, "tie_word_embeddings": True}),
    ],
)
def test_round_trip_bit_exact(tmp_path, arch, tp, pp, overrides):
    hf = save_tiny_hf_model(tmp_path / "hf", arch=arch, **overrides)
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    hf_to_mcore(hf, tmp_path / "mc", tp=tp, pp=pp)
    mcore_to_hf(tmp_path / "mc", tmp_path / "out", max_shard_bytes=200_000)  # force several shards
    src, back = _load_dir(hf), _load_dir(tmp_path / "out")
    assert sorted(src) == sorted(back)
    for name, tensor in src.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (hf / "config.json").read_text()
    )
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    tied = json.loads((hf / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in back) == (not tied)


def test_checkpoint_layout_is_megatron_global(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="qwen3")
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=1)
    reader = DcpChunkReader(tmp_path / "mc")
    assert reader.shape("embedding.word_embeddings.weight") == (512, 64)  # 301 padded to 128*TP
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (4, (2 + 2) * 2 * 24, 64)
    assert reader.shape("decoder.layers.mlp.linear_fc1.weight") == (4, 192, 64)
    emb = reader.read("embedding.word_embeddings.weight", (0, 0), (512, 64))
    assert not emb[301:].any()
    assert json.loads((tmp_path / "mc" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


def test_different_config_is_refused(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="llama")
    hf_to_mcore(hf, tmp_path / "mc")
    config = json.loads((hf / "config.json").read_text())
    assert check_mcore_matches_config(tmp_path / "mc", config)["arch"] == "llama"
    config["num_hidden_layers"] = 2
    with pytest.raises(
        CheckpointError, match="different model config.*num_hidden_layers: 4 in checkpoint vs 2"
    ):
        check_mcore_matches_config(tmp_path / "mc", config)


@pytest.mark.parametrize(
    "arch,overrides,tp,pp,match",
    [
        ("llama", {"model_type": "gpt2"}, 1, 1, "model_type='gpt2'.*not supported.*supported model_type"),
        ("llama", {}, 4, 1, "--tp=4 does not divide num_key_value_heads=2"),
        ("llama", {}, 1, 3, "--pp=3 does not divide num_hidden_layers=4"),
    ],
)
def test_user_errors_name_the_fix(tmp_path, arch, overrides, tp, pp, match):
    hf = save_tiny_hf_model(tmp_path / "hf", arch=arch)
    if overrides:
        config = json.loads((hf / "config.json").read_text())
        config.update(overrides)
        (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        hf_to_mcore(hf, tmp_path / "mc", tp=tp, pp=pp)
    assert not (tmp_path / "mc").exists()  # nothing written for a bad request


def test_truncated_shard_fails_before_writing(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="qwen2")
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        hf_to_mcore(hf, tmp_path / "mc")


def test_not_a_converted_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not written by `tools/convert_hf.py to-mcore`"):
        mcore_to_hf(tmp_path, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    hf = save_tiny_hf_model(tmp_path / "hf", arch="llama")
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, hf / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.up_proj.weight' not found"):
        hf_to_mcore(hf, tmp_path / "mc")


def test_reader_regions_match_whole_chunks(tmp_path):
    """Exact-chunk reads (in place) and sub-region reads (generic DCP resharding) agree."""
    hf = save_tiny_hf_model(tmp_path / "hf", arch="qwen2")
    hf_to_mcore(hf, tmp_path / "mc", tp=1)
    reader = DcpChunkReader(tmp_path / "mc")
    key = "decoder.layers.mlp.linear_fc1.weight"
    layers = [reader.read(key, (i, 0, 0), (1, 192, 64)) for i in range(4)]
    region = reader.read(key, (1, 10, 5), (2, 100, 50))
    assert torch.equal(region, torch.cat(layers[1:3])[:, 10:110, 5:55])
    src = load_file(hf / "model.safetensors")
    assert torch.equal(layers[3][0, :96], src["model.layers.3.mlp.gate_proj.weight"])


def test_sharded_hf_input_with_index(tmp_path):
    from checkpoints_convert.hf_io import SafetensorsShardWriter

    hf = save_tiny_hf_model(tmp_path / "hf", arch="qwen3", tie_word_embeddings=False)
    src = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    writer = SafetensorsShardWriter(hf, [(n, tuple(t.shape), t.dtype) for n, t in src.items()], 150_000)
    for n, t in src.items():
        writer.write(n, t)
    writer.close()
    assert len(writer.files) > 2
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=2)
    mcore_to_hf(tmp_path / "mc", tmp_path / "out")
    back = load_file(tmp_path / "out" / "model.safetensors")  # small: one file again
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_load_mcore_into_model_refuses_other_config_before_loading(tmp_path):
    from checkpoints_convert.model_io import load_mcore_into_model

    llama = save_tiny_hf_model(tmp_path / "llama", arch="llama")
    qwen3 = save_tiny_hf_model(tmp_path / "qwen3", arch="qwen3")
    hf_to_mcore(llama, tmp_path / "mc")
    with pytest.raises(CheckpointError, match="model_type: 'llama' in checkpoint vs 'qwen3'"):
        load_mcore_into_model([], tmp_path / "mc", qwen3)
