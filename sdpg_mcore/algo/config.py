"""Typed settings of each algorithm (``algo/README.md``) and what each one asks of the trainer.

Every algorithm has a frozen config dataclass whose defaults are the paper / reference settings,
and ``needs()`` that returns :class:`AlgorithmNeeds`: which extra forward passes the trainer must
run (teacher from which weights, at which temperature; reference log-probs; KL in the reward).
The trainer reads that data instead of branching on the algorithm's name.

A recipe's ``algorithm:`` section parses straight into these classes (``sdpg_mcore/config.py``):
``name`` picks the registered algorithm (``registry.ALGORITHMS``), every other key is a field of its
config class, and ``__post_init__`` rejects bad values with :class:`AlgorithmConfigError` naming the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sdpg_mcore.algo.aggregation import LOSS_AGG_MODES
from sdpg_mcore.algo.policy import ALPHA_MODES


class AlgorithmConfigError(ValueError):
    """An invalid algorithm setting; ``key`` is the field (``algorithm.<key>`` in a recipe)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise AlgorithmConfigError(key, message)


class TeacherWeights(str, enum.Enum):
    """Which weights the teacher forward uses."""

    NONE = "none"
    """No teacher pass."""
    CURRENT_POLICY = "current_policy"
    """The policy's weights right now, i.e. after the earlier mini-batches of this step (sdpg)."""
    STEP_START_POLICY = "step_start_policy"
    """The policy at the start of the step — the weights of the old-log-prob pass (rlsd)."""
    FROZEN_REFERENCE = "frozen_reference"
    """The frozen initial policy — the weights of the reference-log-prob pass (opsd; sdpg with
    ``teacher=initial``)."""
    EMA_POLICY = "ema_policy"
    """An exponential moving average of the policy's weights, updated after every optimizer step
    (sdpg with ``teacher=ema``; ``train/ema_weights.py``)."""


TEACHERS: dict[str, TeacherWeights] = {
    "policy": TeacherWeights.CURRENT_POLICY,
    "ema": TeacherWeights.EMA_POLICY,
    "initial": TeacherWeights.FROZEN_REFERENCE,
}
"""sdpg's ``teacher`` choices and the weights each runs the teacher pass with."""


class TeacherSignal(str, enum.Enum):
    """What the loss consumes from the teacher pass."""

    NONE = "none"
    FULL_KL = "full_kl"
    """Teacher final hidden states per micro-batch, for ``ops.fused_kl_head``'s reverse KL ``kl_N``."""
    SAMPLED_LOGPROB = "sampled_logprob"
    """``teacher_logprob_N``: log-prob of the sampled response token; no grad, computed once per step."""


@dataclass(frozen=True)
class AlgorithmNeeds:
    """What the trainer must compute for an algorithm, besides student log-probs and old log-probs."""

    teacher_weights: TeacherWeights
    """Weights of the teacher forward (``NONE``: no teacher pass)."""
    teacher_signal: TeacherSignal
    """Full-vocabulary KL per micro-batch, or the sampled token's log-prob."""
    teacher_temperature: float | None
    """Temperature of the teacher logits; ``None`` means the rollout temperature (resolved once, by the step)."""
    teacher_prompt: bool
    """The teacher sees the privileged-context prompt (data must carry it, ``data/README.md``)."""
    ref_logprobs: bool
    """``ref_logprob_N`` from the frozen initial policy, at rollout temperature."""
    kl_in_reward_coef: float
    """> 0: penalise rewards with ``coef * sum k1`` (``advantages.kl_in_reward``) before advantages."""
    ema_decay: float = 0.0
    """``TeacherWeights.EMA_POLICY``: the average's decay per optimizer step (0 otherwise)."""


@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """Settings shared by every algorithm; subclasses change the defaults."""

    clip_eps_low: float = 0.2
    """PPO lower clip: ratio below ``1 - clip_eps_low`` gets no gradient where A < 0."""
    clip_eps_high: float = 0.28
    """PPO upper clip (DAPO clip-higher): ratio above ``1 + clip_eps_high`` gets no gradient where A > 0."""
    clip_c: float = 10.0
    """Dual clip: where A < 0 the loss is at most ``-A * clip_c``; 1000 switches it off in practice."""
    entropy_coef: float = 0.0
    """Entropy bonus: ``loss -= entropy_coef * entropy`` (averaged over all response tokens); 0 = off."""
    loss_agg_mode: str = "token-mean"
    """How per-token losses are averaged: one of ``aggregation.LOSS_AGG_MODES``."""
    rollout_is_cap: float | None = None
    """Truncated importance weight ``min(pi_old / pi_rollout, cap)`` on each token's policy-gradient
    term (``policy.rollout_is_weight``): corrects for tokens sampled by other weights than the
    trainer's old policy (AReaL's decoupled PPO, verl/slime TIS). None (default): 2.0 when rollouts are
    asynchronous (``rollout.async_steps > 0``, samples up to k versions stale), 0 = off when
    synchronous (the paper's recipe; the weight is then 1 up to engine/trainer numerics)."""

    def __post_init__(self) -> None:
        _check(
            self.rollout_is_cap is None or self.rollout_is_cap == 0.0 or self.rollout_is_cap >= 1.0,
            "rollout_is_cap",
            f"must be 0 (off) or >= 1 (a cap below 1 would down-weight on-policy tokens), got {self.rollout_is_cap}",
        )
        _check(0.0 <= self.clip_eps_low < 1.0, "clip_eps_low", f"must be in [0, 1), got {self.clip_eps_low}")
        _check(self.clip_eps_high >= 0.0, "clip_eps_high", f"must be >= 0, got {self.clip_eps_high}")
        _check(self.clip_c > 1.0, "clip_c", f"must be > 1 (dual-clip bound), got {self.clip_c}")
        _check(self.entropy_coef >= 0.0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _check(
            self.loss_agg_mode in LOSS_AGG_MODES,
            "loss_agg_mode",
            f"got {self.loss_agg_mode!r}; choose one of: {', '.join(LOSS_AGG_MODES)}",
        )

    def needs(self) -> AlgorithmNeeds:
        """No teacher, no reference: plain policy gradient."""
        return AlgorithmNeeds(TeacherWeights.NONE, TeacherSignal.NONE, None, False, False, 0.0)


@dataclass(frozen=True, kw_only=True)
class SDPGConfig(PolicyLossConfig):
    """SDPG (``algo/README.md``): dual-clip PPO + beta * reverse KL to the self-teacher + alpha * R(logw)."""

    beta: float = 1e-3
    """Weight of the per-token reverse KL to the teacher (paper script; the reference yaml says 1e-4)."""
    alpha: float = 1e-3
    """Weight of the regulariser ``R(lp - lp_ref)`` anchoring to the reference policy."""
    alpha_mode: str = "urkl"
    """Regulariser ``R``: fkl ``1/w``, rkl ``½(logw+1)²``, ufkl ``1/w + logw``, urkl ``½ logw²``."""
    beta_warmup_steps: int = 0
    """W: beta rises linearly over the first W steps (0 = off)."""
    beta_decay_steps: int = 0
    """D: beta falls linearly to 0 over the last D of the run's steps (0 = off)."""
    positive_advantage_only: bool = False
    """Apply the KL term only on tokens with A > 0 (reference ``beta_distill_positive_advantage_only``)."""
    kl_clamp: float = 20.0
    """One-sided per-token clamp of the KL; no gradient where it is active."""
    kl_exclude_eos: bool = False
    """Skip the KL term on each response's stop token (the reference's open PR #3,
    ``beta_distill_exclude_eos``: on Qwen3-1.7B the EOS token carries 2.5x the mean per-token KL and
    pulls the student away from stopping). Off: the paper's recipe."""
    teacher: str = "policy"
    """Weights of the teacher pass, a guard against the self-teacher eroding as the student's updates
    move it: ``policy`` (the paper: the current weights, those after the earlier mini-batches of the
    step), ``ema`` (an exponential moving average of the policy's weights, ``teacher_ema_decay``;
    where it lives: ``trainer.ema_weights``), ``initial`` (the frozen starting weights, kept as the
    reference policy is: ``trainer.reference_weights``). The teacher's output layer is the same
    weights' (the fused head multiplies the teacher states by it, not by the student's)."""
    teacher_ema_decay: float = 0.99
    """``teacher=ema``: ``ema <- decay * ema + (1 - decay) * weights`` after every optimizer step
    (``data.batch_prompts / data.mini_batch_prompts`` per training step), starting from the initial
    weights; the teacher then lags the policy by about ``1 / (1 - decay)`` updates."""
    distill_is_ratio: bool = False
    """Weight each token's KL term by the stop-gradient importance ratio ``SG[pi_theta / pi_old]`` of
    its sampled token, as the paper's Appendix A.3 writes the loss; the reference code has no such
    weight (off: as the code). ``losses.sdpg_loss`` says what it changes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.alpha_mode in ALPHA_MODES,
            "alpha_mode",
            f"got {self.alpha_mode!r}; choose one of: {', '.join(ALPHA_MODES)}",
        )
        _check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        _check(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        _check(
            self.beta_warmup_steps >= 0, "beta_warmup_steps", f"must be >= 0, got {self.beta_warmup_steps}"
        )
        _check(self.beta_decay_steps >= 0, "beta_decay_steps", f"must be >= 0, got {self.beta_decay_steps}")
        _check(self.kl_clamp > 0, "kl_clamp", f"must be > 0, got {self.kl_clamp}")
        _check(
            self.teacher in TEACHERS, "teacher", f"got {self.teacher!r}; choose one of: {', '.join(TEACHERS)}"
        )
        _check(
            0.0 < self.teacher_ema_decay < 1.0,
            "teacher_ema_decay",
            f"must be in (0, 1) (0 would copy the policy, 1 freeze the start: teacher=policy or initial), "
            f"got {self.teacher_ema_decay}",
        )

    def needs(self) -> AlgorithmNeeds:
        """Teacher = ``TEACHERS[teacher]`` on the teacher prompt, untempered (T_teacher = 1), full KL."""
        teacher = self.beta != 0.0
        weights = TEACHERS[self.teacher]
        return AlgorithmNeeds(
            teacher_weights=weights if teacher else TeacherWeights.NONE,
            teacher_signal=TeacherSignal.FULL_KL if teacher else TeacherSignal.NONE,
            teacher_temperature=1.0 if teacher else None,
            teacher_prompt=teacher,
            ref_logprobs=self.alpha != 0.0,
            kl_in_reward_coef=0.0,
            ema_decay=self.teacher_ema_decay if teacher and weights is TeacherWeights.EMA_POLICY else 0.0,
        )


@dataclass(frozen=True, kw_only=True)
class DAPOConfig(PolicyLossConfig):
    """DAPO (``algo/README.md``, the baselines): the §3 dual-clip PPO loss without the beta and alpha terms."""


@dataclass(frozen=True, kw_only=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO (the reference's script): PPO clip 0.2/0.2, no dual clip, KL to the reference in the reward."""

    clip_eps_high: float = 0.2
    """Symmetric clip (no clip-higher)."""
    clip_c: float = 1000.0
    """Dual clip effectively off."""
    kl_penalty_coef: float = 1e-3
    """Coefficient of the ``k1 = lp_old - lp_ref`` reward penalty (DeepSeekMath used 0.04)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.kl_penalty_coef >= 0, "kl_penalty_coef", f"must be >= 0, got {self.kl_penalty_coef}")

    def needs(self) -> AlgorithmNeeds:
        """Reference log-probs (and old log-probs) before the advantages, for the reward penalty."""
        on = self.kl_penalty_coef != 0.0
        return AlgorithmNeeds(TeacherWeights.NONE, TeacherSignal.NONE, None, False, on, self.kl_penalty_coef)


@dataclass(frozen=True, kw_only=True)
class OPSDConfig(PolicyLossConfig):
    """OPSD (``algo/README.md``, the baselines): teacher-weighted clipped ratio on responses with A > 0, frozen-reference teacher."""

    clip_eps_high: float = 0.2
    """Upper clip of ``min(r, clamp(r, 1 - eps_low, 1 + eps_high))``."""
    clip_c: float = 1000.0
    """Not used by the opsd loss (it has no dual clip); kept at the reference's "off" value."""
    entropy_coef: float = 0.02
    """The reference script's entropy bonus (keeps rollout groups diverse); 0 turns it off.
    The reference script also uses lr 5e-7 (``optimizer.lr``)."""
    teacher_temperature: float = 1.0
    """Temperature of the frozen reference teacher's log-probs (its own, not the rollout's)."""
    weight_clamp_max: float = 20.0
    """``w = clamp(nan_to_num(lp_teacher - lp_old), 0, weight_clamp_max)``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.teacher_temperature > 0,
            "teacher_temperature",
            f"must be > 0, got {self.teacher_temperature}",
        )
        _check(self.weight_clamp_max > 0, "weight_clamp_max", f"must be > 0, got {self.weight_clamp_max}")

    def needs(self) -> AlgorithmNeeds:
        return AlgorithmNeeds(
            teacher_weights=TeacherWeights.FROZEN_REFERENCE,
            teacher_signal=TeacherSignal.SAMPLED_LOGPROB,
            teacher_temperature=self.teacher_temperature,
            teacher_prompt=True,
            ref_logprobs=False,
            kl_in_reward_coef=0.0,
        )


@dataclass(frozen=True, kw_only=True)
class RLSDConfig(PolicyLossConfig):
    """RLSD (``algo/README.md``, the baselines): GRPO advantages re-weighted per token by the step-start self-teacher."""

    clip_eps_high: float = 0.2
    """Symmetric clip."""
    clip_c: float = 3.0
    """Dual clip bound of the reference."""
    lambda_base: float = 0.5
    """Mixing weight at step 0: ``A_t = (1 - λ) A + λ A clamp(w, 1 - eps_w, 1 + eps_w)``."""
    lambda_decay_steps: int = 50
    """λ = lambda_base · max(0, 1 - step / lambda_decay_steps) (0 = constant λ)."""
    eps_w: float = 0.2
    """Clip of the evidence weight ``w``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.lambda_base <= 1.0, "lambda_base", f"must be in [0, 1], got {self.lambda_base}")
        _check(
            self.lambda_decay_steps >= 0, "lambda_decay_steps", f"must be >= 0, got {self.lambda_decay_steps}"
        )
        _check(0.0 <= self.eps_w < 1.0, "eps_w", f"must be in [0, 1), got {self.eps_w}")

    def needs(self) -> AlgorithmNeeds:
        """Teacher = the step-start policy at rollout temperature: run it with the old-log-prob pass."""
        return AlgorithmNeeds(
            teacher_weights=TeacherWeights.STEP_START_POLICY,
            teacher_signal=TeacherSignal.SAMPLED_LOGPROB,
            teacher_temperature=None,
            teacher_prompt=True,
            ref_logprobs=False,
            kl_in_reward_coef=0.0,
        )
