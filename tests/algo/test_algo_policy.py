"""Dual-clip PPO, the KL clamp and the four alpha modes against hand-written fp64 formulas and gradients."""

import math

import pytest
import torch

from sdpg_mcore.algo import ALPHA_MODES, alpha_regulariser, clamp_kl, dual_clip_pg

EPS_LOW, EPS_HIGH, CLIP_C = 0.2, 0.28, 10.0


def _piecewise_pg(a, log_ratio):
    """PPO in its case form: A > 0: -A min(r, 1+eh); A < 0: |A| min(max(r, 1-el), c). Returns (loss, dloss/dlp)."""
    clamped = abs(log_ratio) > 20.0
    r = math.exp(max(-20.0, min(20.0, log_ratio)))
    if a > 0:
        loss = -a * min(r, 1 + EPS_HIGH)
        grad = -a * r if r < 1 + EPS_HIGH else 0.0
    elif a < 0:
        loss = -a * min(max(r, 1 - EPS_LOW), CLIP_C)
        grad = -a * r if 1 - EPS_LOW < r < CLIP_C else 0.0
    else:
        loss, grad = 0.0, 0.0
    return loss, (0.0 if clamped else grad)


def _grid():
    # log-ratios around every region boundary (never exactly on one) and beyond the ±20 clamp
    log_ratios = [-25.0, -3.0, math.log(0.7), math.log(0.79), math.log(0.81), 0.0, math.log(1.1)]
    log_ratios += [math.log(1.27), math.log(1.29), math.log(3.0), math.log(9.9), math.log(10.1), 5.0, 21.0]
    advs = [-2.0, -0.3, 0.0, 0.4, 1.7]
    pairs = [(a, lr) for a in advs for lr in log_ratios]
    return pairs


def test_dual_clip_values_and_gradients_match_case_form():
    pairs = _grid()
    adv = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    old = torch.linspace(-4.0, -0.5, len(pairs), dtype=torch.float64)
    lp = (old + torch.tensor([lr for _, lr in pairs], dtype=torch.float64)).requires_grad_(True)
    terms = dual_clip_pg(lp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, clip_c=CLIP_C)
    terms.loss_N.sum().backward()
    want = [_piecewise_pg(a, lr) for a, lr in pairs]
    torch.testing.assert_close(terms.loss_N.detach(), torch.tensor([w[0] for w in want], dtype=torch.float64))
    torch.testing.assert_close(lp.grad, torch.tensor([w[1] for w in want], dtype=torch.float64))


def test_clip_fraction_masks_match_regions():
    pairs = _grid()
    adv = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    lr = torch.tensor([x for _, x in pairs], dtype=torch.float64)
    terms = dual_clip_pg(lr, torch.zeros_like(lr), adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, clip_c=CLIP_C)
    for i, (a, x) in enumerate(pairs):
        r = math.exp(max(-20, min(20, x)))
        assert terms.clipped_low_N[i].item() == (a < 0 and r < 1 - EPS_LOW)
        assert terms.clipped_high_N[i].item() == (a > 0 and r > 1 + EPS_HIGH)
        assert terms.clipped_dual_N[i].item() == (a < 0 and r > CLIP_C)


def test_dual_clip_off_with_large_c_is_vanilla_ppo():
    lp = torch.tensor([math.log(50.0)], dtype=torch.float64, requires_grad=True)
    terms = dual_clip_pg(lp, torch.zeros(1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                         eps_low=0.2, eps_high=0.2, clip_c=1000.0)  # fmt: skip
    terms.loss_N.sum().backward()
    assert terms.loss_N.item() == pytest.approx(50.0)
    assert lp.grad.item() == pytest.approx(50.0)


def test_kl_clamp_is_one_sided_with_zero_gradient_where_active():
    kl = torch.tensor([0.0, 3.0, 19.5, 20.5, 100.0], dtype=torch.float64, requires_grad=True)
    out = clamp_kl(kl)
    out.sum().backward()
    assert out.tolist() == [0.0, 3.0, 19.5, 20.0, 20.0]
    assert kl.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


_ALPHA_REF = {  # (R(logw), dR/dlogw) written from the R definitions in algo/README.md, with w = exp(logw)
    "fkl": (lambda x: 1 / math.exp(x), lambda x: -1 / math.exp(x)),
    "rkl": (lambda x: 0.5 * (x + 1) ** 2, lambda x: x + 1),
    "ufkl": (lambda x: 1 / math.exp(x) + x, lambda x: 1 - 1 / math.exp(x)),
    "urkl": (lambda x: 0.5 * x * x, lambda x: x),
}


@pytest.mark.parametrize("mode", sorted(ALPHA_MODES))
def test_alpha_modes_values_and_gradients(mode):
    logw = [-30.0, -2.5, -0.1, 0.0, 0.3, 4.0, 25.0]  # not clamped: large |logw| must pass through
    ref = torch.full((len(logw),), -1.5, dtype=torch.float64)
    lp = (ref + torch.tensor(logw, dtype=torch.float64)).requires_grad_(True)
    out = alpha_regulariser(lp, ref, mode)
    out.sum().backward()
    value, grad = _ALPHA_REF[mode]
    torch.testing.assert_close(out.detach(), torch.tensor([value(x) for x in logw], dtype=torch.float64))
    torch.testing.assert_close(lp.grad, torch.tensor([grad(x) for x in logw], dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda t: alpha_regulariser(t, ref[:3], mode), (lp.detach()[1:4].clone().requires_grad_(),)
    )


def test_alpha_mode_unknown_is_value_error():
    with pytest.raises(ValueError, match="alpha_mode"):
        alpha_regulariser(torch.zeros(1), torch.zeros(1), "kl")
