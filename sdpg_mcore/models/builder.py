"""Build a Megatron-Core ``GPTModel`` from an HF config for the current TP/PP/CP layout, and run it.

    layout = initialize_model_parallel(tp=2, pp=2)
    model = build_gpt_model("/models/Qwen3-4B", params_dtype=torch.bfloat16)   # this rank's stage
    logits_BSV = forward_logits(model, tokens_BS)   # full-vocab logits on the last stage, else None

What the builder guarantees (and ``tests/models`` checks against ``transformers``):
- every parameter and buffer of the stage is on one device: ``torch.cuda.current_device()`` on a
  GPU (``tools/device_audit.py`` checks this construction on a fake GPU), else the host;
- the vocabulary is padded to ``padded_vocab_size(vocab, tp)`` rows; logits past the HF vocabulary
  are padding (``forward_logits`` drops them);
- ``llama3`` rope scaling uses all four HF parameters (GPTModel alone only forwards ``factor``);
- tied embeddings map to ``share_embeddings_and_output_weights`` (with PP the last stage holds a
  copy of the embedding as ``output_layer.weight``, kept equal by Megatron's embedding group).

Always pass an explicit attention mask to the model (``causal_attention_mask``): the one GPTModel
builds by default is allocated on CUDA (on CPU it only works through ``parallel.cpu_compat``).
``forward_logits`` does this for you. Under context parallelism the mask is ignored (the CP
attention is causal by global position) and inputs must be in the CP layout
(``sdpg_mcore.ops.cp_attention.split_to_cp_layout``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdpg_mcore.models.hf_config import HFModelConfig, padded_vocab_size, parse_hf_config
from sdpg_mcore.models.spec import layer_spec, transformer_config


def _stage_flags(pre_process: bool | None, post_process: bool | None) -> tuple[bool, bool]:
    from megatron.core import parallel_state as ps

    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    return pre, post


def build_gpt_model(
    hf_config: str | Path | dict | Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seq_len: int | None = None,
    **config_overrides: Any,
):
    """This rank's ``GPTModel`` stage for an HF config (path, dict, ``PretrainedConfig`` or parsed).

    ``pre_process``/``post_process`` default to whether this rank is the first/last pipeline stage.
    ``seq_len`` only bounds learned position tables (unused with rope); defaults to the HF maximum.
    ``config_overrides`` reach ``TransformerConfig`` (e.g. ``recompute_granularity="full"``).
    Raises ``ValueError`` for unsupported architectures and layouts that do not divide the model.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise ValueError(
            "Megatron parallel state is not initialised; call "
            "sdpg_mcore.parallel.state.initialize_model_parallel(tp, pp, cp) before build_gpt_model"
        )
    hf = hf_config if isinstance(hf_config, HFModelConfig) else parse_hf_config(hf_config)
    config = transformer_config(
        hf,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        params_dtype=params_dtype,
        use_te=use_te,
        **config_overrides,
    )
    pre, post = _stage_flags(pre_process, post_process)
    model = GPTModel(
        config,
        layer_spec(hf, use_te=use_te, cp=config.context_parallel_size),
        vocab_size=padded_vocab_size(hf.vocab_size, ps.get_tensor_model_parallel_world_size()),
        max_sequence_length=seq_len or hf.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=hf.rope_theta,
    )
    if hf.rope_scaling is not None:
        _apply_llama3_rope_scaling(model, hf)
    return _on_megatron_device(model, config)


def _on_megatron_device(model, config):
    """The whole stage on the device Megatron allocated its own layers on.

    Why: on a GPU (``use_cpu_initialization=False``) Megatron's parallel linear layers and
    embeddings allocate on ``torch.cuda.current_device()``, but the local spec's torch modules
    (``torch.nn.RMSNorm`` behind ``WrappedTorchNorm``, the qk-norms) are created on the host.
    Megatron's own ``get_model`` calls ``model.cuda(torch.cuda.current_device())`` for this reason.
    """
    if not config.use_cpu_initialization:
        model.cuda(torch.cuda.current_device())
    return model


def _apply_llama3_rope_scaling(model, hf: HFModelConfig) -> None:
    """Rescale the rotary frequencies with every ``llama3`` parameter from the HF config.

    Why: ``GPTModel(rope_scaling=True)`` passes only ``factor`` and hard-codes the rest (1, 4, 8192),
    which is wrong for e.g. Llama 3.2 long-context variants or tiny test configs.
    """
    rotary = model.rotary_pos_emb
    dim = hf.head_dim
    inv_freq = 1.0 / (hf.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = hf.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        inv_freq.to(rotary.inv_freq.device),
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, 1, S, S]`` bool, True where attention is forbidden (Megatron's mask convention)."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside Megatron's DDP / Float16Module wrappers (the model itself when unwrapped)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_logits(
    model,
    tokens_BS: torch.Tensor,
    *,
    vocab_size: int | None = None,
    num_microbatches: int = 1,
) -> torch.Tensor | None:
    """Forward-only pass over the pipeline; full-vocabulary logits ``[B, S, V]`` on the last stage.

    Every rank of the model-parallel group calls this with the same ``tokens_BS`` (first stage
    reads them; others only need the shape). Logits are gathered over TP and, under context
    parallelism, over CP back to the natural token order; ``vocab_size`` (default: all rows) drops
    the vocabulary padding. Returns None on ranks that are not the last pipeline stage.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from sdpg_mcore.ops.cp_attention import gather_from_cp_layout, split_to_cp_layout

    batch, seq_len = tokens_BS.shape
    if batch % num_microbatches != 0:
        raise ValueError(f"batch {batch} is not divisible by num_microbatches={num_microbatches}")
    micro = batch // num_microbatches
    device = next(unwrap_model(model).parameters()).device
    cp = ps.get_context_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank()
    mask = causal_attention_mask(seq_len, device)
    position_ids_BS = torch.arange(seq_len, device=device).expand(micro, seq_len)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(num_microbatches):
            yield tokens_BS[i * micro : (i + 1) * micro].to(device)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        positions = position_ids_BS
        if cp > 1:
            tokens = split_to_cp_layout(tokens, cp, cp_rank, dim=1)
            positions = split_to_cp_layout(positions, cp, cp_rank, dim=1)
        logits = model(tokens, positions, mask)

        def collect(logits_BSv, non_loss_data=True):
            full_BSV = gather_from_tensor_model_parallel_region(logits_BSv)
            if cp > 1:
                full_BSV = gather_from_cp_layout(full_BSV, ps.get_context_parallel_group(), dim=1)
            return full_BSV[..., :vocab_size] if vocab_size is not None else full_BSV

        return logits, collect

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches(),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=seq_len,
            micro_batch_size=micro,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat(list(outputs), dim=0)
