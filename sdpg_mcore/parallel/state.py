"""Process groups: torch.distributed from torchrun or Slurm, then Megatron's TP/PP/CP/DP groups.

One entry point per level, both safe to call in a process that ``spawn_ranks`` (or another
launcher) already initialised:

    from sdpg_mcore.parallel import state
    env = state.initialize_distributed()            # torchrun / Slurm / single process; gloo or nccl
    layout = state.initialize_model_parallel(tp=2, pp=2, cp=1, seed=1234)
    layout.dp, layout.tp_rank, ...                   # sizes and this rank's coordinates
    state.destroy()                                  # tests: tear Megatron's groups down again

On a machine without CUDA ``initialize_model_parallel`` applies the CPU compatibility layer
(``cpu_compat.apply_cpu_compat``) first, so everything built after it runs on gloo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sdpg_mcore.parallel.cpu_compat import apply_cpu_compat

#: Port used when neither MASTER_PORT nor a Slurm job id gives one (torchrun's default).
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int
    """Global rank (RANK or SLURM_PROCID)."""
    world_size: int
    """Number of processes (WORLD_SIZE or SLURM_NTASKS)."""
    local_rank: int
    """Rank on this node; selects the GPU (LOCAL_RANK or SLURM_LOCALID)."""
    master_addr: str
    """Rendezvous host (MASTER_ADDR, else the first host of SLURM_NODELIST)."""
    master_port: int
    """Rendezvous port (MASTER_PORT, else derived from SLURM_JOB_ID so jobs sharing a node differ)."""
    source: str
    """Which launcher the values came from: "torchrun", "slurm" or "single"."""
    local_world_size: int = 1
    """Ranks on this node (LOCAL_WORLD_SIZE, or this node's entry of SLURM_TASKS_PER_NODE): with the
    local rank, which of the node's GPUs the trainer uses (``device_binding``)."""


@dataclass(frozen=True)
class DeviceBinding:
    """The ``torch.distributed`` backend of one rank and the CUDA device it binds to."""

    backend: str
    """``nccl`` whenever the node shows a GPU, else ``gloo``."""
    device_index: int | None
    """``cuda:device_index`` for the rank's tensors and its NCCL communicators; None on the host."""


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron parallel sizes and this rank's coordinate along each."""

    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list ("gpu[003-005,010],login1" -> "gpu003").

    Uses ``scontrol show hostnames`` when it exists (it knows every syntax Slurm accepts) and a
    small parser of the common ``prefix[a-b,c]`` form otherwise.
    """
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        )
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if match is None:
        if not first:
            raise ValueError("SLURM_NODELIST is empty; set MASTER_ADDR to the rendezvous host")
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from ``SLURM_TASKS_PER_NODE`` (``"8(x4)"``, ``"2(x3),1"``), node ``node_id``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} is not Slurm's count(xN),... form")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _local_world_size(env: Mapping[str, str], source: str, world_size: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, Slurm's count for this node, else every rank."""
    if source == "torchrun" and "LOCAL_WORLD_SIZE" in env:
        return _int_env(env, "LOCAL_WORLD_SIZE")
    if source == "slurm" and "SLURM_TASKS_PER_NODE" in env:
        node_id = _int_env(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        return slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], node_id)
    return world_size


def resolve_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous address from torchrun, Slurm, or neither (one process).

    torchrun's variables win over Slurm's, so ``srun torchrun ...`` (one task per node, torchrun
    spawning the GPUs) uses torchrun's numbering.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        addr, source = env.get("MASTER_ADDR", "127.0.0.1"), "torchrun"
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_NODELIST" in env or "SLURM_JOB_NODELIST" in env:
            addr = first_slurm_host(env.get("SLURM_NODELIST") or env["SLURM_JOB_NODELIST"])
        else:
            raise ValueError("Slurm launch without MASTER_ADDR or SLURM_NODELIST; export MASTER_ADDR")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:
            port = (
                20000 + _int_env(env, "SLURM_JOB_ID") % 20000
                if "SLURM_JOB_ID" in env
                else DEFAULT_MASTER_PORT
            )
        source = "slurm"
    else:
        rank, world_size, local_rank, source = 0, 1, 0, "single"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size} (check the {source} launch)")
    local_world_size = _local_world_size(env, source, world_size)
    return LaunchEnv(rank, world_size, local_rank, addr, port, source, local_world_size)


def visible_gpu_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_binding(local_rank: int, gpu_count: int) -> DeviceBinding:
    """NCCL on ``cuda:(local_rank % gpu_count)`` whenever the node shows a GPU; gloo on the host otherwise.

    Pure, so the choice is tested for any node on a CPU machine. The modulo: a launcher that gives
    each task its own GPU (Slurm ``--gpus-per-task=1``, a per-task ``CUDA_VISIBLE_DEVICES``) shows
    every rank one device, index 0; a launcher that shows the node's GPUs to every rank
    (torchrun, ``srun --gpus-per-node``) puts local rank r on GPU r.
    """
    if local_rank < 0 or gpu_count < 0:
        raise ValueError(f"local_rank={local_rank} and gpu_count={gpu_count} must be >= 0")
    if gpu_count == 0:
        return DeviceBinding("gloo", None)
    return DeviceBinding("nccl", local_rank % gpu_count)


def init_process_group(
    binding: DeviceBinding, *, rank: int, world_size: int, timeout: timedelta, **rendezvous
) -> None:
    """Bind this process to its GPU (``set_device`` before any CUDA work or communicator), then create
    the default process group on ``binding.backend``.

    Every NCCL rank must know its device before the first collective: without ``set_device`` each
    one initialises its communicators (and ``barrier``'s tensor) on ``cuda:0``, so all ranks of a
    node share GPU 0. ``device_id`` also binds the group to that device up front.
    """
    device = None
    if binding.device_index is not None:
        torch.cuda.set_device(binding.device_index)
        device = torch.device("cuda", binding.device_index)
    dist.init_process_group(
        binding.backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device, **rendezvous
    )


def initialize_distributed(timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise ``torch.distributed`` (``device_binding``: nccl on a GPU, gloo on CPU), or reuse it.

    Either way the process is bound to its GPU: a group made by another launcher (``spawn_ranks``,
    a tool's own set-up) still gets ``set_device(local_rank)``, so no rank falls back to ``cuda:0``.
    """
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
        binding = device_binding(local_rank, visible_gpu_count())
        if binding.device_index is not None:
            torch.cuda.set_device(binding.device_index)
        addr = os.environ.get("MASTER_ADDR", "")
        port = int(os.environ.get("MASTER_PORT", "0") or 0)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return LaunchEnv(rank, world_size, local_rank, addr, port, "existing", local_world)
    launch = resolve_launch_env()
    if launch.source == "single" and "MASTER_PORT" not in os.environ:
        # One process needs no rendezvous: an in-process store binds no port, so runs share a machine.
        rendezvous = dict(store=dist.HashStore())
    else:
        rendezvous = dict(init_method=f"tcp://{launch.master_addr}:{launch.master_port}")
    init_process_group(
        device_binding(launch.local_rank, visible_gpu_count()),
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(minutes=timeout_minutes),
        **rendezvous,
    )
    return launch


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, *, seed: int = 1234) -> ParallelLayout:
    """Create Megatron's TP/PP/CP/DP groups and seed the RNGs; DP is what is left of the world.

    Seeds as Megatron's trainer does: the default generator gets ``seed + 100 * pp_rank`` (so
    pipeline stages initialise different layers differently) and the tensor-parallel RNG tracker
    derives its per-TP-rank states from the same value. Re-initialises if groups already exist.
    """
    from megatron.core import parallel_state, tensor_parallel

    for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if size < 1:
            raise ValueError(f"{name}={size}: parallel sizes must be >= 1")
    initialize_distributed()
    apply_cpu_compat()
    world_size = dist.get_world_size()
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            f"launch a multiple of {model_parallel} ranks or choose tp/pp/cp whose product divides {world_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    layout = current_layout()
    torch.manual_seed(seed + 100 * layout.pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * layout.pp_rank, force_reset_rng=True)
    return layout


def current_layout() -> ParallelLayout:
    """Sizes and coordinates of this rank in the groups ``initialize_model_parallel`` made."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy(*, process_group: bool = False) -> None:
    """Tear down Megatron's groups (and, if asked, torch.distributed); safe when nothing is up."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
