"""Test helper: copy an HF state dict into a Megatron ``GPTModel`` stage by hand (local spec).

Independent of ``checkpoints_convert/`` on purpose: it proves the builder's semantics (rope, norms,
QK-norm, GQA grouping, head_dim) with the simplest possible mapping, following this table.

Local spec (CPU, no Transformer-Engine); ``L`` = global layer index, shapes per TP rank
(``tp`` = TP size, ``d`` = head_dim, ``h`` = hidden, ``nq``/``nkv`` = query/key-value heads,
``f`` = intermediate_size, ``Vp`` = padded vocab):

| Megatron (local spec)                                    | HF                                                | notes |
|----------------------------------------------------------|---------------------------------------------------|-------|
| embedding.word_embeddings.weight [Vp/tp, h]              | model.embed_tokens.weight [V, h]                  | rows >= V are padding (zeros on import, dropped on export); split by rows |
| decoder.layers.L.input_layernorm.weight [h]              | model.layers.L.input_layernorm.weight             | replicated |
| decoder.layers.L.self_attention.linear_qkv.weight [(nq+2nkv)d/tp, h] | q_proj, k_proj, v_proj .weight        | per query group g: [q heads of g (nq/nkv of them); k_g; v_g], groups concatenated, then split by rows over TP (whole groups per rank) |
| decoder.layers.L.self_attention.linear_qkv.bias          | q_proj.bias, k_proj.bias, v_proj.bias             | Qwen2 only; same interleave as the weight |
| decoder.layers.L.self_attention.q_layernorm.weight [d]   | model.layers.L.self_attn.q_norm.weight            | Qwen3 only; replicated |
| decoder.layers.L.self_attention.k_layernorm.weight [d]   | model.layers.L.self_attn.k_norm.weight            | Qwen3 only; replicated |
| decoder.layers.L.self_attention.linear_proj.weight [h, nq d/tp] | model.layers.L.self_attn.o_proj.weight     | split by columns |
| decoder.layers.L.pre_mlp_layernorm.weight [h]            | model.layers.L.post_attention_layernorm.weight    | replicated |
| decoder.layers.L.mlp.linear_fc1.weight [2f/tp, h]        | mlp.gate_proj.weight, mlp.up_proj.weight          | per TP rank: [gate rows of rank; up rows of rank] |
| decoder.layers.L.mlp.linear_fc2.weight [h, f/tp]         | model.layers.L.mlp.down_proj.weight               | split by columns |
| decoder.final_layernorm.weight [h]                       | model.norm.weight                                 | last stage |
| output_layer.weight [Vp/tp, h]                           | lm_head.weight                                    | untied only; with tied embeddings and PP > 1 the last stage holds a copy of the embedding under this name |

Transformer-Engine spec differences (GPU): the layer norms are fused into the following linear:
``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight`` and
``pre_mlp_layernorm.weight`` -> ``mlp.linear_fc1.layer_norm_weight``; TE modules also carry
``*._extra_state`` buffers (FP8 metadata) in the state dict. ``q_layernorm``/``k_layernorm`` keep
their names. Under PP, module names inside a stage use local layer indices (0-based within the
stage); ``megatron_param_names`` maps them to the global ``L`` above.
"""

import re

import torch

from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.models.hf_config import HFModelConfig

_LAYER_RE = re.compile(r"^(?P<pre>(?:.*\.)?decoder\.layers\.)(?P<idx>\d+)(?P<post>\..*)$")


def megatron_param_names(model) -> dict[str, str]:
    """``{name in model.named_parameters(): canonical global name}`` for this pipeline stage.

    The canonical name has no wrapper prefixes (DDP's ``module.``) and the global layer index
    (``decoder.layers.<global L>``), i.e. the names in the table above.
    """
    inner = unwrap_model(model)
    offsets = {}
    decoder = getattr(inner, "decoder", None)
    if decoder is not None:
        for local, layer in enumerate(decoder.layers):
            offsets[local] = layer.layer_number - 1  # layer_number is 1-based and global
    names = {}
    inner_names = {id(p): n for n, p in inner.named_parameters()}
    for name, param in model.named_parameters():
        canonical = inner_names[id(param)]
        match = _LAYER_RE.match(canonical)
        if match is not None:
            local = int(match["idx"])
            canonical = f"{match['pre']}{offsets[local]}{match['post']}"
        names[name] = canonical
    return names


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
