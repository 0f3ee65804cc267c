"""HF config -> Megatron-Core TransformerConfig + layer spec, and GPTModel construction for any TP/PP/CP.

    from sdpg_mcore.models import build_gpt_model, forward_logits, parse_hf_config

Modules: ``hf_config`` (parse/validate HF configs, vocab padding), ``spec`` (TransformerConfig and
the TE-or-local layer spec), ``builder`` (GPTModel, forward helper), ``param_names`` (HF <->
Megatron name table), ``tiny`` (tiny random HF models for tests). Megatron is imported lazily.
"""

from sdpg_mcore.models.builder import build_gpt_model, causal_attention_mask, forward_logits, unwrap_model
from sdpg_mcore.models.hf_config import (
    SUPPORTED_MODEL_TYPES,
    HFModelConfig,
    Llama3RopeScaling,
    padded_vocab_size,
    parse_hf_config,
)
from sdpg_mcore.models.param_names import megatron_param_names

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFModelConfig",
    "Llama3RopeScaling",
    "build_gpt_model",
    "causal_attention_mask",
    "forward_logits",
    "megatron_param_names",
    "padded_vocab_size",
    "parse_hf_config",
    "unwrap_model",
]
