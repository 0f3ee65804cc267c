"""The five algorithms' losses vs per-token fp64 references written from ``sdpg_mcore/algo/README.md``, incl. gradients."""

import dataclasses
import math

import pytest
import torch

from sdpg_mcore.algo import (
    ALGORITHMS,
    DAPOConfig,
    GRPOConfig,
    OPSDConfig,
    RLSDConfig,
    SDPGConfig,
    TeacherSignal,
    TeacherWeights,
    TokenInputs,
    get_algorithm,
    loss_counts,
    micro_batch_loss,
    normalisers_from_counts,
)

LENGTHS = [4, 3, 5]
ADV_B = [1.3, -0.8, 0.6]


def _inputs(seed=0, adv_B=ADV_B, teacher_nan=False):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    seq_index = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 0.1
    lr = torch.randn(n, generator=gen, dtype=torch.float64) * 0.6
    lr[0], lr[5], lr[7] = 2.5, 3.0, -1.0  # a large ratio with A > 0, a dual-clipped A < 0, a low one
    lp = (old + lr).requires_grad_(True)
    kl = (torch.rand(n, generator=gen, dtype=torch.float64) * 3).requires_grad_(False)
    kl[2], kl[9] = 25.0, 40.0  # clamped tokens
    kl.requires_grad_(True)
    ent = (torch.rand(n, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    ref = old + torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    teacher = old + torch.randn(n, generator=gen, dtype=torch.float64)
    if teacher_nan:
        teacher[1] = float("nan")
    adv = torch.tensor(adv_B, dtype=torch.float64)[seq_index]
    return TokenInputs(
        logprob_N=lp,
        old_logprob_N=old,
        advantages_N=adv,
        seq_index_N=seq_index,
        num_seqs=len(LENGTHS),
        kl_N=kl,
        entropy_N=ent,
        ref_logprob_N=ref,
        teacher_logprob_N=teacher,
    )


def _run(name, cfg, inputs, step=3, total_steps=100):
    algo = get_algorithm(name)
    counts = loss_counts(algo, cfg, inputs.advantages_N, inputs.seq_index_N, inputs.num_seqs)
    norms = normalisers_from_counts(counts, cfg.loss_agg_mode)
    return micro_batch_loss(algo, cfg, inputs, norms, step=step, total_steps=total_steps)


def _pg_case(a, lp, old, el, eh, c):
    """Case form of dual-clip PPO on scalar tensors (branches on values; constants where clipped)."""
    x = (lp - old).item()
    r = (
        torch.exp(lp - old)
        if abs(x) <= 20
        else torch.tensor(math.exp(max(-20, min(20, x))), dtype=torch.float64)
    )
    rv = r.item()
    if a > 0:
        return -a * r if rv < 1 + eh else torch.tensor(-a * (1 + eh), dtype=torch.float64)
    if a < 0:
        if rv <= 1 - el:
            return torch.tensor(-a * (1 - el), dtype=torch.float64)
        return -a * r if rv < c else torch.tensor(-a * c, dtype=torch.float64)
    return torch.zeros((), dtype=torch.float64)


def _grads(inputs, loss):
    leaves = [inputs.logprob_N, inputs.kl_N, inputs.entropy_N]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _assert_same(inputs, got, want):
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-14)
    for g, w in zip(_grads(inputs, got), _grads(inputs, want)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha_mode", ["fkl", "rkl", "ufkl", "urkl"])
@pytest.mark.parametrize("gating", [False, True])
def test_sdpg_matches_spec(alpha_mode, gating):
    cfg = SDPGConfig(beta=0.3, alpha=0.05, alpha_mode=alpha_mode, positive_advantage_only=gating,
                     entropy_coef=0.01, beta_warmup_steps=10)  # fmt: skip
    inp = _inputs()
    out = _run("sdpg", cfg, inp, step=4)
    beta = 0.3 * 4 / 10
    terms = []
    for t in range(len(inp.logprob_N)):
        a, lp, old = inp.advantages_N[t].item(), inp.logprob_N[t], inp.old_logprob_N[t]
        pg = _pg_case(a, lp, old, 0.2, 0.28, 10.0)
        kl = inp.kl_N[t] if inp.kl_N[t].item() <= 20 else torch.tensor(20.0, dtype=torch.float64)
        g = 1.0 if (not gating or a > 0) else 0.0
        logw = lp - inp.ref_logprob_N[t]
        reg = {
            "fkl": torch.exp(-logw),
            "rkl": 0.5 * (logw + 1) ** 2,
            "ufkl": torch.exp(-logw) + logw,
            "urkl": 0.5 * logw**2,
        }[alpha_mode]
        terms.append(pg + beta * g * kl + 0.05 * reg - 0.01 * inp.entropy_N[t])
    want = torch.stack(terms).mean()
    assert out.scalars["beta"] == pytest.approx(beta)
    _assert_same(inp, out.loss, want)
    m = out.metrics.reduce()
    assert m["kl_max"] == 40.0 and m["kl_clamp_frac"] == pytest.approx(2 / 12)
    kl_c = inp.kl_N.detach().clamp(max=20)
    assert m["kl_mean"] == pytest.approx(kl_c.mean().item(), rel=1e-12)
    assert m["entropy"] == pytest.approx(inp.entropy_N.detach().mean().item(), rel=1e-12)
    assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-12)


@pytest.mark.parametrize("gating", [False, True])
def test_sdpg_distill_is_ratio_matches_the_papers_sg_rho(gating):
    """``distill_is_ratio``: each token's (gated, clamped) KL term times the constant
    ``exp(clamp(lp - lp_old, ±20))`` of its sampled token — the paper's SG[rho] — and nothing else changes."""
    cfg = SDPGConfig(beta=0.3, alpha=0.05, positive_advantage_only=gating, distill_is_ratio=True)
    inp = _inputs()
    with torch.no_grad():
        inp.logprob_N[3] = inp.old_logprob_N[3] + 24.0  # beyond the ±20 log-ratio guard (A > 0)
    out = _run("sdpg", cfg, inp, step=4)
    terms, rhos = [], []
    for t in range(len(inp.logprob_N)):
        a, lp, old = inp.advantages_N[t].item(), inp.logprob_N[t], inp.old_logprob_N[t]
        rho = math.exp(max(-20.0, min(20.0, (lp - old).item())))  # a Python float: no gradient
        kl = inp.kl_N[t] if inp.kl_N[t].item() <= 20 else torch.tensor(20.0, dtype=torch.float64)
        g = 1.0 if (not gating or a > 0) else 0.0
        logw = lp - inp.ref_logprob_N[t]
        terms.append(_pg_case(a, lp, old, 0.2, 0.28, 10.0) + 0.3 * g * rho * kl + 0.05 * 0.5 * logw**2)
        rhos += [rho] if g else []
    _assert_same(inp, out.loss, torch.stack(terms).mean())
    m = out.metrics.reduce()
    assert m["distill_is_ratio"] == pytest.approx(sum(rhos) / len(rhos), rel=1e-12)
    assert max(rhos) == pytest.approx(math.exp(20.0)) and min(rhos) < 0.5  # the guard and a down-weight ran


def test_distill_is_ratio_is_one_where_the_policy_is_the_old_one():
    """On a step's first mini-batch (lp = lp_old) the ratio is exactly 1: loss and gradients as without it."""
    base = _inputs()
    on_policy = TokenInputs(**{**base.__dict__, "logprob_N": base.old_logprob_N.clone().requires_grad_(True)})
    cfg = SDPGConfig(beta=0.3, alpha=0.05)
    with_ratio = _run("sdpg", dataclasses.replace(cfg, distill_is_ratio=True), on_policy).loss
    _assert_same(on_policy, with_ratio, _run("sdpg", cfg, on_policy).loss)


def test_kl_gradient_is_zero_where_clamped():
    inp = _inputs()
    out = _run("sdpg", SDPGConfig(beta=1.0, alpha=0.0), inp)
    (g_kl,) = torch.autograd.grad(out.loss, [inp.kl_N])
    assert g_kl[2].item() == 0.0 and g_kl[9].item() == 0.0
    assert g_kl[0].item() == pytest.approx(1.0 / 12)


@pytest.mark.parametrize("exclude", [False, True])
def test_kl_exclude_eos_skips_only_stop_tokens(exclude):
    """Stop tokens (last token of rows 0 and 2; row 1 was truncated) get no KL term and no KL gradient."""
    import dataclasses

    stop_N = torch.zeros(sum(LENGTHS), dtype=torch.bool)
    stop_N[[3, 11]] = True
    inp = dataclasses.replace(_inputs(), stop_token_N=stop_N)
    cfg = SDPGConfig(beta=1.0, alpha=0.0, kl_exclude_eos=exclude)
    out = _run("sdpg", cfg, inp)
    (g_kl,) = torch.autograd.grad(out.loss, [inp.kl_N], retain_graph=True)
    clamped = torch.zeros_like(stop_N)
    clamped[[2, 9]] = True
    gets_kl = ~clamped & ~(stop_N & exclude)
    assert torch.equal(g_kl != 0, gets_kl)
    assert torch.allclose(g_kl[gets_kl], torch.full_like(g_kl[gets_kl], 1.0 / 12), rtol=0, atol=1e-15)
    pg = torch.stack([_pg_case(inp.advantages_N[t].item(), inp.logprob_N[t], inp.old_logprob_N[t], 0.2, 0.28, 10.0)
                      for t in range(12)])  # fmt: skip
    kl_c = inp.kl_N.clamp(max=20.0)
    want = (pg + torch.where(stop_N & exclude, torch.zeros_like(kl_c), kl_c)).mean()
    _assert_same(inp, out.loss, want)
    assert SDPGConfig().kl_exclude_eos is False  # the paper's recipe


@pytest.mark.parametrize("name,cfg,el,eh,c", [
    ("dapo", DAPOConfig(), 0.2, 0.28, 10.0),
    ("grpo", GRPOConfig(), 0.2, 0.2, 1000.0),
])  # fmt: skip
def test_dapo_and_grpo_are_plain_dual_clip(name, cfg, el, eh, c):
    inp = _inputs()
    out = _run(name, cfg, inp)
    want = torch.stack(
        [
            _pg_case(inp.advantages_N[t].item(), inp.logprob_N[t], inp.old_logprob_N[t], el, eh, c)
            for t in range(12)
        ]
    ).mean()
    _assert_same(inp, out.loss, want)
    m = out.metrics.reduce()
    assert "kl_mean" not in m and "regulariser" not in m
    assert m["clipfrac_dual"] == pytest.approx((1 / 12) if name == "dapo" else 0.0)  # exp(3) > 10 with A < 0


def _naive_opsd(inp, coef=0.02, el=0.2, eh=0.2):
    terms = []
    for t in range(len(inp.logprob_N)):
        if inp.advantages_N[t].item() <= 0:
            continue
        d = (inp.teacher_logprob_N[t] - inp.old_logprob_N[t]).item()
        w = 0.0 if math.isnan(d) else min(max(d, 0.0), 20.0)
        r = torch.exp(inp.logprob_N[t] - inp.old_logprob_N[t])
        terms.append(-w * r if r.item() < 1 + eh else torch.tensor(-w * (1 + eh), dtype=torch.float64))
    pg = torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)
    return pg - coef * inp.entropy_N.mean()


def test_opsd_matches_spec_with_nan_teacher():
    inp = _inputs(teacher_nan=True)
    out = _run("opsd", OPSDConfig(), inp)
    assert torch.isfinite(out.loss)
    _assert_same(inp, out.loss, _naive_opsd(inp))
    m = out.metrics.reduce()
    assert m["opsd_gate_frac"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.02])
def test_opsd_without_positive_advantage_gives_zero_loss_and_gradient(entropy_coef):
    inp = _inputs(adv_B=[-1.0, 0.0, -0.5], teacher_nan=True)
    out = _run("opsd", OPSDConfig(entropy_coef=entropy_coef), inp)
    g_lp, _, g_ent = _grads(inp, out.loss)
    assert torch.equal(g_lp, torch.zeros_like(g_lp))  # exactly 0, not NaN
    if entropy_coef == 0.0:
        assert out.loss.item() == 0.0 and torch.equal(g_ent, torch.zeros_like(g_ent))
    else:  # the entropy bonus still covers every response token
        assert out.loss.item() == pytest.approx(-0.02 * inp.entropy_N.mean().item(), rel=1e-12)
    m = out.metrics.reduce()
    assert math.isnan(m["pg_loss"]) and m["opsd_gate_frac"] == 0.0


@pytest.mark.parametrize("step", [1, 20, 50, 77])
def test_rlsd_matches_spec(step):
    inp = _inputs(teacher_nan=True)
    out = _run("rlsd", RLSDConfig(), inp, step=step)
    lam = 0.5 * max(0.0, 1 - step / 50)
    terms = []
    for t in range(12):
        a = inp.advantages_N[t].item()
        d = (inp.teacher_logprob_N[t] - inp.old_logprob_N[t]).item()
        d = 0.0 if math.isnan(d) else min(max(d, -20.0), 20.0)
        s = (a > 0) - (a < 0)
        w = math.exp(min(max(s * d, -20.0), 20.0))
        a_t = (1 - lam) * a + lam * a * min(max(w, 0.8), 1.2)
        terms.append(_pg_case(a_t, inp.logprob_N[t], inp.old_logprob_N[t], 0.2, 0.2, 3.0))
    assert out.scalars["rlsd_lambda"] == pytest.approx(lam)
    _assert_same(inp, out.loss, torch.stack(terms).mean())


def test_registry_needs_and_errors():
    assert sorted(ALGORITHMS) == ["dapo", "grpo", "opsd", "rlsd", "sdpg"]
    sdpg = SDPGConfig().needs()
    assert (sdpg.teacher_weights, sdpg.teacher_signal, sdpg.teacher_temperature) == (
        TeacherWeights.CURRENT_POLICY, TeacherSignal.FULL_KL, 1.0)  # fmt: skip
    assert sdpg.ref_logprobs and SDPGConfig().beta == 1e-3 and SDPGConfig().alpha_mode == "urkl"
    assert SDPGConfig(beta=0.0).needs().teacher_weights == TeacherWeights.NONE
    grpo = GRPOConfig()
    assert grpo.needs().kl_in_reward_coef == 1e-3 and grpo.needs().ref_logprobs and grpo.clip_c == 1000.0
    opsd = OPSDConfig()
    assert opsd.needs().teacher_weights == TeacherWeights.FROZEN_REFERENCE
    assert opsd.entropy_coef == 0.02 and OPSDConfig(entropy_coef=0.0).entropy_coef == 0.0
    rlsd = RLSDConfig().needs()
    assert rlsd.teacher_weights == TeacherWeights.STEP_START_POLICY and rlsd.teacher_temperature is None
    assert DAPOConfig().needs().teacher_weights == TeacherWeights.NONE
    with pytest.raises(ValueError, match="algorithm='ppo'"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="alpha_mode"):
        SDPGConfig(alpha_mode="kl")
    with pytest.raises(ValueError, match="clip_c"):
        DAPOConfig(clip_c=0.5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOConfig(loss_agg_mode="token-sum")
    inp = _inputs()
    with pytest.raises(ValueError, match="needs a SDPGConfig"):
        _run("sdpg", DAPOConfig(), inp)
    with pytest.raises(ValueError, match="kl_N"):
        _run("sdpg", SDPGConfig(), TokenInputs(inp.logprob_N, inp.old_logprob_N, inp.advantages_N,
                                               inp.seq_index_N, 3, ref_logprob_N=inp.ref_logprob_N))  # fmt: skip


def test_rollout_mismatch_metric():
    inp = _inputs()
    rollout = inp.old_logprob_N + torch.linspace(-0.2, 0.3, 12, dtype=torch.float64)
    inp = TokenInputs(inp.logprob_N, inp.old_logprob_N, inp.advantages_N, inp.seq_index_N, 3,
                      rollout_logprob_N=rollout)  # fmt: skip
    m = _run("dapo", DAPOConfig(), inp).metrics.reduce()
    assert m["rollout_mismatch"] == pytest.approx(
        (rollout - inp.old_logprob_N).abs().mean().item(), rel=1e-12
    )


def test_fp32_end_to_end_with_fused_kl_head():
    """The trainer's path: ops.fused_kl_head's fp32 kl/logprob/entropy into the sdpg loss, grads to the head."""
    from sdpg_mcore.ops import fused_kl_head

    gen = torch.Generator().manual_seed(5)
    n, h, v = 9, 8, 13
    student = torch.randn(n, h, generator=gen, requires_grad=True)
    teacher = torch.randn(n, h, generator=gen)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen)
    kl, lp, ent = fused_kl_head(student, teacher, weight, targets, vocab_size=v, temperature=0.7)
    seq_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    inp = TokenInputs(lp, lp.detach() + 0.05, torch.tensor([1.0, -1.0, 0.5])[seq_index], seq_index, 3,
                      kl_N=kl, entropy_N=ent, ref_logprob_N=lp.detach() - 0.1)  # fmt: skip
    out = _run("sdpg", SDPGConfig(beta=0.5, entropy_coef=0.01), inp)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0


def _with_rollout(inp: TokenInputs, rollout_N: torch.Tensor) -> TokenInputs:
    from dataclasses import replace

    return replace(inp, rollout_logprob_N=rollout_N)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("sdpg", SDPGConfig(beta=0.3, alpha=0.05, rollout_is_cap=2.0)),
        ("dapo", DAPOConfig(rollout_is_cap=2.0)),
        ("grpo", GRPOConfig(rollout_is_cap=1.5)),
        ("rlsd", RLSDConfig(rollout_is_cap=2.0)),
        ("opsd", OPSDConfig(rollout_is_cap=2.0)),
    ],
)
def test_rollout_is_weights_only_the_policy_gradient_term(name, cfg):
    """``loss(cap) - loss(off)`` is ``(w - 1) * pg`` token by token, ``w = min(exp(lp_old - lp_rollout), cap)``
    in fp64; the KL, regulariser and entropy terms are not weighted; the metrics count the capped tokens."""
    from dataclasses import replace

    base = _inputs()
    shift_N = torch.linspace(-1.2, 0.9, len(base.logprob_N), dtype=torch.float64)  # a few over the cap
    inp = _with_rollout(base, base.old_logprob_N + shift_N)
    w_N = torch.exp(-shift_N).clamp(max=cfg.rollout_is_cap)
    weighted = _run(name, cfg, inp)
    plain = _run(name, replace(cfg, rollout_is_cap=0.0), inp)
    # The policy-gradient term alone, per token; token-mean aggregation is linear in it.
    pg_cfg = replace(cfg, rollout_is_cap=0.0, **_no_extra_terms(cfg))
    pg_N = get_algorithm(name).token_loss(inp, pg_cfg, step=3, total_steps=100)
    mask_N = pg_N.loss_mask_N
    extra = ((w_N - 1.0) * pg_N.loss_N * mask_N).sum() / mask_N.sum()
    assert cfg.loss_agg_mode == "token-mean"
    _assert_same(inp, weighted.loss, plain.loss + extra)
    m = weighted.metrics.reduce()
    sel = mask_N.bool()
    assert m["rollout_is_weight"] == pytest.approx(w_N[sel].mean().item(), rel=1e-12)
    capped = (torch.exp(-shift_N) > cfg.rollout_is_cap)[sel].double().mean().item()
    assert 0 < capped < 1 and m["rollout_is_capped_frac"] == pytest.approx(capped, rel=1e-12)


def _no_extra_terms(cfg) -> dict:
    """Config overrides that leave only the policy-gradient term (sdpg's KL and regulariser off)."""
    return {"beta": 0.0, "alpha": 0.0} if isinstance(cfg, SDPGConfig) else {}


def test_rollout_is_cap_default_follows_async_steps_and_rejects_caps_below_one():
    from sdpg_mcore.algo.config import AlgorithmConfigError
    from sdpg_mcore.config import Config, validate

    def resolved(async_steps: int, cap=None) -> float:
        cfg = Config()
        cfg.model.path, cfg.data.train_files = "m", ["d.jsonl"]
        cfg.rollout.async_steps = async_steps
        cfg.algorithm = SDPGConfig(rollout_is_cap=cap)
        return validate(cfg).algorithm.rollout_is_cap

    assert resolved(0) == 0.0 and resolved(1) == 2.0 and resolved(2) == 2.0
    assert resolved(1, cap=0.0) == 0.0 and resolved(0, cap=3.0) == 3.0  # explicit values stay
    with pytest.raises(AlgorithmConfigError, match="rollout_is_cap"):
        SDPGConfig(rollout_is_cap=0.5)
