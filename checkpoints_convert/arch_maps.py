"""Per-architecture name maps HF <-> Megatron-Core, as data.

One ``ParamRule`` says, for one Megatron parameter, which HF tensors it is made of, how they are
combined (``Fuse``) and how Megatron shards it over tensor-parallel ranks (``Shard``). The rules are
the single source of truth for the offline converter (``convert.py``), the in-memory loader and the
weight-sync generator (``model_io.py``).

Megatron names here are the *distributed-checkpoint* names, which are the Transformer-Engine names
for both layer specs: the local spec maps ``input_layernorm.`` / ``pre_mlp_layernorm.`` to
``self_attention.linear_qkv.layer_norm_`` / ``mlp.linear_fc1.layer_norm_`` when it builds its
sharded state dict, so a checkpoint written once loads into either spec. ``local_name`` is the
name a local-spec module uses in memory.

    dims = ModelDims.from_hf_config(json.load(open("config.json")))
    for rule in rules_for(dims): ...
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any


class Fuse(enum.Enum):
    """How HF tensors become one Megatron tensor."""

    COPY = "copy"  # one HF tensor, same layout
    QKV = "qkv"  # q, k, v interleaved per query group: [q_g (heads_per_group*d), k_g (d), v_g (d)] per g
    GATE_UP = "gate_up"  # [gate; up] along rows
    VOCAB = "vocab"  # one HF tensor with zero rows appended up to the padded vocabulary


class Shard(enum.Enum):
    """How Megatron splits a parameter over tensor-parallel ranks."""

    REPLICATED = "replicated"  # norms: full copy on every rank
    COLUMN = "column"  # rows split (qkv by query groups; fc1 gate and up split separately)
    ROW = "row"  # columns split (linear_proj, linear_fc2)
    VOCAB = "vocab"  # rows of the padded vocabulary split (embedding, output layer)


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter and the HF tensors it comes from."""

    mcore: str
    """Dist-checkpoint name; for layer rules the part after ``decoder.layers.{i}.``."""
    hf: tuple[str, ...]
    """HF names; ``{i}`` is the global layer index."""
    fuse: Fuse
    shard: Shard
    per_layer: bool
    local_name: str | None = None
    """In-memory name in the local (non-TE) layer spec, when it differs from ``mcore``."""

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(name.format(i=layer) for name in self.hf)

    def mcore_key(self) -> str:
        """Key in the distributed checkpoint (layers are one stacked tensor per key)."""
        return f"decoder.layers.{self.mcore}" if self.per_layer else self.mcore


@dataclass(frozen=True)
class ModelDims:
    """The shapes the maps need, read from an HF ``config.json`` dict (no ``transformers`` needed)."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelDims:
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"config.json model_type={model_type!r} (architectures={config.get('architectures')}) is not "
                f"supported by checkpoints_convert; supported model_type values: {sorted(ARCHITECTURES)}. "
                "Add a rule table in checkpoints_convert/arch_maps.py for a new family."
            )
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag) and not (model_type == "qwen2" and flag == "attention_bias"):
                raise ValueError(
                    f"config.json {flag}=true is not supported for model_type={model_type!r}; "
                    "only Qwen2's QKV bias is mapped. Convert a checkpoint without that bias."
                )
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            model_type=model_type,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary rounded up to a multiple of ``multiple * tp`` (Megatron's rule, so each rank's slice
    is a multiple of ``multiple``)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def validate_parallel(dims: ModelDims, tp: int, pp: int) -> None:
    """Raise ``ValueError`` naming the fix when ``dims`` cannot be split ``tp`` x ``pp`` ways."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp={tp} and --pp={pp} must be >= 1")
    if dims.num_query_groups % tp:
        raise ValueError(
            f"--tp={tp} does not divide num_key_value_heads={dims.num_query_groups} (query groups) of this "
            f"model; choose a tensor-parallel size that divides {dims.num_query_groups}."
        )
    if dims.num_heads % tp:
        raise ValueError(f"--tp={tp} does not divide num_attention_heads={dims.num_heads}; choose a divisor.")
    if dims.ffn_hidden_size % tp:
        raise ValueError(
            f"--tp={tp} does not divide intermediate_size={dims.ffn_hidden_size}; choose a divisor."
        )
    if dims.num_layers % pp:
        raise ValueError(
            f"--pp={pp} does not divide num_hidden_layers={dims.num_layers}; choose a pipeline-parallel size "
            f"that divides {dims.num_layers}."
        )


_L = "model.layers.{i}."

_LLAMA_LAYER = (
    ParamRule(
        "self_attention.linear_qkv.layer_norm_weight",
        (_L + "input_layernorm.weight",),
        Fuse.COPY,
        Shard.REPLICATED,
        True,
        local_name="input_layernorm.weight",
    ),
    ParamRule(
        "self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        Fuse.QKV,
        Shard.COLUMN,
        True,
    ),
    ParamRule(
        "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), Fuse.COPY, Shard.ROW, True
    ),
    ParamRule(
        "mlp.linear_fc1.layer_norm_weight",
        (_L + "post_attention_layernorm.weight",),
        Fuse.COPY,
        Shard.REPLICATED,
        True,
        local_name="pre_mlp_layernorm.weight",
    ),
    ParamRule(
        "mlp.linear_fc1.weight",
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        Fuse.GATE_UP,
        Shard.COLUMN,
        True,
    ),
    ParamRule("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), Fuse.COPY, Shard.ROW, True),
)

_QKV_BIAS = ParamRule(
    "self_attention.linear_qkv.bias",
    (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
    Fuse.QKV,
    Shard.COLUMN,
    True,
)

_QK_NORM = (
    ParamRule(
        "self_attention.q_layernorm.weight",
        (_L + "self_attn.q_norm.weight",),
        Fuse.COPY,
        Shard.REPLICATED,
        True,
    ),
    ParamRule(
        "self_attention.k_layernorm.weight",
        (_L + "self_attn.k_norm.weight",),
        Fuse.COPY,
        Shard.REPLICATED,
        True,
    ),
)

EMBEDDING = ParamRule(
    "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Fuse.VOCAB, Shard.VOCAB, False
)
FINAL_NORM = ParamRule(
    "decoder.final_layernorm.weight", ("model.norm.weight",), Fuse.COPY, Shard.REPLICATED, False
)
OUTPUT_LAYER = ParamRule("output_layer.weight", ("lm_head.weight",), Fuse.VOCAB, Shard.VOCAB, False)

#: model_type -> the per-layer rules of that family.
ARCHITECTURES: dict[str, tuple[ParamRule, ...]] = {
    "llama": _LLAMA_LAYER,
    "qwen2": _LLAMA_LAYER + (_QKV_BIAS,),
    "qwen3": _LLAMA_LAYER + _QK_NORM,
}


def rules_for(dims: ModelDims) -> list[ParamRule]:
    """All rules of a model, in checkpoint order: embedding, layers, final norm, untied output layer."""
    rules = [EMBEDDING, *ARCHITECTURES[dims.model_type], FINAL_NORM]
    if not dims.tie_word_embeddings:
        rules.append(OUTPUT_LAYER)
    return rules


def rule_by_mcore_name(dims: ModelDims) -> dict[str, ParamRule]:
    """In-memory Megatron name (layer part without ``decoder.layers.{k}.``) -> rule, for both specs."""
    table: dict[str, ParamRule] = {}
    for rule in rules_for(dims):
        table[rule.mcore] = rule
        if rule.local_name:
            table[rule.local_name] = rule
    return table


#: HF config keys that do not change the weights or the forward pass (excluded from the config hash).
_HASH_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def config_hash(config: dict[str, Any]) -> str:
    """sha256 over the config fields that define the model, so a checkpoint can name its config."""
    kept = {k: v for k, v in config.items() if k not in _HASH_IGNORED}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_KEY_ORDER = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def config_diff(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The model-defining fields that differ, most telling first ("key: a in checkpoint vs b")."""
    keys = {k for k in set(stored) | set(given) if k not in _HASH_IGNORED and stored.get(k) != given.get(k)}
    ordered = [k for k in _KEY_ORDER if k in keys] + sorted(keys - set(_KEY_ORDER))
    return [f"{k}: {stored.get(k)!r} in checkpoint vs {given.get(k)!r}" for k in ordered]
