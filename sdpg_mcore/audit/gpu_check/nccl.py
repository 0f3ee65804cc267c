"""Stage ``nccl``: the trainer's process groups on the GPUs, before anything heavy uses them.

``spawn_ranks`` starts one rank per visible GPU (at most 8; two gloo ranks with ``--cpu``), bound the
trainer's way (``parallel.state.device_binding``: NCCL and ``set_device(local_rank)`` before the group
exists, ``device_id`` given). Each rank then goes through ``initialize_distributed`` on the existing
group (which must bind it again, not fall back to ``cuda:0``), Megatron's groups, an all-reduce of
device tensors, ``broadcast_object_list`` (the trainer's rollout broadcast) and a barrier.
:func:`judge` holds the results to what the binding promises; fixed, exact expectations.
"""

from __future__ import annotations

from sdpg_mcore.audit.gpu_check import common


def _rank(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from sdpg_mcore.parallel import state

    state.initialize_distributed()
    state.initialize_model_parallel(tp=world_size, pp=1, cp=1, seed=1)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    values = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(values)
    box = [{"from": 0, "words": ["a", "b"]}] if rank == 0 else [None]
    dist.broadcast_object_list(box)
    dist.barrier()
    state.destroy()
    return {
        "backend": dist.get_backend(),
        "device": str(device),
        "all_reduce": values.tolist(),
        "broadcast": box[0],
    }


def judge(results: list[dict], gpu_count: int) -> list[str]:
    """What each rank must report: NCCL on ``cuda:(rank % gpu_count)`` with GPUs (gloo on the host
    without), the exact all-reduce sum and the broadcast object."""
    from sdpg_mcore.parallel.state import device_binding

    world = len(results)
    total = float(world * (world + 1) // 2)
    problems = []
    for rank, out in enumerate(results):
        binding = device_binding(rank, gpu_count)
        device = f"cuda:{binding.device_index}" if binding.device_index is not None else "cpu"
        if out["backend"] != binding.backend:
            problems.append(f"rank {rank}: backend {out['backend']}, expected {binding.backend}")
        if out["device"] != device:
            problems.append(f"rank {rank}: bound to {out['device']}, expected {device}")
        if out["all_reduce"] != [total] * 4:
            problems.append(f"rank {rank}: all_reduce gave {out['all_reduce']}, expected {total}")
        if out["broadcast"] != {"from": 0, "words": ["a", "b"]}:
            problems.append(f"rank {rank}: broadcast_object_list gave {out['broadcast']!r}")
    return problems


def run(cpu: bool) -> dict:
    from sdpg_mcore.parallel.spawn import spawn_ranks
    from sdpg_mcore.parallel.state import visible_gpu_count

    gpus = 0 if cpu else visible_gpu_count()
    world = 2 if cpu else max(1, min(gpus, 8))
    with common.phase(f"spawn {world} rank(s), process groups, collectives"):
        results = spawn_ranks(_rank, world, timeout_s=common.stage_limit("nccl", cpu) - 10)
    problems = judge(results, gpus)
    return {"gpus": gpus, "world": world, "ranks": results, "problems": problems, "ok": not problems}
