"""Time of the step's bulk copies: new weights to the engines, reference weights in and out, and
(colocated frameworks that need the memory) the training state to host memory and back.

Weight sync moves the whole model in bf16 (``2 x parameters`` bytes) to every engine GPU — SGLang and
vLLM take full tensors on every TP rank and keep their own slice:

- ``broadcast`` (this project, ``rollout.weight_sync=distributed``): each pipeline stage's source rank
  all-gathers its stage over TP (NVLink) and broadcasts it in buckets to all engine GPUs. A pipelined
  broadcast runs at link speed however many receive, and every engine GPU receives the whole model
  over its NIC: ``2P / network``, overlapped with the trainer-side gathers.
- ``colocated_tensor`` (``weight_sync=tensor``): engines on the trainer's GPUs take tensor handles;
  only the pipeline stages on other nodes travel over the network.
- ``colocated_gather`` (NeMo-RL v0.3's refit): every GPU materialises the whole model tensor by tensor,
  an all-gather over TP then a broadcast over PP for each, one after the other; the engine then wakes
  (its weights come back from pinned host memory) and copies its slice.
- ``disk``: safetensors written by each stage's source and read by every engine, at network speed
  (a parallel filesystem on the same fabric).

Reference weights (``trainer.reference_weights=cpu_swap``) are exchanged with the live ones around the
reference pass: this project keeps them in one pinned buffer and copies both ways at once
(``pinned_exchange``: two exchanges of the rank's shard); NeMo-RL copies the live weights out, the
reference in and the live ones back, one way at a time (``pinned_copy``: its ``non_blocking``
device-to-host copies land in pinned blocks that torch's host allocator recycles step after step).
A guarded sdpg teacher (``algorithm.teacher=ema | initial``) swaps its weights in for every teacher
pass the same way, and an EMA teacher updates its average after every optimizer step
(:func:`teacher_swap_time`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpg_mcore.plan.compute_time import BF16, Machine
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.workload import Implementation, Rollout, TrainSettings

#: fp32 master weights and Adam's m and v per parameter (the distributed optimizer's state).
OPTIMIZER_STATE_BYTES = 12


@dataclass(frozen=True)
class SyncTime:
    """One weight push, by part."""

    gather: float
    """Trainer side: full tensors assembled from the TP (and, colocated_gather, PP) shards."""
    transfer: float
    """Bytes to the engines."""
    wake: float
    """Engine weights back from host memory (colocated engines that slept)."""

    @property
    def total(self) -> float:
        return self.gather + self.transfer + self.wake


def _tensors(shape: ModelShape) -> int:
    """Weight tensors of the HF model (the count of per-tensor collectives)."""
    per_layer = 9 + (2 if shape.qk_norm else 0) + (3 if shape.qkv_bias else 0)
    return shape.num_layers * per_layer + 3


def weight_sync_time(
    shape: ModelShape, layout: Layout, rollout: Rollout, impl: Implementation, m: Machine
) -> SyncTime:
    """One push of the whole model to every engine GPU (module docstring)."""
    full = BF16 * shape.num_hf_parameters()
    stage = full / layout.pp
    tp_gather = (layout.tp - 1) / layout.tp * stage / m.link(layout.tp) if layout.tp > 1 else 0.0
    network = m.hw.network_bytes_per_s * m.eff.link
    latency = _tensors(shape) * m.eff.collective_latency_s
    mode = impl.weight_sync
    if mode == "broadcast":
        buckets = stage / rollout.bucket_bytes
        transfer = full / network + buckets * m.eff.collective_latency_s
        return SyncTime(gather=max(0.0, tp_gather - transfer), transfer=transfer, wake=0.0)
    if mode == "disk":
        return SyncTime(gather=tp_gather, transfer=stage / network + full / network, wake=0.0)
    if mode == "colocated_tensor":
        remote = full * (layout.pp - 1) / layout.pp
        return SyncTime(gather=tp_gather + latency, transfer=remote / network + full / m.memory, wake=0.0)
    # colocated_gather: every tensor all-gathered over TP, then broadcast over PP, one after the other
    gather = (layout.tp - 1) / layout.tp * full / m.link(layout.tp) if layout.tp > 1 else 0.0
    pp_span = layout.tp * layout.cp * layout.dp * (layout.pp - 1) + 1
    broadcast = full / m.link(pp_span) if layout.pp > 1 else 0.0
    wake = full / rollout.tp / (m.hw.host_link_bytes_per_s * m.eff.link)
    return SyncTime(gather=gather + 2 * latency, transfer=broadcast + full / m.memory, wake=wake)


def reference_swap_time(shape: ModelShape, layout: Layout, impl: Implementation, m: Machine) -> float:
    """Reference weights in for the reference pass and the live ones back (module docstring)."""
    shard = BF16 * shape.rank_parameters(layout.tp, layout.pp)
    if impl.reference_swap == "pinned_exchange":
        return 2 * shard / (m.hw.host_link_bytes_per_s * m.eff.link)
    if impl.reference_swap == "pinned_copy":
        return 3 * shard / (m.hw.host_link_bytes_per_s * m.eff.link)
    return 0.0


def teacher_swap_time(
    shape: ModelShape, layout: Layout, settings: TrainSettings, impl: Implementation, m: Machine
) -> tuple[float, float]:
    """(per teacher pass, per optimizer step) seconds of a guarded teacher's weights (sdpg's
    ``algorithm.teacher``; ``train/ema_weights.py`` has the byte counts): ``initial`` swaps the
    reference weights in and out as the reference pass does; ``ema`` on the host moves 8 bytes per
    parameter over the host link for each swap and each update (fp32 average in, bf16 live weights
    out and back; fp32 average in and out), on the GPU its swap reads and writes ~14 bytes per
    parameter of device memory (live weights to a copy and back, the average cast in) and its
    ``lerp`` update ~10 (fp32 average read and written, bf16 weight read). ``policy``: none."""
    params = shape.rank_parameters(layout.tp, layout.pp)
    if settings.teacher_weights == "initial":
        return reference_swap_time(shape, layout, impl, m), 0.0
    if settings.teacher_weights != "ema":
        return 0.0, 0.0
    if settings.ema_weights_host:
        seconds = 8 * params / (m.hw.host_link_bytes_per_s * m.eff.link)
        return seconds, seconds
    return 14 * params / m.memory, 10 * params / m.memory


def training_state_bytes(shape: ModelShape, layout: Layout) -> tuple[float, float]:
    """Per GPU: (optimizer state shard, bf16 weights) that a colocated framework moves to the host."""
    params = shape.rank_parameters(layout.tp, layout.pp)
    return OPTIMIZER_STATE_BYTES * params / (layout.dp * layout.cp), BF16 * params


def offload_time(
    shape: ModelShape, layout: Layout, m: Machine, pinned_optimizer: bool = False
) -> tuple[float, float]:
    """(out, back): the training state to host memory before generation and back to the GPU before the
    trainer's passes. NeMo-RL's ``offload_before_refit`` frees the gradient buffers and moves the
    optimizer state with ``.to("cpu")`` (fresh pageable memory each step, ``.to("cuda")`` back);
    Megatron's ``offload_to_cpu`` copies the weights into a pinned buffer it keeps
    (``param_and_grad_buffer.py``). ``pinned_optimizer``: the optimizer states go through pinned
    buffers too (sdpg_mcore's ``train/colocate.py``)."""
    optimizer, weights = training_state_bytes(shape, layout)
    pinned = m.hw.host_link_bytes_per_s * m.eff.link
    seconds = optimizer / (pinned if pinned_optimizer else m.hw.pageable_copy_bytes_per_s) + weights / pinned
    return seconds, seconds
