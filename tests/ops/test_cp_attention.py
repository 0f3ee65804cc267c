"""Context-parallel attention without TE: layout helpers, the op against an fp64 reference, and a
whole GPTModel whose logits, loss and gradients at CP=2 (and CP=2 x TP=2) equal CP=1; PP2 x CP2
logits equal PP2."""

import pytest
import torch
import torch.distributed as dist

from sdpg_mcore.ops.cp_attention import (
    cp_causal_attention,
    cp_positions,
    gather_from_cp_layout,
    restore_from_cp_layout,
    split_to_cp_layout,
)
from sdpg_mcore.parallel.spawn import spawn_ranks


def test_layout_round_trip_and_positions():
    x = torch.arange(2 * 16).reshape(2, 16)
    parts = [split_to_cp_layout(x, 4, r, dim=1) for r in range(4)]
    assert parts[0][0].tolist() == [0, 1, 14, 15] and parts[3][0].tolist() == [6, 7, 8, 9]
    assert torch.equal(restore_from_cp_layout(parts, dim=1), x)
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert split_to_cp_layout(x, 1, 0) is x
    with pytest.raises(ValueError, match="not divisible by 2\\*cp = 4"):
        split_to_cp_layout(torch.zeros(1, 6), 2, 0)


def _reference_attention(q_SBHD, k_SBGD, v_SBGD, scale):
    """Naive causal softmax attention with GQA, in the inputs' dtype (fp64 here)."""
    heads, groups = q_SBHD.shape[2], k_SBGD.shape[2]
    k = k_SBGD.repeat_interleave(heads // groups, dim=2)
    v = v_SBGD.repeat_interleave(heads // groups, dim=2)
    scores_BHQK = torch.einsum("qbhd,kbhd->bhqk", q_SBHD, k) * scale
    seq = q_SBHD.shape[0]
    scores_BHQK = scores_BHQK.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out_SBHD = torch.einsum("bhqk,kbhd->qbhd", scores_BHQK.softmax(-1), v)
    return out_SBHD.reshape(seq, q_SBHD.shape[1], -1)


def _qkv(seq=8, batch=2, heads=4, groups=2, dim=6):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(seq, batch, n, dim, generator=g, dtype=torch.float64) for n in (heads, groups, groups)
    ]


def test_op_without_cp_matches_reference():
    q, k, v = _qkv()
    out = cp_causal_attention(q, k, v, None, softmax_scale=0.3)
    torch.testing.assert_close(out, _reference_attention(q, k, v, 0.3), rtol=0, atol=1e-12)


def _op_on_cp_ranks(rank, world_size):
    q, k, v = _qkv(seq=16)
    weight = torch.randn(16, 2, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    local = [split_to_cp_layout(t, world_size, rank, dim=0).clone().requires_grad_() for t in (q, k, v)]
    out_local = cp_causal_attention(*local, dist.group.WORLD, softmax_scale=0.3)
    (out_local * split_to_cp_layout(weight, world_size, rank, dim=0)).sum().backward()
    out = gather_from_cp_layout(out_local.detach(), dist.group.WORLD, dim=0)
    grads = [gather_from_cp_layout(t.grad, dist.group.WORLD, dim=0) for t in local]
    return out, grads


def test_op_on_two_cp_ranks_matches_fp64_reference_with_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(seq=16))
    weight = torch.randn(16, 2, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _reference_attention(q, k, v, 0.3)
    (ref * weight).sum().backward()
    for out, grads in spawn_ranks(_op_on_cp_ranks, 2):
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
        for grad, tensor in zip(grads, (q, k, v)):
            torch.testing.assert_close(grad, tensor.grad, rtol=0, atol=1e-12)


SEQ, BATCH = 16, 2
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (tp, cp) on 4 ranks; the rest is data parallel


def _model_on_layouts(rank, world_size, hf_config):
    from megatron.core import parallel_state as ps

    from sdpg_mcore.models.builder import build_gpt_model, causal_attention_mask, forward_logits
    from sdpg_mcore.parallel import state

    tokens = torch.randint(0, 301, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(tokens, -1, dims=1)
    out = {}
    for tp, cp in LAYOUTS:
        state.initialize_model_parallel(tp=tp, cp=cp, seed=9)  # same seed: same weights at every cp
        model = build_gpt_model(hf_config)
        logits = forward_logits(model, tokens, vocab_size=301)
        cp_rank, group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
        local_tokens, local_labels = (split_to_cp_layout(t, cp, cp_rank, dim=1) for t in (tokens, labels))
        loss_BS = model(local_tokens, None, causal_attention_mask(SEQ), labels=local_labels)
        loss = loss_BS.sum()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)  # global loss: every token counted once across CP
        grads = {}
        for name, param in model.named_parameters():  # pp=1: the names are global
            grad = param.grad
            dist.all_reduce(grad, group=group)  # what DDP's DP x CP gradient reduction sums
            grads[name] = grad
        out[(tp, cp)] = dict(
            logits=logits, loss=total.item(), grads=grads, tp_rank=ps.get_tensor_model_parallel_rank()
        )
    for cp in (1, 2):  # pipeline x context parallel: the 1F1B schedule sends S / CP tokens per stage
        state.initialize_model_parallel(pp=2, cp=cp, seed=9)
        out[("pp2", cp)] = forward_logits(
            build_gpt_model(hf_config), tokens, vocab_size=301, num_microbatches=2
        )
    state.destroy()
    return out


def test_gpt_model_cp2_and_cp2_tp2_equal_cp1():
    from sdpg_mcore.models.tiny import tiny_hf_config

    hf_config = tiny_hf_config("qwen3").to_dict()  # GQA, QK-norm, head_dim 24 != 64 / 4, tied
    results = spawn_ranks(_model_on_layouts, 4, args=(hf_config,))
    for tp in (1, 2):
        for rank_out in results:
            base, with_cp = rank_out[(tp, 1)], rank_out[(tp, 2)]
            assert base["tp_rank"] == with_cp["tp_rank"] or tp == 1
            torch.testing.assert_close(with_cp["logits"], base["logits"], rtol=0, atol=1e-5)
            assert abs(with_cp["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"])
        # grads of the same TP shard: compare ranks holding the same tp_rank in both layouts
        for tp_rank in range(tp):
            base = next(r[(tp, 1)] for r in results if r[(tp, 1)]["tp_rank"] == tp_rank)
            with_cp = next(r[(tp, 2)] for r in results if r[(tp, 2)]["tp_rank"] == tp_rank)
            assert base["grads"].keys() == with_cp["grads"].keys()
            for name, grad in base["grads"].items():
                torch.testing.assert_close(with_cp["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
    assert results[0][(1, 1)]["logits"].shape == (BATCH, SEQ, 301)
    last_stage = [r for r in results if r[("pp2", 2)] is not None]
    assert len(last_stage) == 2  # pp=2 x cp=2: the two CP ranks of the last stage
    for r in last_stage:
        torch.testing.assert_close(r[("pp2", 2)], results[-1][("pp2", 1)], rtol=0, atol=1e-5)
