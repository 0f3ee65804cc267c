"""Per-token losses of the five algorithms: sdpg, grpo, dapo, opsd, rlsd (``algo/README.md``).

Each loss function maps one micro-batch's per-token inputs (:class:`TokenInputs`, flat ``[N]``
over its response tokens) to a per-token loss, the mask of tokens that the loss averages over,
and per-token metrics as sums (:class:`MetricSums`). Aggregation and the entropy bonus are added
by ``registry.micro_batch_loss``; nothing here knows about micro-batch counts or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from sdpg_mcore.algo.aggregation import seq_token_counts
from sdpg_mcore.algo.config import (
    DAPOConfig,
    GRPOConfig,
    OPSDConfig,
    PolicyLossConfig,
    RLSDConfig,
    SDPGConfig,
)
from sdpg_mcore.algo.metrics import MetricSums
from sdpg_mcore.algo.policy import (
    LOG_RATIO_CLAMP,
    PGTerms,
    alpha_regulariser,
    clamp_kl,
    dual_clip_pg,
    rollout_is_weight,
)
from sdpg_mcore.algo.schedules import beta_schedule, rlsd_lambda


@dataclass(frozen=True)
class TokenInputs:
    """Per-token tensors of one micro-batch, flat over its tokens ``[N]`` (response tokens, packed)."""

    logprob_N: Tensor
    """Student ``log π_θ(y_t)`` at rollout temperature, with grad (``ops.fused_kl_head``'s logprob)."""
    old_logprob_N: Tensor
    """``log π_old(y_t)`` recomputed by the trainer at rollout temperature (no grad)."""
    advantages_N: Tensor
    """Sequence advantage broadcast to tokens (``advantages.broadcast_to_tokens``)."""
    seq_index_N: Tensor
    """int64: row (0 .. num_seqs-1) of the micro-batch each token belongs to."""
    num_seqs: int
    """Rows (responses) in the micro-batch, including any with no token here."""
    response_mask_N: Tensor | None = None
    """bool: real response tokens (False = padding); ``None`` = all tokens are real."""
    kl_N: Tensor | None = None
    """Unclamped per-token reverse KL(student ‖ teacher), with grad (sdpg)."""
    entropy_N: Tensor | None = None
    """Student entropy per token (with grad when the entropy coefficient is non-zero)."""
    ref_logprob_N: Tensor | None = None
    """``log π_ref(y_t)`` of the frozen initial policy (sdpg's alpha term)."""
    teacher_logprob_N: Tensor | None = None
    """Teacher log-prob of the sampled token (opsd: frozen reference; rlsd: step-start policy)."""
    rollout_logprob_N: Tensor | None = None
    """Rollout engine's log-prob of the token: the ``rollout_mismatch`` metric ``|lp_rollout - lp_old|``
    and, with ``rollout_is_cap``, the truncated importance weight of the policy-gradient term."""
    stop_token_N: Tensor | None = None
    """bool: the token that ended its response (a stop token; False on truncated responses), for
    ``kl_exclude_eos``; ``None`` = no token is a stop token."""
    seq_loss_tokens_S: Tensor | None = None
    """Optional global loss-mask tokens per row (CP-reduced) for ``seq-mean-token-mean``."""
    seq_response_tokens_S: Tensor | None = None
    """Optional global response tokens per row (CP-reduced) for ``seq-mean-token-mean``."""

    @property
    def mask_N(self) -> Tensor:
        if self.response_mask_N is None:
            return torch.ones_like(self.logprob_N, dtype=torch.bool)
        return self.response_mask_N.bool()

    def require(self, name: str, algorithm: str, why: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"algorithm {algorithm!r} needs TokenInputs.{name} ({why})")
        return value


@dataclass
class TokenLoss:
    """Per-token result of an algorithm's loss on one micro-batch."""

    loss_N: Tensor
    """Per-token loss (everything except the entropy bonus), with grad."""
    loss_mask_N: Tensor
    """bool: the tokens ``loss_N`` is averaged over."""
    metrics: MetricSums = field(default_factory=MetricSums)
    """Per-token metric sums over this micro-batch."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Step-level coefficients used (beta, lambda) for logging."""


def response_loss_mask(cfg: PolicyLossConfig, advantages_N: Tensor, response_mask_N: Tensor) -> Tensor:
    """Default loss mask: every response token."""
    return response_mask_N.bool()


def positive_advantage_loss_mask(
    cfg: PolicyLossConfig, advantages_N: Tensor, response_mask_N: Tensor
) -> Tensor:
    """opsd: only tokens of responses with A > 0 (the reference's reward gate)."""
    return response_mask_N.bool() & (advantages_N.detach() > 0)


def add_pg_metrics(metrics: MetricSums, terms: PGTerms, inputs: TokenInputs, mask_N: Tensor) -> None:
    """PPO metrics shared by the dual-clip algorithms, as sums over ``mask_N``."""
    metrics.add_mean("pg_loss", terms.loss_N.detach(), mask_N)
    metrics.add_mean("clipfrac_low", terms.clipped_low_N, mask_N)
    metrics.add_mean("clipfrac_high", terms.clipped_high_N, mask_N)
    metrics.add_mean("clipfrac_dual", terms.clipped_dual_N, mask_N)
    add_ratio_metrics(metrics, terms.ratio_N, inputs, mask_N)


def add_ratio_metrics(metrics: MetricSums, ratio_N: Tensor, inputs: TokenInputs, mask_N: Tensor) -> None:
    metrics.add_mean("ratio_mean", ratio_N, mask_N)
    metrics.add_max("ratio_max", ratio_N, mask_N)
    metrics.add_min("ratio_min", ratio_N, mask_N)
    metrics.add_mean("ppo_kl", inputs.old_logprob_N.detach() - inputs.logprob_N.detach(), mask_N)


def rollout_is(
    inputs: TokenInputs, cfg: PolicyLossConfig, metrics: MetricSums, mask_N: Tensor
) -> Tensor | float:
    """The per-token weight of the policy-gradient term (``PolicyLossConfig.rollout_is_cap``; 1 when off)."""
    if not cfg.rollout_is_cap:
        return 1.0
    rollout_N = inputs.require("rollout_logprob_N", "rollout_is_cap", "the rollout engine's log-probs")
    w_N, capped_N = rollout_is_weight(inputs.old_logprob_N, rollout_N, cfg.rollout_is_cap)
    metrics.add_mean("rollout_is_weight", w_N, mask_N)
    metrics.add_mean("rollout_is_capped_frac", capped_N, mask_N)
    return w_N


def _pg(inputs: TokenInputs, cfg: PolicyLossConfig, advantages_N: Tensor, metrics: MetricSums) -> PGTerms:
    """Dual-clip PPO per token, weighted by :func:`rollout_is`, and its metrics over the response tokens."""
    terms = dual_clip_pg(
        inputs.logprob_N,
        inputs.old_logprob_N,
        advantages_N,
        eps_low=cfg.clip_eps_low,
        eps_high=cfg.clip_eps_high,
        clip_c=cfg.clip_c,
    )
    terms = replace(terms, loss_N=terms.loss_N * rollout_is(inputs, cfg, metrics, inputs.mask_N))
    add_pg_metrics(metrics, terms, inputs, inputs.mask_N)
    return terms


def sdpg_loss(inputs: TokenInputs, cfg: SDPGConfig, *, step: int, total_steps: int) -> TokenLoss:
    """``pg + beta(step) * g_t * [SG(rho_t)] * min(kl, 20) + alpha * R(lp - lp_ref)`` per token (``algo/README.md``).

    ``SG(rho_t)`` only with ``cfg.distill_is_ratio`` — where the paper and the reference code differ.
    The paper (Appendix A.3) writes the distillation term as an expectation over the current
    student's own samples, estimated on the rollout's samples with the stop-gradient importance
    ratio ``rho_t = pi_theta(y_t) / pi_old(y_t)`` of each sampled token (the PPO ratio, detached,
    ``exp(clamp(lp - lp_old, ±20))``; not clipped: the formula has ``SG[rho]`` alone). The reference
    code leaves the ratio out, and so does the default. The two agree on a step's first mini-batch
    (``pi_theta = pi_old``: ``rho = 1`` up to the two passes' rounding); on later mini-batches the
    ratio up-weights the KL of tokens the step's updates made more likely. Its gradient is the
    KL's, scaled (no term through ``rho``).
    """
    mask_N = inputs.mask_N
    metrics = MetricSums()
    terms = _pg(inputs, cfg, inputs.advantages_N, metrics)
    loss_N = terms.loss_N
    beta = beta_schedule(
        cfg.beta,
        step,
        warmup_steps=cfg.beta_warmup_steps,
        decay_steps=cfg.beta_decay_steps,
        total_steps=total_steps,
    )
    if cfg.beta != 0.0:
        kl_N = inputs.require("kl_N", "sdpg", "reverse KL from ops.fused_kl_head; beta != 0")
        kl_c_N = clamp_kl(kl_N, cfg.kl_clamp)
        gate_N = mask_N & (inputs.advantages_N.detach() > 0) if cfg.positive_advantage_only else mask_N
        if cfg.kl_exclude_eos and inputs.stop_token_N is not None:
            gate_N = gate_N & ~inputs.stop_token_N.bool()
        distill_N = torch.where(gate_N, kl_c_N, torch.zeros_like(kl_c_N))
        if cfg.distill_is_ratio:
            distill_N = distill_N * terms.ratio_N  # detached by dual_clip_pg: SG(rho)
            metrics.add_mean("distill_is_ratio", terms.ratio_N, gate_N)
        loss_N = loss_N + beta * distill_N
        metrics.add_mean("kl_mean", kl_c_N.detach(), mask_N)
        metrics.add_max("kl_max", kl_N.detach(), mask_N)
        metrics.add_mean("kl_clamp_frac", kl_N.detach() > cfg.kl_clamp, mask_N)
        metrics.add_mean("kl_gate_frac", gate_N, mask_N)
    if cfg.alpha != 0.0:
        ref_N = inputs.require("ref_logprob_N", "sdpg", "reference log-probs for the alpha term; alpha != 0")
        reg_N = alpha_regulariser(inputs.logprob_N, ref_N, cfg.alpha_mode)
        loss_N = loss_N + cfg.alpha * reg_N
        metrics.add_mean("regulariser", reg_N.detach(), mask_N)
        metrics.add_mean("logw_mean", inputs.logprob_N.detach() - ref_N.detach(), mask_N)
    return TokenLoss(loss_N, mask_N, metrics, {"beta": beta})


def dapo_loss(inputs: TokenInputs, cfg: DAPOConfig, *, step: int, total_steps: int) -> TokenLoss:
    """Dual-clip PPO only (clip 0.2/0.28, c = 10)."""
    metrics = MetricSums()
    terms = _pg(inputs, cfg, inputs.advantages_N, metrics)
    return TokenLoss(terms.loss_N, inputs.mask_N, metrics)


def grpo_loss(inputs: TokenInputs, cfg: GRPOConfig, *, step: int, total_steps: int) -> TokenLoss:
    """PPO clip 0.2/0.2 (c = 1000); the reference KL lives in the rewards (``advantages.kl_in_reward``)."""
    return dapo_loss(inputs, cfg, step=step, total_steps=total_steps)


def opsd_loss(inputs: TokenInputs, cfg: OPSDConfig, *, step: int, total_steps: int) -> TokenLoss:
    """``-w * min(r, clamp(r, 1 - eps_low, 1 + eps_high))`` on responses with A > 0 (``algo/README.md``, the baselines).

    ``w = clamp(nan_to_num(lp_teacher - lp_old), 0, 20)`` (no grad) and
    ``r = nan_to_num(exp(clamp(lp - lp_old, ±20)), 1)``. Tokens outside the gate contribute exactly 0
    with 0 gradient, so a micro-batch (or mini-batch) without a positive advantage gives 0, not NaN.
    """
    teacher_N = inputs.require("teacher_logprob_N", "opsd", "frozen-reference teacher log-probs")
    mask_N = positive_advantage_loss_mask(cfg, inputs.advantages_N, inputs.mask_N)
    old_N = inputs.old_logprob_N.detach()
    w_N = torch.nan_to_num(teacher_N.detach() - old_N, nan=0.0).clamp(0.0, cfg.weight_clamp_max)
    log_ratio_N = torch.clamp(inputs.logprob_N - old_N, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r_N = torch.nan_to_num(torch.exp(log_ratio_N), nan=1.0)
    metrics = MetricSums()
    is_N = rollout_is(inputs, cfg, metrics, mask_N)
    loss_N = (
        -w_N * is_N * torch.minimum(r_N, torch.clamp(r_N, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high))
    )
    metrics.add_mean("pg_loss", loss_N.detach(), mask_N)
    metrics.add_mean("opsd_weight", w_N, mask_N)
    metrics.add_mean("clipfrac_high", r_N.detach() > 1.0 + cfg.clip_eps_high, mask_N)
    add_ratio_metrics(metrics, r_N.detach(), inputs, mask_N)
    resp_rows_S = seq_token_counts(inputs.mask_N, inputs.seq_index_N, inputs.num_seqs) > 0
    gate_rows_S = seq_token_counts(mask_N, inputs.seq_index_N, inputs.num_seqs) > 0
    metrics.add_ratio("opsd_gate_frac", gate_rows_S.sum(), resp_rows_S.sum())
    return TokenLoss(loss_N, mask_N, metrics)


def rlsd_loss(inputs: TokenInputs, cfg: RLSDConfig, *, step: int, total_steps: int) -> TokenLoss:
    """Dual-clip PPO (0.2/0.2, c = 3) on RLSD's per-token advantage ``A_t`` (``algo/README.md``, the baselines).

    ``δ = clamp(nan_to_num(lp_teacher - lp_old), ±20)``, ``w = exp(clamp(sign(A) δ, ±20))``,
    ``A_t = (1 - λ) A + λ A clamp(w, 1 - eps_w, 1 + eps_w)``; the dual clip applies where ``A_t < 0``.
    """
    teacher_N = inputs.require("teacher_logprob_N", "rlsd", "step-start teacher log-probs")
    mask_N = inputs.mask_N
    adv_N = inputs.advantages_N.detach()
    lam = rlsd_lambda(step, lambda_base=cfg.lambda_base, decay_steps=cfg.lambda_decay_steps)
    delta_N = torch.nan_to_num(teacher_N.detach() - inputs.old_logprob_N.detach(), nan=0.0).clamp(-20.0, 20.0)
    w_N = torch.exp((torch.sign(adv_N) * delta_N).clamp(-20.0, 20.0))
    w_clip_N = w_N.clamp(1.0 - cfg.eps_w, 1.0 + cfg.eps_w)
    adv_t_N = (1.0 - lam) * adv_N + lam * adv_N * w_clip_N
    metrics = MetricSums()
    terms = _pg(inputs, cfg, adv_t_N, metrics)
    metrics.add_mean("rlsd_delta", delta_N, mask_N)
    metrics.add_mean("rlsd_weight", w_N, mask_N)
    metrics.add_mean("rlsd_weight_clipfrac", (w_N < 1.0 - cfg.eps_w) | (w_N > 1.0 + cfg.eps_w), mask_N)
    metrics.add_mean("rlsd_advantage", adv_t_N, mask_N)
    return TokenLoss(terms.loss_N, mask_N, metrics, {"rlsd_lambda": lam})
