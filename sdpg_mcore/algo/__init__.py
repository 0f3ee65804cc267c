"""Pure loss library of SDPG and its baselines (``algo/README.md``): advantages, policy losses, schedules, aggregation, metrics.

Tensors in, tensors out; no process groups (``MetricSums.reduce`` takes one from the caller).
The trainer picks an algorithm from the registry and calls ``micro_batch_loss`` per micro-batch;
see ``registry.py`` for the call sequence and ``aggregation.py`` for the split-invariance convention.
"""

from sdpg_mcore.algo.advantages import (
    GroupFilter,
    broadcast_to_tokens,
    dapo_group_filter,
    grpo_advantages,
    kl_in_reward,
)
from sdpg_mcore.algo.aggregation import (
    LOSS_AGG_MODES,
    LossNormalisers,
    Normaliser,
    aggregate,
    local_counts,
    normalisers_from_counts,
    seq_token_counts,
)
from sdpg_mcore.algo.config import (
    AlgorithmConfigError,
    AlgorithmNeeds,
    DAPOConfig,
    GRPOConfig,
    OPSDConfig,
    PolicyLossConfig,
    RLSDConfig,
    SDPGConfig,
    TeacherSignal,
    TeacherWeights,
)
from sdpg_mcore.algo.losses import TokenInputs, TokenLoss
from sdpg_mcore.algo.metrics import MetricSums
from sdpg_mcore.algo.policy import ALPHA_MODES, PGTerms, alpha_regulariser, clamp_kl, dual_clip_pg, ppo_ratio
from sdpg_mcore.algo.registry import (
    ALGORITHMS,
    Algorithm,
    MicroBatchLoss,
    algorithm_of,
    get_algorithm,
    loss_counts,
    micro_batch_loss,
    register_algorithm,
    seq_counts,
)
from sdpg_mcore.algo.schedules import beta_schedule, rlsd_lambda

__all__ = [
    "ALGORITHMS",
    "ALPHA_MODES",
    "LOSS_AGG_MODES",
    "Algorithm",
    "AlgorithmConfigError",
    "AlgorithmNeeds",
    "DAPOConfig",
    "GRPOConfig",
    "GroupFilter",
    "LossNormalisers",
    "MetricSums",
    "MicroBatchLoss",
    "Normaliser",
    "OPSDConfig",
    "PGTerms",
    "PolicyLossConfig",
    "RLSDConfig",
    "SDPGConfig",
    "TeacherSignal",
    "TeacherWeights",
    "TokenInputs",
    "TokenLoss",
    "aggregate",
    "algorithm_of",
    "alpha_regulariser",
    "beta_schedule",
    "broadcast_to_tokens",
    "clamp_kl",
    "dapo_group_filter",
    "dual_clip_pg",
    "get_algorithm",
    "grpo_advantages",
    "kl_in_reward",
    "local_counts",
    "loss_counts",
    "micro_batch_loss",
    "normalisers_from_counts",
    "ppo_ratio",
    "register_algorithm",
    "rlsd_lambda",
    "seq_counts",
    "seq_token_counts",
]
