"""Build a Megatron ``GPTModel`` from an HF config for the planner's tests (local spec, CPU, fp32).

Kept independent of ``sdpg_mcore.models`` so the planner's counts are checked against Megatron
itself; ``test_plan.py`` also checks against ``sdpg_mcore.models.build_gpt_model`` when present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdpg_mcore.plan import ModelShape, padded_vocab_size


def init_model_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from sdpg_mcore.parallel.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)


def build_gpt(shape: ModelShape, tp: int, pp: int, *, bf16: bool = False):
    """``GPTModel`` for this rank's stage; call ``init_model_parallel`` first."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.intermediate_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm"),
        vocab_size=padded_vocab_size(shape.vocab_size, tp),
        max_sequence_length=256,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
    )
