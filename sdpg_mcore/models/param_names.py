"""HF <-> Megatron parameter names and layouts for the models ``build_gpt_model`` makes.

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

from __future__ import annotations

import re

from sdpg_mcore.models.builder import unwrap_model

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
