"""Which GPUs of its node the SGLang servers the trainer launches use, and the check that keeps them
off the trainer's GPUs unless ``rollout.colocated``.

``rollout.backend=sglang`` launches the servers from trainer rank 0, on rank 0's node. Trainer local
rank r uses GPU ``r % gpu_count`` (``parallel.state.device_binding``), so the trainer holds the
first ``local_world_size`` GPUs; server i uses ``tp_size`` consecutive GPUs from
``base_gpu_id + i * tp_size`` (SGLang ``--base-gpu-id``). A server on a trainer GPU without
colocation (engines that never hand their memory back) runs both out of memory at the first
step, so :func:`place_servers` refuses it before start-up, naming the keys. Pure: the node's GPU
count is an input (``sdpg-train`` passes what CUDA shows; tests pass a simulated 8-GPU node).

    placement = place_servers(num_servers=2, tp_size=2, base_gpu_id=None, colocated=False,
                              local_world_size=4, gpu_count=8)
    placement.base_gpu_id   # 4: servers on GPUs 4,5 and 6,7
"""

from __future__ import annotations

from dataclasses import dataclass

COLOCATED_MEM_FRACTION = 0.5
"""``--mem-fraction-static`` of colocated servers when ``rollout.mem_fraction_static`` is unset:
the rest of each GPU holds the trainer's residue while it is offloaded (CUDA context, NCCL
buffers) and SGLang's own activations; verl's colocated default share. SGLang's default (about
0.9 on 80 GB GPUs) would leave the trainer nothing."""


class PlacementError(ValueError):
    """Servers and trainer ranks on the same GPU without colocation, or GPUs the node lacks; names the keys."""


@dataclass(frozen=True)
class ServerPlacement:
    """Where the launched servers run on rank 0's node (GPU indices as the trainer sees them)."""

    base_gpu_id: int
    """SGLang ``--base-gpu-id`` of server 0; server i starts at ``base_gpu_id + i * tp_size``."""
    server_gpus: tuple[tuple[int, ...], ...]
    """The GPUs of each server."""
    trainer_gpus: tuple[int, ...]
    """The GPUs the trainer's ranks on this node use."""
    mem_fraction_static: float | None
    """``--mem-fraction-static`` to pass (None: SGLang's default)."""


def trainer_gpus(local_world_size: int, gpu_count: int) -> tuple[int, ...]:
    """The GPUs of the trainer's ``local_world_size`` ranks on a node of ``gpu_count`` GPUs."""
    from sdpg_mcore.parallel.state import device_binding

    used = {device_binding(rank, gpu_count).device_index for rank in range(local_world_size)}
    return tuple(sorted(g for g in used if g is not None))


def place_servers(
    *,
    num_servers: int,
    tp_size: int,
    base_gpu_id: int | None,
    colocated: bool,
    local_world_size: int,
    gpu_count: int,
    mem_fraction_static: float | None = None,
) -> ServerPlacement:
    """The servers' GPUs on a node of ``gpu_count`` GPUs whose ``local_world_size`` trainer ranks run there.

    Raises :class:`PlacementError` (naming ``rollout.base_gpu_id``, ``rollout.num_servers``,
    ``rollout.tp_size`` and ``rollout.colocated``) when the servers need GPUs the node lacks, or,
    unless ``colocated``, a GPU a trainer rank uses.
    """
    if gpu_count < 1:
        raise ValueError("place_servers needs a node with GPUs (gpu_count >= 1)")
    trainer = trainer_gpus(local_world_size, gpu_count)
    needed = num_servers * tp_size
    if base_gpu_id is None:
        base_gpu_id = 0 if colocated else (max(trainer) + 1 if trainer else 0)
    if base_gpu_id + needed > gpu_count:
        free = _free_gpus(trainer, gpu_count)
        raise PlacementError(
            f"rollout.num_servers={num_servers} x rollout.tp_size={tp_size} servers need GPUs "
            f"{base_gpu_id}..{base_gpu_id + needed - 1} (rollout.base_gpu_id={base_gpu_id}), but this node "
            f"has {gpu_count} GPU(s), {len(trainer)} of them used by the trainer's ranks here "
            f"(free: {free or 'none'}). Launch fewer trainer ranks per node, fewer or smaller servers, "
            "set rollout.colocated=true (the engines then share the trainer's GPUs and release their "
            "memory while it trains), or run the servers elsewhere (rollout.backend=external)"
        )
    servers = tuple(
        tuple(range(base_gpu_id + i * tp_size, base_gpu_id + (i + 1) * tp_size)) for i in range(num_servers)
    )
    if not colocated:
        _refuse_shared(servers, trainer, base_gpu_id, gpu_count)
    fraction = mem_fraction_static
    if fraction is None and colocated:
        fraction = COLOCATED_MEM_FRACTION
    return ServerPlacement(base_gpu_id, servers, trainer, fraction)


def _free_gpus(trainer: tuple[int, ...], gpu_count: int) -> list[int]:
    return [g for g in range(gpu_count) if g not in trainer]


def _refuse_shared(servers, trainer: tuple[int, ...], base_gpu_id: int, gpu_count: int) -> None:
    for index, gpus in enumerate(servers):
        shared = sorted(set(gpus) & set(trainer))
        if shared:
            free = _free_gpus(trainer, gpu_count)
            raise PlacementError(
                f"rollout server {index} would run on GPU(s) {shared}, which trainer rank(s) on this "
                f"node use (the trainer uses GPUs {list(trainer)} of {gpu_count}; "
                f"rollout.base_gpu_id={base_gpu_id}); both would run out of memory at the first step. "
                f"Set rollout.base_gpu_id to a GPU no trainer rank uses (free: {free or 'none'}), or "
                "rollout.colocated=true to share the GPUs (the engines release their memory while the "
                "trainer trains)"
            )
