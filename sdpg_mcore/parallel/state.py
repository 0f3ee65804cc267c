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
    return LaunchEnv(rank, world_size, local_rank, addr, port, source)


def initialize_distributed(timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise ``torch.distributed`` (nccl on GPU, gloo on CPU), or reuse it if already up.

    On GPU the process binds to ``cuda:LOCAL_RANK`` before the process group is created.
    """
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
        addr = os.environ.get("MASTER_ADDR", "")
        port = int(os.environ.get("MASTER_PORT", "0") or 0)
        return LaunchEnv(rank, world_size, local_rank, addr, port, "existing")
    launch = resolve_launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if launch.source == "single" and "MASTER_PORT" not in os.environ:
        # One process needs no rendezvous: an in-process store binds no port, so runs share a machine.
        rendezvous = dict(store=dist.HashStore())
    else:
        rendezvous = dict(init_method=f"tcp://{launch.master_addr}:{launch.master_port}")
    dist.init_process_group(
        backend,
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
