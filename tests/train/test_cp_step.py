"""One real training step (``train.step.run_step``: old/ref log-probs, teacher hidden states, fused KL
head, sdpg loss, two Megatron optimizer steps) at CP=2 on gloo ranks equals CP=1 (fp32): loss
metrics and every weight's update within the fp32 reordering bound of ``parity_bounds``."""

import pytest
import torch
from parity_bounds import assert_metric_close, assert_update_close, initial_weights, parity_adam
from steplib import step_context

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

COMPARED = ("loss", "pg_loss", "kl_mean", "entropy", "regulariser", "grad_norm", "logprob_mismatch")


def _responses(short: bool = False):
    """4 groups of 2 with different rewards; uneven lengths. ``short``: 2-token responses after long
    prompts, so at CP=2 every response token sits in the last chunk and CP rank 1 has none."""
    from sdpg_mcore.train.batch import Response

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        n = 2 if short else 3 + i % 4
        out.append(
            Response(
                group=i // 2,
                prompt_ids=torch.randint(5, 290, (14 if short else 4 + i % 3,), generator=g).tolist(),
                teacher_prompt_ids=torch.randint(5, 290, (14 if short else 6 + i % 4,), generator=g).tolist(),
                response_ids=torch.randint(5, 290, (n,), generator=g).tolist(),
                rollout_logprobs=(-torch.rand(n, generator=g)).tolist(),
                reward=float((i * 7) % 3 == 0),
                acc=float((i * 7) % 3 == 0),
            )
        )
    return out


def _one_step(rank, world_size, hf_dir, cp, agg_mode, tp=1, pp=1, short=False, teacher_states="device"):
    import torch.distributed as dist

    from sdpg_mcore import algo
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import build_policy
    from sdpg_mcore.train.step import run_step

    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=tp, pp=pp, cp=cp, seed=3)
    optim = parity_adam()
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=2, vocab_size=301, chunk_size=16
    )
    ctx = step_context(
        policy,
        hf_dir,
        layout,
        algo.SDPGConfig(beta=0.05, alpha=1e-2, loss_agg_mode=agg_mode),
        token_budget=48,
        teacher_states=teacher_states,
    )
    metrics = run_step(ctx, 1, _responses(short))
    from checkpoints_convert.model_io import iter_hf_tensors

    weights = {name: t.clone() for name, t in iter_hf_tensors(policy.chunks, hf_dir)}
    keep = layout.tp_rank == 0  # HF tensors are whole on TP rank 0 of each stage
    dist.barrier()
    state.destroy()
    return {k: metrics.get(k) for k in COMPARED}, weights if keep else {}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


@pytest.mark.parametrize(
    "agg_mode", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow)]
)
def test_cp2_step_matches_cp1(hf_dir, agg_mode):
    ref_metrics, ref_weights = spawn_ranks(_one_step, 1, args=(hf_dir, 1, agg_mode))[0]
    results = spawn_ranks(_one_step, 2, args=(hf_dir, 2, agg_mode))
    for metrics, weights in results:  # both CP ranks hold the same (synchronised) model
        _assert_same(metrics, weights, ref_metrics, ref_weights, hf_dir)


def test_cp_rank_without_response_tokens(hf_dir):
    ref_metrics, ref_weights = spawn_ranks(_one_step, 1, args=(hf_dir, 1, "token-mean", 1, 1, True))[0]
    results = spawn_ranks(_one_step, 2, args=(hf_dir, 2, "token-mean", 1, 1, True))
    for metrics, weights in results:
        _assert_same(metrics, weights, ref_metrics, ref_weights, hf_dir)


@pytest.mark.slow  # two 2-rank steps, ~33 s on 2 busy cores: -m slow
def test_cp2_teacher_states_on_the_host_change_no_bit(hf_dir):
    """Under CP each rank keeps its own ``[N_local, H]`` teacher states in the host buffer: the step
    equals the one that keeps them on the device, bit for bit, on both CP ranks."""
    device = spawn_ranks(_one_step, 2, args=(hf_dir, 2, "token-mean"))
    host = spawn_ranks(_one_step, 2, args=(hf_dir, 2, "token-mean", 1, 1, False, "host"))
    for (m_dev, w_dev), (m_host, w_host) in zip(device, host):
        assert m_host == m_dev
        assert set(w_host) == set(w_dev) and all(torch.equal(w_host[k], w_dev[k]) for k in w_dev)


@pytest.mark.slow  # 4 ranks, ~1-2 min on 2 busy cores: -m slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2cp2", "pp2cp2"])
def test_cp2_with_tp_or_pp_matches_cp1(hf_dir, tp, pp):
    ref_metrics, ref_weights = spawn_ranks(_one_step, 1, args=(hf_dir, 1, "token-mean"))[0]
    results = spawn_ranks(_one_step, 4, args=(hf_dir, 2, "token-mean", tp, pp))
    weights = {}
    for _, w in results:
        weights.update(w)
    _assert_same(results[0][0], weights, ref_metrics, ref_weights, hf_dir)


def _assert_same(metrics, weights, ref_metrics, ref_weights, hf_dir):
    assert set(weights) == set(ref_weights)
    for key in COMPARED:
        assert_metric_close(key, metrics[key], ref_metrics[key])
    initial = initial_weights(hf_dir)
    for name, ref in ref_weights.items():
        assert_update_close(name, weights[name], ref, initial[name])
