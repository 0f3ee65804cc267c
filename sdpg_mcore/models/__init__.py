"""HF config -> Megatron-Core TransformerConfig + layer spec, and GPTModel construction for any TP/PP/CP.

    from sdpg_mcore.models import build_gpt_model, forward_logits, parse_hf_config

Modules: ``hf_config`` (parse/validate HF configs, vocab padding), ``spec`` (TransformerConfig and
the TE-or-local layer spec), ``builder`` (GPTModel, forward helper), ``tiny`` (tiny random HF
models for tests). The HF <-> Megatron weight mapping is ``checkpoints_convert/arch_maps.py``.
Megatron is imported lazily.
"""

from sdpg_mcore.models.builder import build_gpt_model, causal_attention_mask, forward_logits, unwrap_model
from sdpg_mcore.models.hf_config import (
    SUPPORTED_MODEL_TYPES,
    HFModelConfig,
    Llama3RopeScaling,
    padded_vocab_size,
    parse_hf_config,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFModelConfig",
    "Llama3RopeScaling",
    "build_gpt_model",
    "causal_attention_mask",
    "forward_logits",
    "padded_vocab_size",
    "parse_hf_config",
    "unwrap_model",
]
