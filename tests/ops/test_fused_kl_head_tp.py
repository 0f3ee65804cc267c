"""TP = 2 and 4 on real gloo groups give the TP = 1 values and gradients of fused_kl_head (fp64)."""

from __future__ import annotations

import pytest
import torch

from sdpg_mcore.parallel.spawn import spawn_ranks

HIDDEN = 6
# (real vocab, padded vocab = V_local * 4): with TP 4 the last rank holds one real row (13) or none
# (11); 500 of 512 gives several vocabulary blocks per shard (and token groups at chunk_size 1).
VOCABS = [(13, 16), (11, 16), (500, 512)]
# (teacher?, temperature, teacher_temperature, chunk_size, the teacher's own output layer?)
CONFIGS = [
    (True, 0.7, 1.3, 3, False),
    (False, 1.0, 1.0, None, False),
    (True, 1.0, 1.0, 1, False),
    (True, 0.7, 1.3, 3, True),
]


def _case(vocab, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = 7
    h_s = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64)
    h_t = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(padded, HIDDEN, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets[0], targets[-1] = vocab - 1, 0
    upstream = torch.randn(3, num_tokens, generator=gen, dtype=torch.float64)
    teacher_weight = weight + 0.3 * torch.randn(padded, HIDDEN, generator=gen, dtype=torch.float64)
    return h_s, h_t, weight, targets, upstream, teacher_weight


def _run(rank: int, tp_size: int, use_new_group: bool):
    import torch.distributed as dist

    from sdpg_mcore.ops import fused_kl_head

    group = dist.new_group(list(range(tp_size))) if use_new_group else dist.group.WORLD
    results = []
    for seed, (vocab, padded) in enumerate(VOCABS):
        h_s, h_t, weight, targets, upstream, teacher_weight = _case(vocab, padded, seed)
        rows = padded // tp_size
        for with_teacher, temp, teacher_temp, chunk, own_weight in CONFIGS:
            h = h_s.clone().requires_grad_()
            w = weight[rank * rows : (rank + 1) * rows].clone().requires_grad_()
            w_t = teacher_weight[rank * rows : (rank + 1) * rows] if own_weight else None
            outs = fused_kl_head(
                h, h_t if with_teacher else None, w, targets, vocab_size=vocab, temperature=temp,
                teacher_temperature=teacher_temp, chunk_size=chunk, tp_group=None if tp_size == 1 else group,
                teacher_weight=w_t,
            )  # fmt: skip
            sum(((o * g).sum() for o, g in zip(outs, upstream))).backward()
            # numpy, not tensors: torch's queue pickler shares tensor storage by fd, gone once the rank exits
            results.append(tuple(t.detach().numpy() for t in (torch.stack(outs), h.grad, w.grad)))
    return results


def _tp1_results():
    return [tuple(torch.from_numpy(a) for a in case) for case in _run(0, 1, False)]


@pytest.mark.parametrize("tp_size,use_new_group", [(2, True), (4, False)])
def test_tensor_parallel_matches_single_rank(tp_size, use_new_group):
    expected = _tp1_results()
    # timeout: a deadlock guard; 4 ranks x 4 configs took 152 s on the 2 shared cores at load ~27
    by_rank = spawn_ranks(_run, tp_size, args=(use_new_group,), timeout_s=300)
    by_rank = [[tuple(torch.from_numpy(a) for a in case) for case in results] for results in by_rank]
    for case, (outs, grad_h, grad_w) in enumerate(expected):
        for _rank, results in enumerate(by_rank):
            r_outs, r_grad_h, r_grad_w = results[case]
            torch.testing.assert_close(r_outs, outs, rtol=0, atol=1e-10)
            torch.testing.assert_close(r_grad_h, grad_h, rtol=0, atol=1e-10)
        shards = torch.cat([results[case][2] for results in by_rank])
        torch.testing.assert_close(shards, grad_w, rtol=0, atol=1e-10)
        vocab = VOCABS[case // len(CONFIGS)][0]
        assert torch.all(shards[vocab:] == 0) and shards[:vocab].abs().sum() > 0
