"""QKV interleave, gate/up fusion, vocab padding and TP (un)sharding against naive fp64 references."""

import pytest
import torch

from checkpoints_convert.arch_maps import ModelDims, ParamRule, padded_vocab_size, rule_by_mcore_name
from checkpoints_convert.transforms import build_mcore_shard, gather_mcore_shards, split_mcore_full

DIMS = ModelDims(
    "qwen2",
    2,
    hidden_size=16,
    ffn_hidden_size=12,
    num_heads=8,
    num_query_groups=4,
    head_dim=3,
    vocab_size=301,
    tie_word_embeddings=False,
)


def _tensors(layer=0):
    g = torch.Generator().manual_seed(0)
    p = f"model.layers.{layer}."
    h, d, groups = DIMS.num_heads, DIMS.head_dim, DIMS.num_query_groups
    t = {
        p + "self_attn.q_proj.weight": torch.randn(h * d, 16, generator=g, dtype=torch.float64),
        p + "self_attn.k_proj.weight": torch.randn(groups * d, 16, generator=g, dtype=torch.float64),
        p + "self_attn.v_proj.weight": torch.randn(groups * d, 16, generator=g, dtype=torch.float64),
        p + "self_attn.q_proj.bias": torch.randn(h * d, generator=g, dtype=torch.float64),
        p + "self_attn.k_proj.bias": torch.randn(groups * d, generator=g, dtype=torch.float64),
        p + "self_attn.v_proj.bias": torch.randn(groups * d, generator=g, dtype=torch.float64),
        p + "mlp.gate_proj.weight": torch.randn(12, 16, generator=g, dtype=torch.float64),
        p + "mlp.up_proj.weight": torch.randn(12, 16, generator=g, dtype=torch.float64),
        p + "mlp.down_proj.weight": torch.randn(16, 12, generator=g, dtype=torch.float64),
        p + "self_attn.o_proj.weight": torch.randn(16, h * d, generator=g, dtype=torch.float64),
        "lm_head.weight": torch.randn(301, 16, generator=g, dtype=torch.float64),
    }
    return t


def _read(tensors):
    def read(name, dim, start, stop, out=None):
        t = tensors[name]
        t = t if dim is None else t.narrow(dim, start, stop - start)
        return t if out is None else out.copy_(t)

    return read


def _rule(name) -> ParamRule:
    return rule_by_mcore_name(DIMS)[name]


def _naive_qkv(q, k, v):
    """Row by row: for each group, its query heads, then its key head, then its value head."""
    d, hpg = DIMS.head_dim, DIMS.heads_per_group
    rows = []
    for g in range(DIMS.num_query_groups):
        for j in range(hpg):
            rows += [q[(g * hpg + j) * d + r] for r in range(d)]
        rows += [k[g * d + r] for r in range(d)]
        rows += [v[g * d + r] for r in range(d)]
    return torch.stack(rows)


@pytest.mark.parametrize("suffix", ["weight", "bias"])
def test_qkv_interleave_matches_naive_and_round_trips(suffix):
    t = _tensors()
    rule = _rule(f"self_attention.linear_qkv.{suffix}")
    shapes = {n: tuple(x.shape) for n, x in t.items()}
    full = build_mcore_shard(rule, _read(t), shapes, DIMS, 0, 0, 1, 384)
    p = "model.layers.0.self_attn."
    ref = _naive_qkv(t[p + f"q_proj.{suffix}"], t[p + f"k_proj.{suffix}"], t[p + f"v_proj.{suffix}"])
    assert torch.equal(full, ref)
    for tp in (2, 4):
        shards = [build_mcore_shard(rule, _read(t), shapes, DIMS, 0, r, tp, 384) for r in range(tp)]
        assert torch.equal(gather_mcore_shards(rule, shards), full)
        # rank r holds exactly the rows of its query groups
        rows_per_group = (DIMS.heads_per_group + 2) * DIMS.head_dim
        per_rank = DIMS.num_query_groups // tp
        assert torch.equal(shards[1], full[per_rank * rows_per_group : 2 * per_rank * rows_per_group])
    for name, tensor in split_mcore_full(rule, full, DIMS, 0):
        assert torch.equal(tensor, t[name])


def test_gate_up_shards_regroup_on_gather():
    t = _tensors()
    rule = _rule("mlp.linear_fc1.weight")
    shapes = {n: tuple(x.shape) for n, x in t.items()}
    gate, up = t["model.layers.0.mlp.gate_proj.weight"], t["model.layers.0.mlp.up_proj.weight"]
    full = build_mcore_shard(rule, _read(t), shapes, DIMS, 0, 0, 1, 384)
    assert torch.equal(full, torch.cat([gate, up]))
    shards = [build_mcore_shard(rule, _read(t), shapes, DIMS, 0, r, 2, 384) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[6:], up[6:]]))  # each rank: [gate_r; up_r]
    assert torch.equal(gather_mcore_shards(rule, shards), full)
    assert [n for n, _ in split_mcore_full(rule, full, DIMS, 0)] == list(rule.hf_names(0))


def test_row_parallel_and_vocab_padding():
    t = _tensors()
    shapes = {n: tuple(x.shape) for n, x in t.items()}
    proj = _rule("self_attention.linear_proj.weight")
    shards = [build_mcore_shard(proj, _read(t), shapes, DIMS, 0, r, 2, 384) for r in range(2)]
    assert torch.equal(shards[0], t["model.layers.0.self_attn.o_proj.weight"][:, :12])
    assert torch.equal(gather_mcore_shards(proj, shards), t["model.layers.0.self_attn.o_proj.weight"])

    out = _rule("output_layer.weight")
    padded = padded_vocab_size(301, 2)
    assert padded == 512
    shards = [build_mcore_shard(out, _read(t), shapes, DIMS, None, r, 2, padded) for r in range(2)]
    assert shards[0].shape == (256, 16) and torch.equal(shards[0], t["lm_head.weight"][:256])
    assert torch.equal(shards[1][:45], t["lm_head.weight"][256:]) and not shards[1][45:].any()
    full = gather_mcore_shards(out, shards)
    ((name, back),) = split_mcore_full(out, full, DIMS, None)
    assert name == "lm_head.weight" and torch.equal(back, t["lm_head.weight"])
    # a rank whose whole slice is padding still gets the right dtype and zeros
    shard = build_mcore_shard(out, _read(t), shapes, DIMS, None, 3, 4, 1024)
    assert shard.dtype == torch.float64 and shard.shape == (256, 16) and not shard.any()


def test_padded_vocab_size():
    assert padded_vocab_size(301, 1) == 384
    assert padded_vocab_size(384, 1) == 384
    assert padded_vocab_size(151936, 4) == 151936 + (512 - 151936 % 512) % 512


def test_both_layer_specs_map_to_the_same_rules():
    table = rule_by_mcore_name(DIMS)
    assert table["input_layernorm.weight"] is table["self_attention.linear_qkv.layer_norm_weight"]
    assert table["pre_mlp_layernorm.weight"] is table["mlp.linear_fc1.layer_norm_weight"]
    assert table["pre_mlp_layernorm.weight"].hf == ("model.layers.{i}.post_attention_layernorm.weight",)
