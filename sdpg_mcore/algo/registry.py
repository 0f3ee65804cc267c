"""The algorithm registry and the one call the trainer makes per micro-batch.

    cfg = SDPGConfig(beta=1e-3)                            # or load_config(...).algorithm
    algo = algorithm_of(cfg)                               # its registered Algorithm ("sdpg")
    needs = cfg.needs()                                    # which passes to run (teacher, reference)
    # once per mini-batch, before the forwards:
    counts = sum(loss_counts(algo, cfg, mb_adv_N, mb.seq_index_N, mb.num_rows) for mb in mbs)
    dist.all_reduce(counts, group=dp_cp_group)
    norms = normalisers_from_counts(counts, cfg.loss_agg_mode, mini_batch_rows=..., dp_size=G)
    # per micro-batch, inside Megatron's loss_func:
    out = micro_batch_loss(algo, cfg, inputs, norms, step=step, total_steps=N)
    return out.loss, ...                                   # calculate_per_token_loss: no rescaling
    acc += out.metrics                                     # acc.reduce(dp_cp_group) at the end

The sum of ``out.loss`` over all micro-batches and ranks is the mini-batch loss (aggregation.py);
the model runs with ``calculate_per_token_loss=True``, so Megatron neither divides it by the number
of micro-batches nor averages gradients over DP (``train/forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdpg_mcore.algo.aggregation import LossNormalisers, aggregate, local_counts, seq_token_counts
from sdpg_mcore.algo.config import (
    DAPOConfig,
    GRPOConfig,
    OPSDConfig,
    PolicyLossConfig,
    RLSDConfig,
    SDPGConfig,
)
from sdpg_mcore.algo.losses import (
    TokenInputs,
    TokenLoss,
    dapo_loss,
    grpo_loss,
    opsd_loss,
    positive_advantage_loss_mask,
    response_loss_mask,
    rlsd_loss,
    sdpg_loss,
)
from sdpg_mcore.algo.metrics import MetricSums

TokenLossFn = Callable[..., TokenLoss]
LossMaskFn = Callable[[PolicyLossConfig, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm: its config type, per-token loss and loss mask."""

    name: str
    """Registry key (the ``algorithm`` config value)."""
    config_cls: type[PolicyLossConfig]
    """Typed config with the algorithm's defaults; ``config_cls().needs()`` says which passes to run."""
    token_loss: TokenLossFn
    """``token_loss(inputs, cfg, *, step, total_steps) -> TokenLoss``."""
    loss_mask: LossMaskFn = field(default=response_loss_mask)
    """``loss_mask(cfg, advantages_N, response_mask_N)``: tokens the loss averages over (known before the forward)."""


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm; a name, and a config class, can be registered once (the class names it)."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    if any(a.config_cls is algorithm.config_cls for a in ALGORITHMS.values()):
        raise ValueError(f"{algorithm.config_cls.__name__} already belongs to another algorithm")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``; ``ValueError`` lists the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm={name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithm_of(cfg: PolicyLossConfig) -> Algorithm:
    """The registered algorithm whose config class ``cfg`` is (a recipe's ``algorithm.name``)."""
    for algorithm in ALGORITHMS.values():
        if type(cfg) is algorithm.config_cls:
            return algorithm
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered algorithm")


register_algorithm(Algorithm("sdpg", SDPGConfig, sdpg_loss))
register_algorithm(Algorithm("grpo", GRPOConfig, grpo_loss))
register_algorithm(Algorithm("dapo", DAPOConfig, dapo_loss))
register_algorithm(Algorithm("opsd", OPSDConfig, opsd_loss, positive_advantage_loss_mask))
register_algorithm(Algorithm("rlsd", RLSDConfig, rlsd_loss))


def loss_counts(
    algorithm: Algorithm,
    cfg: PolicyLossConfig,
    advantages_N: Tensor,
    seq_index_N: Tensor,
    num_seqs: int,
    response_mask_N: Tensor | None = None,
    *,
    seq_owner: bool = True,
) -> Tensor:
    """``aggregation.local_counts`` of one micro-batch for this algorithm's loss mask (``[4]`` float64)."""
    resp_N = (
        advantages_N.new_ones(advantages_N.shape, dtype=bool)
        if response_mask_N is None
        else response_mask_N.bool()
    )
    loss_N = algorithm.loss_mask(cfg, advantages_N, resp_N)
    return local_counts(loss_N, resp_N, seq_index_N, num_seqs, seq_owner=seq_owner)


def seq_counts(
    algorithm: Algorithm,
    cfg: PolicyLossConfig,
    advantages_N: Tensor,
    seq_index_N: Tensor,
    num_seqs: int,
    response_mask_N: Tensor | None = None,
) -> Tensor:
    """``[2, num_seqs]`` float64: loss-mask and response tokens per row of this micro-batch on this rank.

    Only needed for ``seq-mean-token-mean`` under context parallelism: all-reduce it over the CP
    group and pass the rows as ``TokenInputs.seq_loss_tokens_S`` / ``seq_response_tokens_S``.
    """
    resp_N = (
        advantages_N.new_ones(advantages_N.shape, dtype=bool)
        if response_mask_N is None
        else response_mask_N.bool()
    )
    loss_N = algorithm.loss_mask(cfg, advantages_N, resp_N)
    return torch.stack(
        [seq_token_counts(loss_N, seq_index_N, num_seqs), seq_token_counts(resp_N, seq_index_N, num_seqs)]
    )


@dataclass
class MicroBatchLoss:
    """What :func:`micro_batch_loss` returns."""

    loss: Tensor
    """Scalar contribution with grad; summed over micro-batches and ranks it is the mini-batch loss."""
    metrics: MetricSums
    """Per-token metric sums plus totals ``loss``, ``policy_loss`` (and ``entropy_bonus``)."""
    scalars: dict[str, float]
    """Step-level coefficients (``beta``, ``rlsd_lambda``)."""


def micro_batch_loss(
    algorithm: Algorithm,
    cfg: PolicyLossConfig,
    inputs: TokenInputs,
    norms: LossNormalisers,
    *,
    step: int,
    total_steps: int = 0,
) -> MicroBatchLoss:
    """``aggregate(loss over loss mask) - entropy_coef * aggregate(entropy over response tokens)``.

    ``step`` is the 1-based global step (beta and lambda schedules), ``total_steps`` the run's N.
    """
    if not isinstance(cfg, algorithm.config_cls):
        raise ValueError(
            f"algorithm {algorithm.name!r} needs a {algorithm.config_cls.__name__}, got {type(cfg).__name__}"
        )
    if norms.loss.mode != cfg.loss_agg_mode:
        raise ValueError(
            f"normalisers were built for loss_agg_mode={norms.loss.mode!r} but the config says {cfg.loss_agg_mode!r}"
        )
    token_loss = algorithm.token_loss(inputs, cfg, step=step, total_steps=total_steps)
    policy = aggregate(
        token_loss.loss_N,
        token_loss.loss_mask_N,
        inputs.seq_index_N,
        inputs.num_seqs,
        norms.loss,
        seq_num_tokens_S=inputs.seq_loss_tokens_S,
    )
    total = policy
    metrics = token_loss.metrics
    if cfg.entropy_coef != 0.0:
        entropy_N = inputs.require("entropy_N", algorithm.name, f"entropy_coef={cfg.entropy_coef}")
        bonus = aggregate(
            entropy_N,
            inputs.mask_N,
            inputs.seq_index_N,
            inputs.num_seqs,
            norms.response,
            seq_num_tokens_S=inputs.seq_response_tokens_S,
        )
        total = policy - cfg.entropy_coef * bonus
        metrics.add_total("entropy_bonus", (cfg.entropy_coef * bonus).detach())
    if inputs.entropy_N is not None:
        metrics.add_mean("entropy", inputs.entropy_N.detach(), inputs.mask_N)
    if inputs.rollout_logprob_N is not None:
        gap_N = (inputs.rollout_logprob_N.detach() - inputs.old_logprob_N.detach()).abs()
        metrics.add_mean("rollout_mismatch", gap_N, inputs.mask_N)
    metrics.add_total("policy_loss", policy.detach())
    metrics.add_total("loss", total.detach())
    return MicroBatchLoss(total, metrics, dict(token_loss.scalars))
