"""Model shapes from a Hugging Face ``config.json`` and exact parameter counts, HF and Megatron.

The planner is only trustworthy if it counts the parameters of the real model, so this module
counts tensor by tensor, the way ``transformers`` and Megatron-Core build them: GQA key/value
heads, a ``head_dim`` decoupled from ``hidden_size / heads`` (Qwen3), QKV bias (Qwen2), q/k
RMSNorm (Qwen3), tied or untied embeddings, and Megatron's vocabulary padding to a multiple of
``128 * TP``. Tests check both counts against models built from the same configs.

    shape = ModelShape.from_hf_config(json.load(open("config.json")))
    shape.num_hf_parameters()                 # == sum(p.numel() for p in AutoModelForCausalLM...)
    shape.num_megatron_parameters(tp=8)       # unique parameters of GPTModel, padded vocabulary
    shape.rank_parameters(tp=8, pp=4)         # per-rank count of the busiest pipeline stage
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: HF ``model_type`` values whose decoder layers this module knows tensor by tensor.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: Megatron's default ``make_vocab_size_divisible_by``.
VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only GQA transformer with SwiGLU MLP and RMSNorm."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on the q, k and v projections (Qwen2 always; Llama/Qwen3 when ``attention_bias``)."""
    o_bias: bool
    """Bias on the attention output projection (Llama/Qwen3 ``attention_bias``; never Qwen2)."""
    mlp_bias: bool
    """Bias on gate/up/down projections (Llama ``mlp_bias``)."""
    qk_norm: bool
    """Per-head RMSNorm on queries and keys (Qwen3)."""

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | Any) -> ModelShape:
        """Read a shape from an HF config (a ``config.json`` dict or a ``PretrainedConfig``)."""
        cfg = config if isinstance(config, dict) else config.to_dict()
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config model_type={model_type!r} is not supported by the planner; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(cfg.get(key), int):
                raise ValueError(f"config field {key!r} is missing or not an integer (got {cfg.get(key)!r})")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        is_qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """Read ``config.json`` (or a model directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist; pass an HF config.json or a model directory")
        return cls.from_hf_config(json.loads(path.read_text()))

    # ---- per-layer pieces, split into TP-sharded and TP-replicated parts -------------------------
    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_sharded_parameters(self) -> int:
        """Parameters of one layer that Megatron splits over TP (column/row-parallel weights)."""
        h, i = self.hidden_size, self.intermediate_size
        qkv_out = self.q_width + 2 * self.kv_width
        count = h * qkv_out + self.q_width * h + 2 * h * i + i * h
        count += qkv_out if self.qkv_bias else 0
        count += 2 * i if self.mlp_bias else 0  # fc1 (gate+up) bias is column-parallel
        return count

    def layer_replicated_parameters(self) -> int:
        """Parameters of one layer that every TP rank holds whole (norms, row-parallel biases)."""
        count = 2 * self.hidden_size  # input and post-attention RMSNorm
        count += 2 * self.head_dim if self.qk_norm else 0
        count += self.hidden_size if self.o_bias else 0
        count += self.hidden_size if self.mlp_bias else 0  # down_proj / linear_fc2 bias
        return count

    def layer_parameters(self) -> int:
        return self.layer_sharded_parameters() + self.layer_replicated_parameters()

    # ---- whole-model counts ---------------------------------------------------------------------
    def num_hf_parameters(self) -> int:
        """Unique parameters of ``AutoModelForCausalLM.from_config`` (tied head counted once)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_layers * self.layer_parameters() + self.hidden_size

    def num_megatron_parameters(self, tp: int = 1) -> int:
        """Unique parameters of Megatron's ``GPTModel`` summed over TP ranks, vocabulary padded.

        Replicated tensors (norms, row-parallel biases) are counted once, as in the HF model; a
        tied output layer that PP > 1 copies to the last stage is counted once as well.
        """
        embed = padded_vocab_size(self.vocab_size, tp) * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_layers * self.layer_parameters() + self.hidden_size

    def stage_parameters(self, tp: int, pp: int) -> list[int]:
        """Parameters held by one TP rank of each pipeline stage (layers split evenly over PP).

        Stage 0 holds the embedding, the last stage the final norm and the output layer; with
        tied embeddings and PP > 1 the last stage keeps its own copy of the embedding matrix as
        its output weight (Megatron synchronises the two), so it is counted there too.
        """
        if self.num_layers % pp:
            raise ValueError(f"pp={pp} must divide num_hidden_layers={self.num_layers}")
        vocab_shard = padded_vocab_size(self.vocab_size, tp) * self.hidden_size // tp
        layer = self.layer_sharded_parameters() // tp + self.layer_replicated_parameters()
        layers_per_stage = self.num_layers // pp
        stages = [layers_per_stage * layer for _ in range(pp)]
        stages[0] += vocab_shard
        stages[-1] += self.hidden_size
        if not self.tie_word_embeddings or pp > 1:
            stages[-1] += vocab_shard
        return stages

    def rank_parameters(self, tp: int, pp: int) -> int:
        """Parameters on the busiest rank (the pipeline stage with the most)."""
        return max(self.stage_parameters(tp, pp))

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache for one token across all layers (unsharded)."""
        return 2 * self.num_layers * self.kv_width * dtype_bytes
