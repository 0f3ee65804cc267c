"""train/step.py on one gloo rank: opsd and rlsd steps against an fp64 Hugging Face reference.

What the step must wire right for each algorithm, checked here: which weights the teacher pass uses
(opsd: the frozen initial policy; rlsd: the policy at the start of the step), on which prompt (the
teacher's), at which temperature (opsd: its own; rlsd: the rollout's), and the step's loss value.
The first mini-batch runs at the initial weights, so its ratio is 1 and the loss is a closed form
of log-probs the reference computes independently in fp64.
"""

import math

import pytest
import torch
from steplib import fixed_responses, hf_token_stats, step_context

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

T = 0.9  # rollout temperature
# fp32 trainer vs fp64 reference: log-probs agree to ~1e-6 on this 2-layer model; the losses are O(1).
TOL = dict(rel=1e-4, abs=1e-5)


def _run(rank, world_size, hf_dir, name, overrides):
    from sdpg_mcore import algo
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.metrics_log import PhaseTimer
    from sdpg_mcore.train.model_setup import build_policy
    from sdpg_mcore.train.step import _logprob_passes, _micro_batches, run_step

    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    policy = build_policy(
        hf_dir,
        layout,
        dtype=torch.float32,
        optim=OptimizerConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0),
        total_updates=2,
        vocab_size=301,
        chunk_size=16,
    )
    cfg = algo.get_algorithm(name).config_cls(**overrides)
    # One mini-batch: the loss is computed at the initial weights.
    ctx = step_context(policy, hf_dir, layout, cfg, temperature=T, mini_batch_groups=4, total_steps=10)
    responses = fixed_responses()
    mbs = _micro_batches(ctx, responses, [[0, 1, 2, 3]])
    before = _logprob_passes(ctx, responses, mbs, PhaseTimer())
    metrics = run_step(ctx, 1, responses)
    after = _logprob_passes(ctx, responses, mbs, PhaseTimer())
    state.destroy()
    return metrics, before, after


def _advantages(responses):
    from sdpg_mcore.algo import grpo_advantages

    rewards = torch.tensor([r.reward for r in responses], dtype=torch.float64)
    return grpo_advantages(rewards, torch.tensor([r.group for r in responses]))


def _rows(per_row, responses):
    return [per_row[i] for i in range(len(responses))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


def test_opsd_step_uses_the_frozen_teacher_at_its_own_temperature(hf_dir):
    teacher_t = 0.7
    metrics, before, after = spawn_ranks(_run, 1, args=(hf_dir, "opsd", {"teacher_temperature": teacher_t}))[
        0
    ]
    responses = fixed_responses()
    student = hf_token_stats(hf_dir, responses, teacher=False, temperature=T)
    teacher = hf_token_stats(hf_dir, responses, teacher=True, temperature=teacher_t)
    for got, (want, _) in zip(_rows(before["teacher"], responses), teacher):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    for got, (want, _) in zip(_rows(after["teacher"], responses), teacher):  # still the initial policy
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(_rows(after["old"], responses), _rows(before["old"], responses))
    )
    assert moved > 1e-3  # the policy did train; the teacher did not follow it
    # loss = -mean_{tokens of A>0} clamp(lp_teacher - lp_old, 0, 20) - 0.02 * mean_{all tokens} entropy
    adv = _advantages(responses)
    w = [torch.clamp(t[0] - s[0], 0, 20) for t, s in zip(teacher, student)]
    positive = torch.cat([w_i for w_i, a in zip(w, adv) if a > 0])
    entropy = torch.cat([s[1] for s in student])
    expected = -positive.mean().item() - 0.02 * entropy.mean().item()
    assert metrics["loss"] == pytest.approx(expected, **TOL)
    assert metrics["entropy"] == pytest.approx(entropy.mean().item(), **TOL)


def test_rlsd_step_uses_the_step_start_policy_at_rollout_temperature(hf_dir):
    metrics, before, after = spawn_ranks(_run, 1, args=(hf_dir, "rlsd", {}))[0]
    responses = fixed_responses()
    student = hf_token_stats(hf_dir, responses, teacher=False, temperature=T)
    teacher = hf_token_stats(hf_dir, responses, teacher=True, temperature=T)
    for got, (want, _) in zip(_rows(before["teacher"], responses), teacher):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(_rows(after["teacher"], responses), _rows(before["teacher"], responses))
    )
    assert moved > 1e-3  # the next step's teacher is the trained policy
    # ratio 1: loss = token-mean of -A_t, A_t = (1 - lam) A + lam A clamp(w, 0.8, 1.2), lam = 0.5 (1 - 1/50)
    lam = 0.5 * (1 - 1 / 50)
    adv = _advantages(responses)
    terms = []
    for (lp_t, _), (lp_s, _), a in zip(teacher, student, adv.tolist()):
        delta = torch.clamp(lp_t - lp_s, -20, 20)
        w = torch.exp(torch.clamp(math.copysign(1.0, a) * delta if a else 0 * delta, -20, 20))
        terms.append(-((1 - lam) * a + lam * a * torch.clamp(w, 0.8, 1.2)))
    assert metrics["rlsd_lambda"] == pytest.approx(lam, rel=1e-12)
    assert metrics["loss"] == pytest.approx(torch.cat(terms).mean().item(), **TOL)


def _sdpg_step(rank, world_size, hf_dir, teacher_states):
    """One sdpg step (2 mini-batches of several micro-batches); metrics, the gradients of every
    optimizer step and the weights after it."""
    from sdpg_mcore import algo
    from sdpg_mcore.models.builder import unwrap_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import build_policy
    from sdpg_mcore.train.step import run_step

    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    from sdpg_mcore.config import OptimizerConfig

    optim = OptimizerConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0)
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=2, vocab_size=301, chunk_size=16
    )
    params = list(unwrap_model(policy.chunks[0]).named_parameters())
    grads, optimizer_step = [], policy.optimizer_step

    def recording_step():
        grads.append({name: p.main_grad.clone() for name, p in params})
        return optimizer_step()

    policy.optimizer_step = recording_step
    cfg = algo.SDPGConfig(beta=0.05, alpha=1e-2)
    ctx = step_context(
        policy, hf_dir, layout, cfg, temperature=T, total_steps=10, teacher_states=teacher_states
    )
    metrics = run_step(ctx, 1, fixed_responses())
    host_bytes = 0 if ctx.host_states is None else ctx.host_states.nbytes
    weights = {name: p.detach().clone() for name, p in params}
    state.destroy()
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}, grads, weights, host_bytes


def test_sdpg_teacher_states_on_the_host_change_no_bit(hf_dir):
    """``teacher_states=host`` (each micro-batch's teacher states through the host buffer and back)
    gives the very loss, metrics, gradients of both optimizer steps and weights of ``device``."""
    device = spawn_ranks(_sdpg_step, 1, args=(hf_dir, "device"))[0]
    host = spawn_ranks(_sdpg_step, 1, args=(hf_dir, "host"))[0]
    (m_dev, g_dev, w_dev, bytes_dev), (m_host, g_host, w_host, bytes_host) = device, host
    assert bytes_dev == 0 and bytes_host > 0  # the host path really ran
    assert m_host == m_dev and m_dev["num_updates"] == 2 and math.isfinite(m_dev["loss"])
    assert len(g_host) == len(g_dev) == 2
    for got, want in zip(g_host, g_dev):
        assert any(g.abs().max() > 0 for g in want.values())
        for name in want:
            assert torch.equal(got[name], want[name]), name
    for name in w_dev:
        assert torch.equal(w_host[name], w_dev[name]), name
