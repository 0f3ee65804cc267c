"""Rollouts: SGLang HTTP client, server/router launcher, weight sync, and the built-in CPU dev server.

- ``client``: :class:`RolloutClient` — batched ``/generate`` (``n`` per prompt, seeds, retries,
  aborts, metrics) against the router or one server.
- ``servers``: :class:`RolloutServers` — start/supervise SGLang or dev servers behind ``sglang_router``.
- ``weight_sync``: :class:`WeightSync` and its backends (disk, distributed broadcast, colocated
  tensor handles) — push HF-named tensors to the servers, set and check ``weight_version``.
- ``sglang_launch``: real SGLang's command line (``--device cpu`` from ``.venv-sglang`` where there
  is no CUDA), minimum version and ``--dp-size`` checks; ``sglang_cpu_shim/``: its CPU start-up fixes.
- ``auth``: the run's API key (a 0600 file; ``Authorization: Bearer``); ``sglang_entry/``: starts
  SGLang and the router with it, off their command line.
- ``supervisor``: restarts a dead or stuck server, gives it the current weights, re-sends what it lost.
- ``http``: the one blocking HTTP helper (admin calls, launcher, weight sync).
- ``dev_server`` (+ ``engine``, ``scheduler``): ``python -m sdpg_mcore.rollout.dev_server``.
- ``protocol``: the JSON shapes of SGLang's HTTP API; ``dist_group``: the side process group for broadcasts.
"""

from sdpg_mcore.rollout.client import (
    ClientConfig,
    RolloutClient,
    RolloutError,
    RolloutMetrics,
    Sample,
)
from sdpg_mcore.rollout.protocol import SamplingParams
from sdpg_mcore.rollout.servers import MemoryOccupation, RolloutServers, ServerConfig, ServerStartError
from sdpg_mcore.rollout.sglang_launch import MIN_SGLANG_VERSION, SGLangServerError
from sdpg_mcore.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    TensorWeightSync,
    WeightSync,
    WeightSyncError,
    check_weight_versions,
    make_weight_sync,
)

__all__ = [
    "ClientConfig",
    "DiskWeightSync",
    "DistributedWeightSync",
    "MIN_SGLANG_VERSION",
    "MemoryOccupation",
    "RolloutClient",
    "RolloutError",
    "RolloutMetrics",
    "RolloutServers",
    "Sample",
    "SamplingParams",
    "ServerConfig",
    "SGLangServerError",
    "ServerStartError",
    "TensorWeightSync",
    "WeightSync",
    "WeightSyncError",
    "check_weight_versions",
    "make_weight_sync",
]
