"""Time of the trainer's passes over Megatron's TP/PP/CP/DP layout: FLOPs, bytes and messages.

A pass runs ``m`` micro-batches through ``pp`` pipeline stages. Per micro-batch a stage computes its
layers (matmuls ``2 x parameters`` FLOPs per token forward, attention ``4 x q_width x context``) and
communicates: tensor parallelism moves ``4 x (tp - 1)/tp x tokens x hidden`` bf16 values per layer
forward (two all-reduces, or with sequence parallelism two all-gathers and two reduce-scatters: the same
bytes) over NVLink, not overlapped (Megatron's default); context parallelism rings K and V around the
CP group behind the attention compute; stages hand activations to the next one. The last stage also
runs the LM head: ``2 x V/tp x H`` FLOPs per matmul and token plus its elementwise bytes per (token,
vocabulary) pair, at memory speed. 1F1B keeps every stage busy except ``pp - 1`` micro-batch slots at
the start and end: the pipeline bubble. Backward costs twice the forward; full recompute adds a
forward (and its communication) again.

An optimizer step reduce-scatters the gradients over DP x CP and all-gathers the new weights (the
distributed optimizer), each hidden behind the last backward / first forward when the recipe overlaps
them, then streams Adam's fp32 states through memory.

Rank order is Megatron's ``tp-cp-dp-pp``: TP and CP neighbours are adjacent ranks, DP peers are
``tp x cp`` apart, pipeline stages ``tp x cp x dp`` apart; a group whose ranks span more than one node
talks over the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdpg_mcore.plan.hardware import Efficiency, Hardware
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape, padded_vocab_size

BF16 = 2
#: Adam with fp32 master weights, per local (DP-sharded) parameter: read grad, master, m, v (16 B),
#: write master, m, v (12 B), write the bf16 weight (2 B).
ADAM_BYTES_PER_PARAM = 30


@dataclass(frozen=True)
class Machine:
    """A device's rates with the efficiency applied, and the node size for link choice."""

    hw: Hardware
    eff: Efficiency
    gpus_per_node: int

    @property
    def flops(self) -> float:
        return self.hw.peak_flops * self.eff.gemm

    @property
    def memory(self) -> float:
        return self.hw.memory_bytes_per_s * self.eff.memory

    def link(self, span_ranks: int) -> float:
        """Bandwidth of a group whose ranks span ``span_ranks`` consecutive ranks."""
        raw = self.hw.nvlink_bytes_per_s if span_ranks <= self.gpus_per_node else self.hw.network_bytes_per_s
        return raw * self.eff.link

    def collective(self, bytes_per_gpu: float, span_ranks: int, calls: float = 1.0) -> float:
        """Seconds of ``calls`` collectives moving ``bytes_per_gpu`` in total over a group spanning ``span_ranks``."""
        return bytes_per_gpu / self.link(span_ranks) + calls * self.eff.collective_latency_s


@dataclass(frozen=True)
class PassSpec:
    """One pass over a rank's tokens."""

    tokens: float
    """Tokens the DP rank processes in this pass (all its micro-batches, before CP)."""
    budget: int
    """Token budget of one micro-batch."""
    context: float
    """Mean keys attended per token."""
    head_tokens: float = 0.0
    """Tokens at which the LM head runs (0: no head, e.g. the teacher pass)."""
    head_matmuls: int = 0
    head_bytes: float = 0.0
    """Elementwise bytes per (head token, vocabulary) pair."""
    backward: bool = False
    recompute: bool = False
    """Full recompute: the backward reruns each layer's forward (and its TP communication)."""


@dataclass(frozen=True)
class PassTime:
    """Seconds of one pass on the busiest (last) stage, by cause."""

    compute: float
    head: float
    tp_comm: float
    cp_comm: float
    pp_p2p: float
    bubble: float
    micro_batches: int

    @property
    def total(self) -> float:
        return self.compute + self.head + self.tp_comm + self.cp_comm + self.pp_p2p + self.bubble


def layer_flops_per_token(shape: ModelShape, context: float) -> float:
    """Forward FLOPs of one layer per token: matmuls and causal attention over ``context`` keys."""
    return 2 * shape.layer_sharded_parameters() + 4 * shape.q_width * context


def pass_time(shape: ModelShape, layout: Layout, spec: PassSpec, m: Machine) -> PassTime:
    """One pass (forward, or forward + backward) on the last pipeline stage."""
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    micro = max(1, math.ceil(spec.tokens / spec.budget))
    mb_tokens = spec.tokens / micro / cp  # per rank, after CP
    passes = 1 + (2 if spec.backward else 0) + (1 if spec.recompute else 0)  # forward-equivalents
    layers = shape.num_layers // pp
    attention = 4 * shape.q_width * spec.context / tp
    flops = mb_tokens * layers * (2 * shape.layer_sharded_parameters() / tp + attention)
    compute = passes * flops / m.flops
    comm_passes = 1 + (1 if spec.backward else 0) + (1 if spec.recompute else 0)
    tp_comm = 0.0
    if tp > 1:
        volume = 4 * (tp - 1) / tp * mb_tokens * shape.hidden_size * BF16
        tp_comm = comm_passes * layers * m.collective(volume, tp, calls=4)
    cp_comm = 0.0
    if cp > 1:  # each layer rings its K and V chunk over cp - 1 hops (dK, dV back in the backward),
        # behind the attention compute of the same layer
        kv = 2 * shape.kv_width / tp * mb_tokens * BF16 * (3 if spec.backward else 1)
        ring = m.collective((cp - 1) * kv, tp * cp, calls=cp - 1)
        cp_comm = layers * max(0.0, ring - passes * mb_tokens * attention / m.flops)
    p2p = 0.0
    if pp > 1:
        act = mb_tokens * shape.hidden_size * BF16 / (tp if tp > 1 else 1)
        p2p = (2 if spec.backward else 1) * m.collective(act, tp * cp * layout.dp + 1)
    head = _head_seconds(shape, tp, spec, micro, cp, m)
    per_mb_layers = compute + tp_comm + cp_comm + p2p
    return PassTime(
        compute=micro * compute,
        head=head,
        tp_comm=micro * tp_comm,
        cp_comm=micro * cp_comm,
        pp_p2p=micro * p2p,
        bubble=(pp - 1) * per_mb_layers,
        micro_batches=micro,
    )


def _head_seconds(shape: ModelShape, tp: int, spec: PassSpec, micro: int, cp: int, m: Machine) -> float:
    """The LM head of a whole pass on this rank: its matmuls at GEMM speed, its elementwise bytes at
    memory speed (vocabulary sharded over TP, tokens over CP)."""
    if not spec.head_tokens:
        return 0.0
    vocab = padded_vocab_size(shape.vocab_size, tp) / tp
    tokens = spec.head_tokens / cp
    matmuls = spec.head_matmuls * 2 * tokens * vocab * shape.hidden_size / m.flops
    elementwise = tokens * vocab * spec.head_bytes / m.memory
    reduce = 0.0
    if tp > 1:  # a few per-token statistics all-reduced over TP per micro-batch (forward and backward)
        calls = micro * (4 if spec.backward else 2)
        reduce = m.collective(tokens * 8 * 4 * (2 if spec.backward else 1), tp, calls=calls)
    return matmuls + elementwise + reduce


@dataclass(frozen=True)
class OptimizerTime:
    """One optimizer step: exposed DP communication and the Adam update."""

    grad_reduce: float
    param_gather: float
    update: float

    @property
    def total(self) -> float:
        return self.grad_reduce + self.param_gather + self.update


def optimizer_time(
    shape: ModelShape,
    layout: Layout,
    m: Machine,
    *,
    grad_bytes: int,
    hide_reduce_s: float,
    hide_gather_s: float,
) -> OptimizerTime:
    """Reduce-scatter of gradients and all-gather of weights over DP x CP, each exposed beyond the
    compute that hides it (``hide_*_s``: 0 without overlap), and Adam over the rank's shard."""
    params = shape.rank_parameters(layout.tp, layout.pp)
    group = layout.dp * layout.cp
    span = layout.tp * group
    reduce = gather = 0.0
    if group > 1:
        share = (group - 1) / group * params
        reduce = max(0.0, m.collective(share * grad_bytes, span) - hide_reduce_s)
        gather = max(0.0, m.collective(share * BF16, span) - hide_gather_s)
    update = (params / group * ADAM_BYTES_PER_PARAM + params * (grad_bytes * 2)) / m.memory  # + norm, zero
    return OptimizerTime(grad_reduce=reduce, param_gather=gather, update=update)
