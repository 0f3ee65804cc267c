"""Tiny random-init Hugging Face models, made locally, for tests, tools and the CPU example.

No hub: every model here is built from a config with ``transformers`` and saved as safetensors.
The shapes exercise what breaks conversions and parity: GQA, a ``head_dim`` that differs from
``hidden_size / num_attention_heads`` (Qwen3), QKV bias (Qwen2), tied embeddings, and a
vocabulary that is not a multiple of 128.

    path = save_tiny_hf_model(tmp_path / "qwen3", arch="qwen3", tie_word_embeddings=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Shape shared by every tiny model: GQA (4 query heads over 2 key/value groups), vocab 301 (not a
#: multiple of 128).
_TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=301,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

#: Small configs per architecture: the shared shape plus what each family does differently.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        _TINY_SHAPE, model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False
    ),
    "qwen2": dict(
        _TINY_SHAPE, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True
    ),
    "qwen3": dict(
        _TINY_SHAPE,
        model_type="qwen3",
        head_dim=24,  # != hidden_size / heads, as in the real Qwen3 family
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


def tiny_hf_config(arch: str = "qwen3", **overrides: Any):
    """A ``transformers`` config for a tiny model of ``arch`` (llama | qwen2 | qwen3)."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch={arch!r} has no tiny config; choose one of {sorted(TINY_CONFIGS)}")
    fields = {**TINY_CONFIGS[arch], **overrides}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def save_tiny_hf_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Path:
    """Build a random-init model of ``arch`` and save it (config.json + model.safetensors) to ``out_dir``.

    Weights are drawn with ``seed`` and perturbed away from HF's init for norms (all-ones norms would
    hide a mis-mapped layernorm in a parity test). ``device="cuda"`` draws them on the GPU: a
    model at a real width (hundreds of millions of weights) then takes seconds, not minutes.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out
