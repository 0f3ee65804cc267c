"""Read a Hugging Face model config into a typed, validated description of the architecture.

Accepts what users have: a ``config.json`` path, the model directory holding it, a dict, or a
``transformers.PretrainedConfig``. Both spellings of rotary settings are read: real checkpoints
carry ``rope_theta`` + ``rope_scaling``, transformers 5 writes ``rope_parameters`` (with
``rope_theta`` inside). Everything downstream (``spec.py``, converters, the memory planner) reads the
resulting ``HFModelConfig`` instead of the raw dict.

    hf = parse_hf_config("/models/Qwen3-4B")      # -> HFModelConfig(model_type="qwen3", ...)
    padded_vocab_size(hf.vocab_size, tp=2)         # 151936 -> 152064 (multiple of 128 * 2)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: model_type -> what differs between the supported families (everything else is shared Llama).
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "llama": dict(qkv_bias=False, qk_norm=False),  # Llama 2, 3, 3.1, 3.2, 3.3
    "qwen2": dict(qkv_bias=True, qk_norm=False),  # Qwen2, Qwen2.5
    "qwen3": dict(qkv_bias=False, qk_norm=True),  # Qwen3 dense
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """``rope_type: llama3`` frequency scaling (Llama 3.1+): low frequencies slowed by ``factor``."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class HFModelConfig:
    """The architecture of a supported HF causal LM, with every default resolved."""

    model_type: str
    """One of ``SUPPORTED_MODEL_TYPES``."""
    vocab_size: int
    """Rows of the HF embedding (unpadded)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Key/value heads (= Megatron query groups); equal to the heads without GQA."""
    head_dim: int
    """Per-head width; Qwen3 decouples it from ``hidden_size / num_attention_heads``."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on the Q, K and V projections only (Qwen2)."""
    qk_norm: bool
    """RMSNorm over each query/key head before rotary (Qwen3)."""
    initializer_range: float = 0.02


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple * tp`` >= ``vocab_size`` (Megatron's vocab padding)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def load_hf_config_dict(source: str | Path | Mapping[str, Any] | Any) -> dict[str, Any]:
    """The raw config as a dict, from a path (file or directory), a mapping or a PretrainedConfig."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no HF config at {path}: pass a model directory containing config.json or the file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download or re-save the config") from None


def _require(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ValueError(f"HF config lacks {key!r}, which every {raw.get('model_type')} config must have")
    return raw[key]


def _rope(raw: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """``(rope_theta, scaling)`` from either ``rope_theta``/``rope_scaling`` or ``rope_parameters``."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {}) or params
    theta = raw.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported; supported: 'default' and 'llama3' "
            "(remove rope_scaling from config.json only if the model was trained without it)"
        )
    try:
        return float(theta), Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise ValueError(f"llama3 rope scaling in the HF config lacks {err.args[0]!r}") from None


def parse_hf_config(source: str | Path | Mapping[str, Any] | Any) -> HFModelConfig:
    """Validate and normalise an HF config of a supported architecture.

    Raises ``ValueError`` naming the field for an unsupported architecture or feature (sliding
    window, biases other than Qwen2's QKV bias, non-SiLU activations, unknown rope scaling).
    """
    raw = load_hf_config_dict(source)
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    arch = ARCHITECTURES[model_type]
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported; {model_type} models use 'silu'")
    if raw.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported; set it to false (full attention)")
    if raw.get("attention_bias") and not arch["qkv_bias"]:
        raise ValueError(f"attention_bias=true is not supported for {model_type}; only Qwen2's QKV bias is")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; the supported families have bias-free MLPs")
    heads = int(_require(raw, "num_attention_heads"))
    hidden = int(_require(raw, "hidden_size"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads != 0:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(raw.get("head_dim") or hidden // heads)
    theta, scaling = _rope(raw)
    return HFModelConfig(
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_layers=int(_require(raw, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch["qkv_bias"],
        qk_norm=arch["qk_norm"],
        initializer_range=float(raw.get("initializer_range") or 0.02),
    )
