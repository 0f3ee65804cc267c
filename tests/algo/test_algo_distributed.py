"""Real gloo ranks: DP = 2 gives the single-process loss, gradient and metrics; MetricSums.reduce is exact."""

import math

import pytest
import torch
import torch.distributed as dist
from algo_testlib import make_batch, run_mini_batch

from sdpg_mcore.algo import DAPOConfig, MetricSums, OPSDConfig, SDPGConfig
from sdpg_mcore.parallel.spawn import spawn_ranks

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-mean-legacy"]
RANK_SEQS = {
    0: [[0, 1, 2], [3]],
    1: [[4], [5, 6, 7]],
}  # each rank: its half of the mini-batch, 2 micro-batches


def _cfgs():
    out = []
    for mode in MODES:
        out.append(("sdpg", SDPGConfig(beta=0.2, alpha=0.1, entropy_coef=0.03, loss_agg_mode=mode)))
        out.append(("opsd", OPSDConfig(loss_agg_mode=mode)))
        out.append(("dapo", DAPOConfig(loss_agg_mode=mode)))
    return out


def _dp_worker(rank, world_size):
    torch.set_num_threads(1)
    batch = make_batch()
    results = []
    for name, cfg in _cfgs():
        loss, grad, metrics = run_mini_batch(
            name, cfg, batch, RANK_SEQS[rank], dp_size=world_size, mini_batch_rows=4
        )
        results.append((loss, grad.tolist(), metrics))  # plain lists: tensors through the queue race the exit
    return results


def test_dp2_matches_single_process():
    ranks = spawn_ranks(_dp_worker, 2)
    batch = make_batch()
    for i, (name, cfg) in enumerate(_cfgs()):
        loss_0, grad_0, m_0 = ranks[0][i]
        loss_1, grad_1, m_1 = ranks[1][i]
        grad_0, grad_1 = torch.tensor(grad_0, dtype=torch.float64), torch.tensor(grad_1, dtype=torch.float64)
        assert loss_0 == loss_1 and torch.equal(grad_0, grad_1) and m_0 == pytest.approx(m_1, nan_ok=True)
        if cfg.loss_agg_mode == "token-mean-legacy":
            # the reference's rule: each GPU's own (split-dependent) loss, averaged over the GPUs
            per_rank = [run_mini_batch(name, cfg, batch, RANK_SEQS[r], mini_batch_rows=4) for r in (0, 1)]
            assert loss_0 == pytest.approx(0.5 * (per_rank[0][0] + per_rank[1][0]), rel=1e-12)
            torch.testing.assert_close(
                grad_0, 0.5 * (per_rank[0][1] + per_rank[1][1]), rtol=1e-12, atol=1e-14
            )
            continue
        loss_s, grad_s, m_s = run_mini_batch(name, cfg, batch, [list(range(8))])
        assert loss_0 == pytest.approx(loss_s, rel=1e-12, abs=1e-14), (name, cfg.loss_agg_mode)
        torch.testing.assert_close(grad_0, grad_s, rtol=1e-12, atol=1e-14)
        assert set(m_0) == set(m_s)
        for key, value in m_s.items():
            assert m_0[key] == pytest.approx(value, rel=1e-12, abs=1e-14, nan_ok=True), key


def _metric_worker(rank, world_size):
    m = MetricSums()
    values = torch.arange(4, dtype=torch.float64) + 10 * rank
    mask = torch.tensor([True, True, rank == 0, False])
    m.add_mean("v", values, mask)
    m.add_max("vmax", values, mask)
    m.add_min("vmin", values, mask)
    m.add_total("t", torch.tensor(1.5 * (rank + 1)))
    m.add_ratio("frac", rank, 2)
    m.add_max("never", values, torch.zeros(4, dtype=torch.bool))
    m.add_mean("empty", values, torch.zeros(4, dtype=torch.bool))
    group = dist.new_group([0, 1])
    return m.reduce(group)


def test_metric_sums_reduce_over_gloo():
    out = spawn_ranks(_metric_worker, 2)
    assert out[0] == pytest.approx(out[1], nan_ok=True)
    m = out[0]
    assert m["v"] == pytest.approx((0 + 1 + 2 + 10 + 11) / 5, rel=1e-15)  # not the mean of rank means
    assert (m["vmax"], m["vmin"], m["t"], m["frac"]) == (11.0, 0.0, 4.5, 0.25)
    assert math.isnan(m["never"]) and math.isnan(m["empty"])


def test_metric_sums_accumulate_locally():
    a, b = MetricSums(), MetricSums()
    a.add_mean("x", torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    b.add_mean("x", torch.tensor([4.0]), torch.tensor([True]))
    b.add_max("y", torch.tensor([4.0]), torch.tensor([True]))
    a += b
    assert a.reduce() == {"x": pytest.approx(7 / 3), "y": 4.0}
