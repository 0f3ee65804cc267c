"""HF config -> HFModelConfig -> TransformerConfig mapping for every supported family (one process)."""

import json

import pytest
import torch

from sdpg_mcore.models.hf_config import Llama3RopeScaling, padded_vocab_size, parse_hf_config
from sdpg_mcore.models.spec import check_parallel_fit
from sdpg_mcore.models.tiny import tiny_hf_config

LLAMA31_REAL = {  # abridged config.json of meta-llama/Llama-3.1-8B (pre-transformers-5 spelling)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}  # fmt: skip


def test_llama31_real_config_with_rope_scaling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_REAL))
    for source in (tmp_path, tmp_path / "config.json", LLAMA31_REAL):
        hf = parse_hf_config(source)
        assert hf.rope_theta == 500000.0 and hf.head_dim == 128 and hf.num_key_value_heads == 8
        assert hf.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
        assert not hf.tie_word_embeddings and not hf.qkv_bias and not hf.qk_norm


def test_transformers5_rope_parameters_spelling():
    rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
    cfg = tiny_hf_config("llama", rope_scaling={**rope, "original_max_position_embeddings": 64})
    assert "rope_parameters" in cfg.to_dict()  # transformers 5 form, with rope_theta inside
    hf = parse_hf_config(cfg)
    assert hf.rope_theta == 10000.0 and hf.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 64)
    legacy = {
        **LLAMA31_REAL,
        "rope_scaling": {**rope, "type": "llama3", "original_max_position_embeddings": 64},
    }
    del legacy["rope_scaling"]["rope_type"]
    assert parse_hf_config(legacy).rope_scaling.factor == 32.0


@pytest.mark.parametrize(
    ("arch", "qkv_bias", "qk_norm", "head_dim", "tied", "theta"),
    [
        ("llama", False, False, 16, False, 1e4),
        ("qwen2", True, False, 16, True, 1e6),
        ("qwen3", False, True, 24, True, 1e6),
    ],
)
def test_families(arch, qkv_bias, qk_norm, head_dim, tied, theta):
    hf = parse_hf_config(tiny_hf_config(arch))
    assert (hf.model_type, hf.qkv_bias, hf.qk_norm, hf.head_dim) == (arch, qkv_bias, qk_norm, head_dim)
    assert (hf.tie_word_embeddings, hf.rope_theta, hf.rope_scaling) == (tied, theta, None)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size) == (4, 2, 301)


def test_transformer_config_fields():
    from sdpg_mcore.models.spec import transformer_config

    hf = parse_hf_config(tiny_hf_config("qwen3"))
    config = transformer_config(hf, tp=2, pp=2, params_dtype=torch.bfloat16, use_te=False)
    assert config.kv_channels == 24 and config.num_query_groups == 2 and config.qk_layernorm
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert not config.add_bias_linear and not config.add_qkv_bias and config.bf16
    assert config.ffn_hidden_size == 96 and config.num_layers == 4
    assert config.tensor_model_parallel_size == 2 and config.pipeline_model_parallel_size == 2
    assert transformer_config(parse_hf_config(tiny_hf_config("qwen2")), use_te=False).add_qkv_bias


def test_padded_vocab_size():
    assert padded_vocab_size(301, tp=1) == 384
    assert padded_vocab_size(301, tp=2) == 512
    assert padded_vocab_size(256, tp=2) == 256
    assert padded_vocab_size(151936, tp=8) == 152576


def test_errors_name_the_problem_and_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"model_type='mistral' is not supported; supported model types: llama, qwen2, qwen3"
    ):
        parse_hf_config({**LLAMA31_REAL, "model_type": "mistral"})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        parse_hf_config({**LLAMA31_REAL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="use_sliding_window"):
        parse_hf_config(tiny_hf_config("qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="no HF config at"):
        parse_hf_config(tmp_path)
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        parse_hf_config({k: v for k, v in LLAMA31_REAL.items() if k != "hidden_size"})
    hf = parse_hf_config(tiny_hf_config("llama"))
    with pytest.raises(ValueError, match=r"tensor parallel size 4 does not divide num_key_value_heads=2"):
        check_parallel_fit(hf, tp=4, pp=1)
    with pytest.raises(ValueError, match=r"pipeline parallel size 3 does not divide num_hidden_layers=4"):
        check_parallel_fit(hf, tp=1, pp=3)
