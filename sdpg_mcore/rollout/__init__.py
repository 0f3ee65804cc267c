"""Rollouts: SGLang HTTP client, server/router launcher, weight sync, and the built-in CPU dev server.

- ``client``: :class:`RolloutClient` — batched ``/generate`` (``n`` per prompt, seeds, retries,
  aborts, metrics) against the router or one server.
- ``servers``: :class:`RolloutServers` — start/supervise SGLang or dev servers behind ``sglang_router``.
- ``weight_sync``: :class:`DiskWeightSync`, :class:`DistributedWeightSync` — push HF-named tensors
  (``checkpoints_convert.model_io.iter_hf_tensors``) to the servers and check ``weight_version``.
- ``dev_server`` (+ ``engine``, ``scheduler``): ``python -m sdpg_mcore.rollout.dev_server``.
- ``protocol``: the JSON shapes of SDPG.md §7; ``dist_group``: the side process group for broadcasts.
"""

from sdpg_mcore.rollout.client import (
    ClientConfig,
    RolloutClient,
    RolloutError,
    RolloutMetrics,
    Sample,
    logprob_drift,
)
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig, ServerStartError
from sdpg_mcore.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    WeightSyncError,
    check_weight_versions,
)

__all__ = [
    "ClientConfig",
    "DiskWeightSync",
    "DistributedWeightSync",
    "RolloutClient",
    "RolloutError",
    "RolloutMetrics",
    "RolloutServers",
    "Sample",
    "SamplingParams",
    "ServerConfig",
    "ServerStartError",
    "WeightSyncError",
    "check_weight_versions",
    "logprob_drift",
]
