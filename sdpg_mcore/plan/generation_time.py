"""Time to generate a step's responses on inference engines (SGLang, vLLM): prefill and decode.

Prefill is bound by FLOPs: ``2 x parameters`` per prompt token (the ``n`` samples of a prompt share
its prefix cache). Decode is bound by memory: every iteration reads the engine's weight shard and the
KV cache of every running sequence once, for one token per sequence. The weight matmuls and the
attention are separate kernels, each the larger of its bytes and its FLOPs (the matmuls turn
FLOP-bound once the batch is large); each iteration also pays the engine's fixed overhead and, with
TP, two all-reduces per layer.

All sequences start together, so at decode iteration ``t`` the running ones all hold ``prompt + t``
tokens and their number falls as responses finish (``ResponseLengths.survival``). The step ends with
its longest response: iterations go on while any of the step's responses is running, which makes the
cap the floor of generation time once a capped response is likely. An engine holds at most as many
sequences as its KV cache (its memory share less its weights) and ``max_running`` allow; the rest
queue, and the engine decodes at that concurrency until the queue is empty.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sdpg_mcore.plan.compute_time import BF16, Machine
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.workload import Rollout, Workload

#: Decode iterations are summed in strides of ``cap / TAIL_STEPS`` tokens.
TAIL_STEPS = 1024


@dataclass(frozen=True)
class EngineShape:
    """Per-GPU bytes and FLOPs of one engine of ``tp`` GPUs."""

    weight_bytes: float
    """Weights read per decode iteration (the embedding table is gathered, not streamed, when untied)."""
    kv_bytes_per_token: float
    flops_per_token: float
    """Matmul FLOPs per generated token on one GPU (attention counted separately)."""
    attention_flops_per_key: float
    hidden_size: int
    all_reduces: int
    """TP all-reduces per decode iteration (two per layer when TP > 1)."""

    @classmethod
    def of(cls, shape: ModelShape, tp: int) -> EngineShape:
        embedding = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
        streamed = shape.num_hf_parameters() - embedding
        matmul = shape.num_layers * shape.layer_sharded_parameters() + shape.vocab_size * shape.hidden_size
        return cls(
            weight_bytes=BF16 * streamed / tp,
            kv_bytes_per_token=shape.kv_bytes_per_token() / min(tp, shape.num_kv_heads),
            flops_per_token=2 * matmul / tp,
            attention_flops_per_key=4 * shape.num_layers * shape.q_width / tp,
            hidden_size=shape.hidden_size,
            all_reduces=2 * shape.num_layers if tp > 1 else 0,
        )


@dataclass(frozen=True)
class GenerationTime:
    prefill: float
    decode: float
    concurrency: float
    """Sequences one engine decodes at once (the KV cache or ``max_running`` may cap it)."""
    kv_limited: bool
    longest: float
    """Expected tokens of the step's longest response (decode iterations of its tail)."""

    @property
    def total(self) -> float:
        return self.prefill + self.decode


def decode_step(engine: EngineShape, tp: int, m: Machine, running: float, context: float) -> float:
    """One decode iteration of ``running`` sequences holding ``context`` tokens each."""
    weights = max(engine.weight_bytes / m.memory, running * engine.flops_per_token / m.flops)
    kv = running * context
    attention = max(kv * engine.kv_bytes_per_token / m.memory, kv * engine.attention_flops_per_key / m.flops)
    step = weights + attention + m.eff.decode_step_s
    if engine.all_reduces:
        volume = 2 * (tp - 1) / tp * running * engine.hidden_size * BF16
        step += engine.all_reduces * m.collective(volume, tp)
    return step


def kv_capacity_tokens(engine: EngineShape, rollout: Rollout, m: Machine) -> float:
    """Tokens the engine's KV cache holds: its memory share less the weights, per GPU."""
    free = rollout.kv_memory_fraction * m.hw.memory_bytes - engine.weight_bytes
    return max(0.0, free) / engine.kv_bytes_per_token


@functools.lru_cache(maxsize=256)
def generation_time(shape: ModelShape, work: Workload, rollout: Rollout, m: Machine) -> GenerationTime:
    """Prefill + decode of ``work``'s responses spread evenly over ``rollout``'s engines (cached: a layout
    search asks for the same rollout once per trainer layout)."""
    engine = EngineShape.of(shape, rollout.tp)
    per_engine = work.responses / rollout.engines
    lengths = work.lengths
    footprint = work.prompt_len + lengths.mean  # KV tokens a sequence ends with, on average
    concurrency = min(per_engine, rollout.max_running, kv_capacity_tokens(engine, rollout, m) / footprint)
    if concurrency < 1:
        raise ValueError(
            "a rollout engine's KV cache holds less than one sequence: raise --rollout-tp or the memory share"
        )
    prompt_tokens = work.prompts / rollout.engines * work.prompt_len
    prefill = prompt_tokens * (engine.flops_per_token + engine.attention_flops_per_key * work.prompt_len / 2)
    prefill /= m.flops
    queued = 0.0
    if concurrency < per_engine:  # steady state until the queue is empty; running ages average E[L^2]/2E[L]
        age = lengths.mean_square() / (2 * lengths.mean)
        iterations = (per_engine - concurrency) * lengths.mean / concurrency
        queued = iterations * decode_step(engine, rollout.tp, m, concurrency, work.prompt_len + age)
    tail = 0.0
    stride = max(1.0, lengths.cap / TAIL_STEPS)
    t = 0.0
    while t < lengths.cap:
        alive = lengths.survival(t)
        any_alive = 1 - (1 - alive) ** work.responses
        running = max(1.0, concurrency * alive)
        tail += (
            any_alive
            * min(stride, lengths.cap - t)
            * decode_step(engine, rollout.tp, m, running, work.prompt_len + t)
        )
        t += stride
    return GenerationTime(
        prefill=prefill,
        decode=queued + tail,
        concurrency=concurrency,
        kv_limited=concurrency < min(per_engine, rollout.max_running),
        longest=lengths.longest_expected(work.responses),
    )
