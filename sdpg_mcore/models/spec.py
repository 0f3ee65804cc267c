"""``HFModelConfig`` -> Megatron ``TransformerConfig`` and layer spec (TE or local): the one place
that decides which implementation the transformer layers use.

Transformer-Engine is imported here and nowhere else in ``models/``. ``model.transformer_impl``
picks the spec (:func:`resolve_transformer_impl`): ``te`` demands it and stops the run at start-up,
naming the key and the import error, when TE is missing or broken (at 70B the local spec
materialises ``[s, s]`` attention scores: an OOM hours later otherwise); ``local`` never uses it;
``auto`` uses it when it imports on a GPU and says so, with the reason when it does not. With
context parallelism the local spec's core attention is replaced by
``sdpg_mcore.ops.cp_attention.ContextParallelAttention`` (Megatron's local ``DotProductAttention``
refuses CP > 1).

    use_te = resolve_transformer_impl("te")          # TransformerImplError without a working TE
    config = transformer_config(hf, tp=2, pp=1, cp=1, params_dtype=torch.bfloat16, use_te=use_te)
    spec = layer_spec(hf, use_te=use_te, cp=1)
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

from sdpg_mcore.models.hf_config import HFModelConfig

logger = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "te", "local")
"""``model.transformer_impl`` choices."""


class TransformerImplError(ValueError):
    """``model.transformer_impl=te`` where Transformer-Engine cannot run; the message names the key."""


def te_status() -> tuple[bool, str]:
    """Whether the Transformer-Engine spec can run here, and what was found (its version, or why not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (Transformer-Engine runs on GPUs only)"
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed"
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install (ABI or CUDA mismatch) raises anything at import
        return False, f"import transformer_engine.pytorch failed: {type(err).__name__}: {err}"
    return True, f"transformer_engine {getattr(transformer_engine, '__version__', '?')}"


def te_available() -> bool:
    """Whether Transformer-Engine can be imported (and a GPU exists to run it)."""
    return te_status()[0]


def resolve_transformer_impl(impl: str) -> bool:
    """Whether the layers use Transformer-Engine for ``model.transformer_impl=impl``; logs the choice.

    Raises :class:`TransformerImplError` for ``te`` without a working Transformer-Engine (the
    message names the key, the import error and the fix) and for an unknown value.
    """
    if impl not in TRANSFORMER_IMPLS:
        raise TransformerImplError(
            f"config key 'model.transformer_impl' got {impl!r}; choose one of: {', '.join(TRANSFORMER_IMPLS)}"
        )
    if impl == "local":
        logger.info("transformer layers: Megatron local spec (model.transformer_impl=local)")
        return False
    usable, found = te_status()
    if impl == "te" and not usable:
        raise TransformerImplError(
            f"config key 'model.transformer_impl' is te, but Transformer-Engine cannot run here: {found}. "
            "Install it for this torch and CUDA (pip install -e '.[te]' in the checkout), or set "
            "model.transformer_impl=auto (local spec as fallback) or local"
        )
    if usable:
        logger.info(
            "transformer layers: Transformer-Engine spec (%s; model.transformer_impl=%s)", found, impl
        )
    else:
        logger.warning(
            "transformer layers: Megatron local spec (model.transformer_impl=auto: %s); attention "
            "materialises [s, s] scores; set model.transformer_impl=te to require Transformer-Engine",
            found,
        )
    return usable


def resolve_use_te(use_te: bool | None) -> bool:
    """``None`` -> TE if available; ``True`` without TE -> ValueError naming the fix."""
    if use_te is None:
        return te_available()
    if use_te and not te_available():
        raise ValueError(
            "use_te=True but transformer-engine is not importable here; install the [te] extra or pass use_te=None"
        )
    return use_te


def check_parallel_fit(hf: HFModelConfig, tp: int, pp: int) -> None:
    """Raise ``ValueError`` when the model cannot be split this way (names the sizes and the fix)."""
    if hf.num_key_value_heads % tp != 0:
        raise ValueError(
            f"tensor parallel size {tp} does not divide num_key_value_heads={hf.num_key_value_heads} "
            f"(Megatron query groups) of this {hf.model_type} model; choose tp among the divisors of "
            f"{hf.num_key_value_heads}"
        )
    if hf.num_layers % pp != 0:
        raise ValueError(
            f"pipeline parallel size {pp} does not divide num_hidden_layers={hf.num_layers}; "
            f"choose pp among the divisors of {hf.num_layers}"
        )
    if hf.intermediate_size % tp != 0:
        raise ValueError(
            f"tensor parallel size {tp} does not divide intermediate_size={hf.intermediate_size}"
        )


def transformer_config(
    hf: HFModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    sequence_parallel: bool = False,
    perform_initialization: bool = True,
    **overrides: Any,
):
    """A ``TransformerConfig`` for ``hf`` split ``tp`` x ``pp`` x ``cp`` (pure: reads no process group).

    ``overrides`` go straight to ``TransformerConfig`` (recompute, dropout, ...). On CPU weights are
    initialised on CPU (``use_cpu_initialization``), which also makes a seeded init independent of TP.
    """
    from megatron.core.transformer import TransformerConfig

    check_parallel_fit(hf, tp, pp)
    te = resolve_use_te(use_te)
    if sequence_parallel and not te:
        raise ValueError(
            "sequence_parallel=True needs the Transformer-Engine spec (the local torch norms refuse it)"
        )
    fields: dict[str, Any] = dict(
        num_layers=hf.num_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf.qkv_bias,
        qk_layernorm=hf.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.initializer_range,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=te,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def layer_spec(hf: HFModelConfig, *, use_te: bool | None = None, cp: int = 1):
    """The transformer layer ``ModuleSpec``: TE's fused modules, or Megatron's local modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_use_te(use_te):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=hf.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=hf.qk_norm, normalization="RMSNorm")
    if cp > 1:
        from sdpg_mcore.ops.cp_attention import ContextParallelAttention

        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return spec
