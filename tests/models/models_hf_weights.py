"""Test helper: copy an HF state dict into a Megatron ``GPTModel`` stage by hand (local spec).

Independent of ``checkpoints_convert/`` on purpose: it proves the builder's semantics (rope, norms,
QK-norm, GQA grouping, head_dim) with the simplest possible mapping, following the table in
``sdpg_mcore.models.param_names``.
"""

import re

import torch

from sdpg_mcore.models.hf_config import HFModelConfig
from sdpg_mcore.models.param_names import megatron_param_names


def _qkv(hf: HFModelConfig, q, k, v):
    """Interleave per query group: [q heads of group g; k_g; v_g] for g in groups (dim 0)."""
    groups, per_group, d = (
        hf.num_key_value_heads,
        hf.num_attention_heads // hf.num_key_value_heads,
        hf.head_dim,
    )
    q = q.reshape(groups, per_group * d, *q.shape[1:])
    k = k.reshape(groups, d, *k.shape[1:])
    v = v.reshape(groups, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def megatron_tensor(hf: HFModelConfig, sd: dict, name: str, tp: int, tp_rank: int, vocab_rows: int):
    """The TP shard of Megatron parameter ``name`` (canonical, global layer index) from HF ``sd``."""

    def rows(t):
        return t.chunk(tp, dim=0)[tp_rank]

    def cols(t):
        return t.chunk(tp, dim=1)[tp_rank]

    def padded(t):
        out = torch.zeros(vocab_rows, t.shape[1], dtype=t.dtype)
        out[: t.shape[0]] = t
        return rows(out)

    if name == "embedding.word_embeddings.weight":
        return padded(sd["model.embed_tokens.weight"])
    if name == "output_layer.weight":
        return padded(sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
    if name == "decoder.final_layernorm.weight":
        return sd["model.norm.weight"]
    layer, rest = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name).groups()
    p = f"model.layers.{layer}."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        return rows(_qkv(hf, q, k, v))
    simple = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    }
    if rest in simple:
        return sd[p + simple[rest]]
    if rest == "self_attention.linear_proj.weight":
        return cols(sd[p + "self_attn.o_proj.weight"])
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([rows(sd[p + "mlp.gate_proj.weight"]), rows(sd[p + "mlp.up_proj.weight"])])
    if rest == "mlp.linear_fc2.weight":
        return cols(sd[p + "mlp.down_proj.weight"])
    raise KeyError(name)


def load_hf_into_megatron(model, hf: HFModelConfig, sd: dict) -> None:
    """Overwrite every parameter of this rank's stage with the matching (sharded) HF tensor."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    names = megatron_param_names(model)
    with torch.no_grad():
        for local, param in model.named_parameters():
            vocab_rows = param.shape[0] * tp
            value = megatron_tensor(hf, sd, names[local], tp, tp_rank, vocab_rows)
            assert value.shape == param.shape, (names[local], value.shape, param.shape)
            param.copy_(value)
