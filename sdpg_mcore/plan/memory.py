"""Per-GPU memory of one SDPG training rank, by component, for a given TP/PP/CP/DP layout.

Why each term has the form it has:
- parameters: bf16 weights of the busiest pipeline stage, sharded over TP.
- gradients: Megatron DDP keeps fp32 ``main_grad`` buffers for every local parameter
  (``grad_reduce_in_fp32``); the distributed optimizer reduce-scatters into that buffer, so it is
  not sharded.
- optimizer states: the distributed optimizer shards fp32 master weights and Adam m, v
  (12 bytes per parameter) over the data-parallel group including CP (``dp * cp`` ranks).
- activations: Korthikanti et al. 2022 (arXiv 2205.05198), per layer and token, rewritten for
  GQA (q and k/v widths differ), SwiGLU (fc1 is ``2 * intermediate`` wide, its output and the
  gated product are saved), RMSNorm (input + fp32 rstd) and flash attention (q, k, v, output and
  fp32 logsumexp, no ``s^2`` term); no dropout in these models, so no masks. Sequence
  parallelism (on whenever TP > 1) shards the ``hidden``-wide tensors over TP as well. 1F1B
  keeps ``min(pp, num_microbatches)`` micro-batches in flight on the first stage.
- KL head: the fused head (``sdpg_mcore.ops.fused_kl_head``) keeps three fp32 ``[tokens, block]``
  buffers of at most ``chunk * V/TP`` elements each (or, with no chunk size, a 256 MiB budget),
  the stacked ``[student; teacher]`` hidden states and an fp32 ``[T, H]`` input gradient; the
  materialising reference keeps ``[T, V/TP]`` student and teacher logits in bf16 and three fp32
  temporaries (log-softmax of each, the gradient), i.e. 16 bytes per logit. Both also hold the
  output weight's ``[V/TP, H]`` gradient (weight dtype) until DDP folds it into ``main_grad``.
- teacher: forward-only; the transient working set of one layer exists only during the teacher
  pass, before the train pass, so it overlaps the student's activations and the KL head in time
  with neither.
- teacher states: the step runs the teacher pass over every micro-batch of a mini-batch before
  the train pass (``train.step``), so with ``trainer.teacher_states=device`` the last stage keeps
  the response hidden states ``[N, H]`` of all of them — every response token of the rank's share
  of the mini-batch (8.6 GB on the 70B recipe's last stage), not one micro-batch's. With ``host``
  (``train/teacher_states.py``) the GPU holds one micro-batch's and the share waits in one pinned
  host buffer of a power-of-two elements (``teacher_states_host``, host RAM, not in ``total``).
- attention scores (``kernels='local'``): a micro-batch is right-padded rows, so the ``[s, s]``
  scores scale with the row length (at most ``rollout_seq_len``), not the micro-batch's tokens.
- reference model: ``trainer.reference_weights=separate_model`` keeps a second bf16 copy of the
  weights resident for the reference log-probs; ``cpu_swap`` (the default) keeps it in host memory.
- teacher weights (``algorithm.teacher``, ``train/ema_weights.py``): ``ema`` keeps an fp32 average of
  the rank's weights (4 bytes per parameter) on the GPU (``trainer.ema_weights=device``; the live bf16
  weights then wait in a GPU copy during the teacher pass, counted with the teacher pass) or in pinned
  host memory (``host``: average plus the parked live weights, 6 bytes per parameter of host RAM, not in
  ``total``); ``ema``, and ``initial`` swapped in from the host, keep a copy of the teacher's output-layer
  shard ``[V/TP, H]`` from the teacher pass to the end of the train pass. ``initial`` as a resident
  model is the reference model above.
- rollout (colocated only): the engines and the trainer take turns (``train/colocate.py``), so the
  peak is the largest of three phases, each with the engines' own CUDA context and activations
  (``engine_overhead_bytes``): training (the whole training state; the released engines keep only
  that residue), the weight push (the trainer's weights; its gradients, optimizer states and a device
  EMA teacher offloaded; the engines' weights, no KV cache yet) and generation (the trainer fully
  offloaded to its CUDA context and NCCL buffers, the engines' weights and KV cache).

Checked (``tests/tools/test_plan.py``) against real Megatron objects on CPU: parameters, fp32 grad
buffers and distributed-optimizer states after a DDP + ``get_megatron_optimizer`` step (within 1 %),
and the bytes autograd saves in a ``GPTModel`` forward for the ``local`` kernel profile (TP1 bf16,
TP2 fp32; within 6 %), and (``tests/tools/test_plan_step_peak.py``) the peak of live tensor bytes
of one real SDPG mini-batch update of four micro-batches (teacher pass, train pass with the fused KL head, optimizer
step; TP1 bf16, local kernels; within 5 %, and the teacher states kept between the passes). Not checkable on CPU: the ``fused`` (TE/flash)
profile, NCCL/CUDA overhead and 1F1B with PP > 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sdpg_mcore.plan.shape import ModelShape, padded_vocab_size

GIB = 1024**3
#: The fused KL head's workspace budget when no chunk size is given; equal to
#: ``sdpg_mcore.ops.kl_head_math.DEFAULT_CHUNK_BUDGET_BYTES`` (a test keeps them in step; the
#: planner does not import torch).
FUSED_HEAD_BUDGET_BYTES = 256 * 1024**2
RECOMPUTE_MODES = ("none", "selective", "full")
KERNEL_PROFILES = ("fused", "local")
KL_HEAD_MODES = ("fused", "materialised")
ROLLOUT_MODES = ("dedicated", "colocated")
REFERENCE_MODES = ("cpu_swap", "separate_model")
#: ``trainer.teacher_states``; equal to ``sdpg_mcore.train.teacher_states.PLACES`` (a test keeps them in step).
TEACHER_STATE_PLACES = ("device", "host")
#: ``algorithm.teacher`` (sdpg) and ``trainer.ema_weights``; equal to ``sdpg_mcore.algo.config.TEACHERS``
#: and ``sdpg_mcore.train.ema_weights.PLACES`` (a test keeps them in step).
TEACHERS = ("policy", "ema", "initial")
EMA_PLACES = ("device", "host")


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout; ``tp * pp * cp * dp`` is the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def world_size(self) -> int:
        return self.model_parallel_size * self.dp


@dataclass(frozen=True)
class TrainingShape:
    """What one optimizer step asks of a rank, independent of the layout."""

    micro_batch_tokens: int
    """Tokens (prompt + response, packed) of one student micro-batch on one DP rank, before CP."""
    teacher_tokens: int
    """Tokens of the matching teacher micro-batch (its prompt carries the privileged context)."""
    rollout_seq_len: int
    """Longest rollout sequence (max prompt + max response), for the KV cache."""
    recompute: str = "none"
    """none | selective (Megatron's default ``core_attn``) | full (uniform, one layer per checkpoint)."""
    kl_head: str = "fused"
    """fused (chunked, custom backward) | materialised (full ``[T, V]`` logits, the reference)."""
    kl_chunk_tokens: int | None = None
    """Tokens per chunk of the fused KL head (``trainer.logprob_chunk_size``); None: its default budget."""
    num_microbatches: int | None = None
    """Micro-batches per optimizer step per DP rank; None means at least ``pp`` (1F1B steady state)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism when TP > 1 (shards norms/dropout regions over TP)."""
    rollout: str = "dedicated"
    """dedicated (servers on their own GPUs) | colocated (servers share the training GPUs)."""
    reference_weights: str = "cpu_swap"
    """cpu_swap (reference weights in host memory, swapped in) | separate_model (a resident bf16 copy)."""
    mini_batch_responses: int | None = None
    """Responses in one mini-batch over all DP ranks (``mini_batch_prompts x n``): the teacher states of
    all of them are kept until the train pass. None: one micro-batch's tokens (a lower bound)."""
    response_len: int | None = None
    """Longest response (``max_response_length``); None: ``rollout_seq_len``."""
    teacher_states: str = "device"
    """device (the mini-batch's teacher states on the GPU) | host (one micro-batch's on the GPU, the
    mini-batch's in pinned host memory): ``trainer.teacher_states``."""
    teacher: str = "policy"
    """Weights of the teacher pass: policy (the current weights) | ema | initial (``algorithm.teacher``)."""
    ema_weights: str = "host"
    """teacher=ema: where the fp32 average lives, device | host (``trainer.ema_weights``)."""
    rollout_kv_seqs: int = 16
    """Concurrent sequences a colocated SGLang engine must hold in its KV cache (SGLang sizes the
    cache from ``--mem-fraction-static``; this is the share to reserve for it)."""
    activation_bytes: int = 2
    """Bytes per activation element (bf16)."""
    kernels: str = "fused"
    """fused: Transformer-Engine layers + flash attention (the GPU path); local: Megatron's local
    spec with plain torch ops (no TE/apex: unfused RMSNorm, RoPE, SwiGLU and ``[s, s]`` attention
    scores) — what runs on CPU, and on GPUs without Transformer Engine."""
    overhead_bytes: int = 3 * GIB
    """CUDA context, NCCL communicators and allocator fragmentation."""
    engine_overhead_bytes: int = 2 * GIB
    """Colocated engines beside the trainer: their CUDA context and generation activations (all that
    is left of them while released)."""

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("recompute", self.recompute, RECOMPUTE_MODES),
            ("kl_head", self.kl_head, KL_HEAD_MODES),
            ("rollout", self.rollout, ROLLOUT_MODES),
            ("kernels", self.kernels, KERNEL_PROFILES),
            ("reference_weights", self.reference_weights, REFERENCE_MODES),
            ("teacher_states", self.teacher_states, TEACHER_STATE_PLACES),
            ("teacher", self.teacher, TEACHERS),
            ("ema_weights", self.ema_weights, EMA_PLACES),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
        if self.micro_batch_tokens <= 0 or self.teacher_tokens <= 0:
            raise ValueError("micro_batch_tokens and teacher_tokens must be positive")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component; ``total`` is the peak over the training and rollout phases."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    kl_head: int
    teacher: int
    teacher_states: int
    """On the GPU: the mini-batch's share (``device``) or one micro-batch's (``host``)."""
    reference_model: int
    rollout_weights: int
    rollout_kv_cache: int
    overhead: int
    total: int
    teacher_states_host: int = 0
    """Pinned host bytes per GPU holding the teacher states (``teacher_states=host``); not in ``total``."""
    phase_peaks: dict[str, int] | None = None
    """Colocated: the peak of each phase (``training``, ``weight_push``, ``generation``); ``total`` is
    the largest. None for dedicated servers (one phase: training)."""
    teacher_weights: int = 0
    """Resident GPU bytes of a teacher other than the policy: the EMA average (``ema_weights=device``)
    and the copy of the teacher's output-layer shard."""
    teacher_weights_host: int = 0
    """Pinned host bytes per GPU of the EMA average and the live weights parked for the teacher pass
    (``ema_weights=host``); not in ``total``."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def layer_activation_bytes_per_token(
    shape: ModelShape,
    tp: int,
    sp: bool,
    recompute: str,
    dtype_bytes: int,
    kernels: str = "fused",
    seq_len: int = 0,
) -> float:
    """Saved-for-backward bytes of one transformer layer per local token.

    ``recompute='selective'`` drops only what core attention saves beyond its inputs and output
    (the fp32 logsumexp); with flash attention that is all Megatron's default selective
    recompute can save. ``kernels='local'`` counts what autograd keeps for Megatron's local spec,
    op by op (measured on megatron-core 0.16.1): eight ``hidden``-wide tensors (each RMSNorm's
    input, normalised value and output; the residual sums), ``5 * intermediate`` (fc1 output and
    the unfused SwiGLU's three products), four ``q``-wide attention tensors (q and GQA-expanded k
    and v, transposed for the batched matmuls; the context), ``heads x seq_len`` score
    tensors (three in fp32; in bf16 the fp32 softmax and its bf16 copy), RoPE's cos/sin for q and k, and with q/k norm
    the fused QKV output plus the norms' inputs and outputs.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    sp_div = tp if (sp and tp > 1) else 1
    if kernels == "local":
        # Megatron's torch RMSNorm and softmax compute in fp32 whatever the model dtype.
        qkv = shape.q_width + 2 * shape.kv_width
        elements = 4 * h / sp_div + 5 * i / tp + 4 * shape.q_width / tp
        # fp32: scores and the softmax kept twice more; bf16: the fp32 softmax's bf16 copy for the
        # probs @ v matmul only (the scores live in Megatron's shared global memory buffer).
        score_copies = 2 if dtype_bytes == 4 else 1
        elements += score_copies * shape.num_heads * seq_len / tp + 4 * shape.head_dim
        fp32_elements = 4 * h / sp_div + shape.num_heads * seq_len / tp
        if shape.qk_norm:
            elements += qkv / tp
            fp32_elements += (2 * shape.q_width + shape.kv_width) / tp
            fp32_elements += shape.kv_width / tp if dtype_bytes != 4 else 0  # k's upcast copy
        return elements * dtype_bytes + fp32_elements * 4
    hidden_wide = 4 * h * dtype_bytes / sp_div  # inputs of norm1, linear_qkv, norm2, linear_fc1
    rstd = 2 * 4 / sp_div  # fp32 1/rms of both norms
    attn = (2 * shape.q_width + 2 * shape.kv_width) * dtype_bytes / tp  # q, k, v, attention output
    qk_norm = (shape.q_width + shape.kv_width) * dtype_bytes / tp if shape.qk_norm else 0.0
    lse = 4 * shape.num_heads / tp if recompute == "none" else 0.0
    mlp = 3 * i * dtype_bytes / tp  # fc1 output (gate and up) and the SwiGLU product
    return hidden_wide + rstd + attn + qk_norm + lse + mlp


def _kl_head_bytes(shape: ModelShape, tp: int, tokens: int, train: TrainingShape) -> int:
    """The head's working set for ``tokens`` local tokens (module docstring, "KL head")."""
    vocab_shard = -(-shape.vocab_size // tp)
    # Both heads return the output weight's gradient [V/TP, H] in the weight's dtype before DDP adds
    # it into the fp32 main_grad; it coexists with the head's workspace during the head's backward.
    weight_grad = vocab_shard * shape.hidden_size * train.activation_bytes
    hidden_states = tokens * shape.hidden_size * train.activation_bytes  # gathered [T, H] for the head
    if train.kl_head == "fused":
        if train.kl_chunk_tokens is None:
            workspace = min(FUSED_HEAD_BUDGET_BYTES, 12 * tokens * vocab_shard)
        else:
            workspace = 12 * min(train.kl_chunk_tokens, tokens) * vocab_shard
        stacked = 2 * tokens * shape.hidden_size * train.activation_bytes  # [student; teacher] hidden
        input_grad = 4 * tokens * shape.hidden_size  # fp32 dh accumulated over blocks
        kl_head = hidden_states + stacked + input_grad + workspace + weight_grad
    else:
        kl_head = hidden_states + 16 * tokens * vocab_shard + weight_grad
    return int(kl_head)


def _teacher_state_bytes(shape: ModelShape, layout: Layout, train: TrainingShape) -> tuple[int, int]:
    """Teacher response hidden states kept from the teacher pass to the train pass, per rank:
    (bytes on the GPU, bytes of pinned host memory)."""
    micro_batch = -(-train.micro_batch_tokens // layout.cp)
    if train.mini_batch_responses is None:
        share = micro_batch
    else:
        responses = -(-train.mini_batch_responses // layout.dp)
        share = -(-responses * (train.response_len or train.rollout_seq_len) // layout.cp)
    if train.teacher_states == "device":
        return share * shape.hidden_size * train.activation_bytes, 0
    # host: one micro-batch on the GPU at a time; the buffer grows to a power of two elements.
    buffer = 1 << max(share * shape.hidden_size - 1, 0).bit_length()
    return min(
        micro_batch, share
    ) * shape.hidden_size * train.activation_bytes, buffer * train.activation_bytes


def _teacher_weight_bytes(shape: ModelShape, layout: Layout, train: TrainingShape) -> tuple[int, int, int]:
    """A teacher other than the policy, per rank: (resident GPU bytes, GPU bytes during the teacher
    pass only, pinned host bytes); module docstring, "teacher weights"."""
    if train.teacher == "policy":
        return 0, 0, 0
    rank_params = shape.rank_parameters(layout.tp, layout.pp)
    swapped = train.teacher == "ema" or train.reference_weights == "cpu_swap"
    shard_rows = padded_vocab_size(shape.vocab_size, layout.tp) // layout.tp
    head_copy = shard_rows * shape.hidden_size * train.activation_bytes if swapped else 0
    if train.teacher == "initial":
        return head_copy, 0, 0
    live = rank_params * train.activation_bytes  # the live weights, parked for the teacher pass
    if train.ema_weights == "device":
        return 4 * rank_params + head_copy, live, 0
    return head_copy, 0, 4 * rank_params + live


def estimate_memory(shape: ModelShape, layout: Layout, train: TrainingShape) -> MemoryEstimate:
    """Per-GPU bytes of the busiest rank (the first pipeline stage for activations)."""
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    rank_params = shape.rank_parameters(tp, pp)
    parameters = 2 * rank_params
    gradients = 4 * rank_params
    optimizer_states = -(-12 * rank_params // (layout.dp * cp))

    sp = train.sequence_parallel and tp > 1
    sp_div = tp if sp else 1
    tokens = -(-train.micro_batch_tokens // cp)
    teacher_tokens = -(-train.teacher_tokens // cp)
    per_layer = layer_activation_bytes_per_token(
        shape,
        tp,
        sp,
        train.recompute,
        train.activation_bytes,
        train.kernels,
        seq_len=min(train.rollout_seq_len, train.micro_batch_tokens),
    )  # rows are right-padded to the longest (<= rollout_seq_len); under CP a local query still
    # scores against every key of its row
    layers_per_stage = shape.num_layers // pp
    in_flight = pp if train.num_microbatches is None else min(pp, train.num_microbatches)
    layer_input = shape.hidden_size * train.activation_bytes / sp_div
    if train.recompute == "full":
        # Every layer keeps only its input; backward recomputes one layer at a time.
        stored = layers_per_stage * in_flight * tokens * layer_input
        activations = int(stored + tokens * per_layer)
    else:
        activations = int(layers_per_stage * in_flight * tokens * per_layer)
    # Embedding output and final-norm input; the local (torch) final norm keeps two more in fp32.
    activations += int(in_flight * tokens * 2 * layer_input)
    if train.kernels == "local":
        activations += int(in_flight * tokens * 2 * shape.hidden_size * 4 / sp_div)

    kl_head = _kl_head_bytes(shape, tp, tokens, train)
    # The teacher pass runs (forward-only) before the train pass: its one-layer working set is gone
    # when the student's activations and the KL head exist; the response hidden states of every
    # micro-batch of the mini-batch stay (full H: the head gathers sequence-parallel shards), on the
    # GPU or (host) one micro-batch's at a time.
    teacher_kept, teacher_host = _teacher_state_bytes(shape, layout, train)
    teacher_resident, teacher_parked, teacher_weights_host = _teacher_weight_bytes(shape, layout, train)
    teacher_transient = teacher_tokens * per_layer + teacher_parked

    rollout_weights, rollout_kv_cache = _colocated_engine_bytes(shape, layout, train)

    reference_model = parameters if train.reference_weights == "separate_model" else 0
    static = (
        parameters + gradients + optimizer_states + reference_model + teacher_resident + train.overhead_bytes
    )
    training_peak = static + teacher_kept + max(activations + kl_head, teacher_transient)
    phases = None
    if train.rollout == "colocated":
        phases = _colocated_phases(
            training_peak, parameters + reference_model, rollout_weights, rollout_kv_cache, train
        )
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=activations,
        kl_head=int(kl_head),
        teacher=int(teacher_transient),
        teacher_states=int(teacher_kept),
        reference_model=reference_model,
        rollout_weights=rollout_weights,
        rollout_kv_cache=rollout_kv_cache,
        overhead=train.overhead_bytes,
        total=int(max(phases.values()) if phases else training_peak),
        teacher_states_host=teacher_host,
        phase_peaks=phases,
        teacher_weights=teacher_resident,
        teacher_weights_host=teacher_weights_host,
    )


def _colocated_engine_bytes(shape: ModelShape, layout: Layout, train: TrainingShape) -> tuple[int, int]:
    """Per GPU, colocated SGLang's (weights, KV cache): one engine sharded over the TP*PP GPUs of a
    model replica; (0, 0) for dedicated servers."""
    if train.rollout != "colocated":
        return 0, 0
    engine_gpus = layout.tp * layout.pp
    kv_total = shape.kv_bytes_per_token() * train.rollout_seq_len * train.rollout_kv_seqs
    return -(-2 * shape.num_hf_parameters() // engine_gpus), -(-kv_total // engine_gpus)


def _colocated_phases(
    training_peak: int, trainer_weights: int, rollout_weights: int, kv_cache: int, train: TrainingShape
) -> dict[str, int]:
    """Per-GPU peak of each colocated phase (module docstring, "rollout"); ``trainer_weights``
    includes a resident reference model (offloaded with the weights)."""
    engines = train.engine_overhead_bytes
    return {
        "training": int(training_peak + engines),
        "weight_push": int(trainer_weights + train.overhead_bytes + rollout_weights + engines),
        "generation": int(train.overhead_bytes + rollout_weights + kv_cache + engines),
    }
