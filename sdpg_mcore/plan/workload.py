"""What one RL step asks of the machine, split into the three things that set its time.

- :class:`Workload`: the data of a step (prompts x responses, their lengths, which passes the
  algorithm needs, how many optimizer steps) — layout-independent.
- :class:`TrainSettings`: how the trainer runs it (micro-batch token budgets, recompute, sequence
  parallelism, communication overlap).
- :class:`Rollout`: where generation runs (own GPUs or the trainer's, engine size, KV memory).
- :class:`Implementation`: behaviours of the framework that cost time, as named inputs: the LM head's
  matmuls and elementwise bytes per (token, vocabulary) pair, how reference weights are swapped in,
  how new weights reach the engines. :data:`SDPG_MCORE` is this project; the published runs the model
  is checked against ran NeMo-RL (``published_runs.json`` says what it does and where that is read).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdpg_mcore.plan.lengths import ResponseLengths

RECOMPUTE = ("none", "selective", "full")
TEACHER_WEIGHTS = ("policy", "ema", "initial")
REFERENCE_SWAPS = ("pinned_exchange", "pinned_copy", "resident")
WEIGHT_SYNCS = ("broadcast", "colocated_tensor", "colocated_gather", "disk")


@dataclass(frozen=True)
class Workload:
    """One step: ``prompts x n`` responses, then ``mini_batches`` optimizer steps on them."""

    prompts: int
    n: int
    prompt_len: float
    """Mean prompt tokens (the student's)."""
    lengths: ResponseLengths
    teacher_extra_len: float = 0.0
    """Mean extra tokens of the teacher prompt (SDPG's privileged context)."""
    teacher_pass: bool = False
    """SDPG: a forward-only teacher pass per mini-batch and the teacher's logits in the train head."""
    reference_pass: bool = True
    """Reference log-probs of the frozen initial policy (a KL term or penalty)."""
    mini_batches: int = 1
    """Optimizer steps per step (``batch_prompts / mini_batch_prompts``)."""

    def __post_init__(self) -> None:
        if min(self.prompts, self.n, self.mini_batches) < 1:
            raise ValueError("prompts, n and mini_batches must be >= 1")
        if self.prompts % self.mini_batches:
            raise ValueError(f"mini_batches={self.mini_batches} must divide prompts={self.prompts}")

    @property
    def responses(self) -> int:
        return self.prompts * self.n

    def rows_per_rank(self, dp: int, whole_groups: bool) -> float:
        """Responses one DP rank trains on per mini-batch (the busiest rank)."""
        groups = self.prompts // self.mini_batches
        if whole_groups:
            return -(-groups // dp) * self.n
        return groups * self.n / dp

    @property
    def row_len(self) -> float:
        """Mean tokens of one student row (prompt + response)."""
        return self.prompt_len + self.lengths.mean

    @property
    def tokens(self) -> float:
        """Prompt + response tokens of the step (NeMo-RL's ``total_num_tokens``)."""
        return self.responses * self.row_len

    def attended_context(self, extra_prompt: float = 0.0) -> float:
        """Mean keys a token attends to in causal rows of ``prompt + extra + response`` tokens:
        ``E[s^2] / (2 E[s])`` over the row lengths ``s``."""
        p = self.prompt_len + extra_prompt
        mean, square = self.lengths.mean, self.lengths.mean_square()
        return (p * p + 2 * p * mean + square) / (2 * (p + mean))


@dataclass(frozen=True)
class TrainSettings:
    """How the trainer runs the passes (a recipe's ``parallel`` / ``data`` / ``model`` settings)."""

    micro_batch_tokens: int
    """Token budget of one train micro-batch per DP rank (before CP)."""
    logprob_micro_batch_tokens: int | None = None
    """Token budget of the forward-only log-prob passes; None: ``micro_batch_tokens``."""
    recompute: str = "none"
    """none | selective | full (full: the backward recomputes every layer's forward)."""
    sequence_parallel: bool = True
    overlap_grad_reduce: bool = True
    """The DP gradient reduce runs during the last micro-batch's backward."""
    overlap_param_gather: bool = True
    """The distributed optimizer's weight all-gather runs during the next forward."""
    teacher_states_host: bool = False
    """``trainer.teacher_states=host``: teacher states go to pinned host memory and back."""
    teacher_weights: str = "policy"
    """sdpg's ``algorithm.teacher``: policy | ema | initial. ema and initial swap other weights in
    for every teacher pass, ema also updates its average after every optimizer step."""
    ema_weights_host: bool = True
    """``trainer.ema_weights=host``: the EMA's fp32 average in pinned host memory (else on the GPU)."""

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.micro_batch_tokens < 1:
            raise ValueError("micro_batch_tokens must be >= 1")
        if self.teacher_weights not in TEACHER_WEIGHTS:
            raise ValueError(
                f"teacher_weights={self.teacher_weights!r} is not one of {', '.join(TEACHER_WEIGHTS)}"
            )

    @property
    def logprob_tokens(self) -> int:
        return self.logprob_micro_batch_tokens or self.micro_batch_tokens


@dataclass(frozen=True)
class Rollout:
    """The inference engines: ``gpus`` of them in engines of ``tp`` GPUs each."""

    gpus: int
    """GPUs that generate (for a colocated rollout: the trainer's own)."""
    tp: int = 8
    colocated: bool = False
    """Engines share the trainer's GPUs: generation and training take turns."""
    kv_memory_fraction: float = 0.85
    """Share of a GPU's memory the engine takes for weights + KV cache (SGLang ``mem_fraction_static``,
    vLLM ``gpu_memory_utilization``)."""
    max_running: int = 1024
    """Most sequences an engine decodes at once (``max_running_requests`` / ``max_num_seqs``)."""
    async_steps: int = 0
    """>= 1: the next step's rollout is generated while this one trains (one-step off-policy)."""
    bucket_bytes: int = 512 << 20
    """Bucket of the weight broadcast (``rollout.bucket_mb``)."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.tp < 1 or self.gpus % self.tp:
            raise ValueError(
                f"rollout GPUs ({self.gpus}) must be a positive multiple of the engine TP ({self.tp})"
            )

    @property
    def engines(self) -> int:
        return self.gpus // self.tp


@dataclass(frozen=True)
class Implementation:
    """Framework behaviours that cost time (module docstring)."""

    name: str
    head_matmuls_train: int
    """``N x V x H`` matmuls of the train pass's head without a teacher."""
    head_matmuls_teacher: int
    """Extra ``N x V x H`` matmuls a teacher adds to the train pass's head."""
    head_bytes_train: float
    """Elementwise bytes per (student token, vocabulary) pair of the train pass's head, no teacher."""
    head_bytes_teacher: float
    """Extra elementwise bytes per (student token, vocabulary) pair a teacher adds to the train head."""
    head_bytes_logprob: float
    """Elementwise bytes per (token, vocabulary) pair of a forward-only log-prob pass."""
    head_all_positions: bool
    """The head runs at every position (materialised logits), not only where a response token is predicted."""
    reference_swap: str
    """pinned_exchange (one pinned buffer, both directions at once) | pinned_copy (three one-way copies:
    the live weights out, the reference in, the live ones back) | resident (a second model in device
    memory, no copies)."""
    weight_sync: str
    """broadcast (NCCL to engines on their own GPUs) | colocated_tensor (tensor handles, same GPUs) |
    colocated_gather (every GPU gathers the whole model, tensor by tensor, then hands it over) | disk."""
    offload_training_state: bool = False
    """Colocated: optimizer states and weights leave the GPU before generation (and gradients are freed)."""
    offload_pinned: bool = False
    """The offload copies through pinned host buffers (sdpg_mcore's ``train/colocate.py``), not into
    fresh pageable memory (NeMo-RL's ``.to("cpu")`` of the optimizer states)."""
    grad_bytes: int = 4
    """Bytes per gradient element reduced over DP (Megatron ``grad_reduce_in_fp32``: 4)."""
    whole_groups: bool = True
    """DP ranks take whole prompt groups (``train/batch.py dp_groups``): a mini-batch of ``g`` groups
    gives each rank ``ceil(g / dp)`` of them, so DP beyond ``g`` leaves ranks idle. False: responses
    are spread evenly."""

    def __post_init__(self) -> None:
        if self.reference_swap not in REFERENCE_SWAPS:
            raise ValueError(
                f"reference_swap={self.reference_swap!r} is not one of {', '.join(REFERENCE_SWAPS)}"
            )
        if self.weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync={self.weight_sync!r} is not one of {', '.join(WEIGHT_SYNCS)}")


@dataclass(frozen=True)
class HeadBytes:
    """The fused head's elementwise bytes per (student token, vocabulary) pair on one backend: what
    its kernels and aten ops read and write of ``[tokens, vocab]`` tensors (GEMM outputs and operands
    included), bf16 inputs, vocabulary blocks that fill their GEMM width."""

    train: float
    """Train pass, forward + backward, no teacher."""
    teacher: float
    """What a teacher adds to the train pass (its logits in the forward and the backward's recompute)."""
    logprob: float
    """A forward-only log-prob pass (no teacher, no backward)."""


#: Per backend of ``trainer.logprob_backend``, as ``ops/kl_head_traffic.py`` counts them on CPU (the
#: GPU op sequence; Triton under its interpreter); ``tests/plan/test_head_bytes.py`` recounts all six
#: at a small aligned shape. ``python tools/bench_kl.py --count`` reports the train pass with a
#: teacher: triton 38.9 = (22 + 16) x 2,048 / 2,000 (its shape's ragged last block keeps its aligned
#: GEMM width), torch 130.0. Triton per pair: the forward GEMM writes fp32 logits and its kernel reads
#: them (4 + 4 B per stacked row), the backward recomputes them (4 + 4) and writes bf16 ``dz`` (2),
#: which the ``dh`` and ``dW`` GEMMs read (2 + 2): 8 + 8 + 6 = 22 B for the student, 8 + 8 = 16 B
#: more for the teacher's row, 8 B forward-only. The torch path's ~80 aten ops per block pass over
#: the block's fp32 logits several times each way: 82 + 48 B, 40 B forward-only.
FUSED_HEAD_BYTES = {
    "triton": HeadBytes(train=22.0, teacher=16.0, logprob=8.0),
    "torch": HeadBytes(train=82.0, teacher=48.0, logprob=40.0),
}
HEAD_BACKENDS_ON_GPU = {"auto": "triton", "triton": "triton", "torch": "torch"}
"""What ``trainer.logprob_backend`` resolves to on a GPU (``ops/kl_head_backends.resolve_backend``:
auto is triton on CUDA, where the CUDA torch wheels bring Triton)."""


def with_head_backend(impl: Implementation, logprob_backend: str) -> Implementation:
    """``impl`` with the fused head's bytes of ``logprob_backend`` (auto | triton | torch) as it
    resolves on a GPU; on a CPU, where auto is torch, pass ``"torch"``."""
    if logprob_backend not in HEAD_BACKENDS_ON_GPU:
        raise ValueError(
            f"trainer.logprob_backend={logprob_backend!r} is not one of {', '.join(HEAD_BACKENDS_ON_GPU)}"
        )
    head = FUSED_HEAD_BYTES[HEAD_BACKENDS_ON_GPU[logprob_backend]]
    return replace(
        impl, head_bytes_train=head.train, head_bytes_teacher=head.teacher, head_bytes_logprob=head.logprob
    )


SDPG_MCORE = Implementation(
    name="sdpg_mcore",
    head_matmuls_train=4,  # forward 1, backward: recompute 1, dh 1, dW 1
    head_matmuls_teacher=2,  # the teacher's logits in the forward and in the backward's recompute
    head_bytes_train=FUSED_HEAD_BYTES["triton"].train,  # trainer.logprob_backend=auto on a GPU
    head_bytes_teacher=FUSED_HEAD_BYTES["triton"].teacher,
    head_bytes_logprob=FUSED_HEAD_BYTES["triton"].logprob,
    head_all_positions=False,
    reference_swap="pinned_exchange",
    weight_sync="broadcast",
    offload_training_state=True,  # colocated only (train/colocate.py): generation gets the GPU
    offload_pinned=True,
)


def with_head_bytes(impl: Implementation, train_with_teacher: float) -> Implementation:
    """``impl`` with the train head's bytes per pair (student + teacher) set to ``train_with_teacher``,
    split between student and teacher rows as ``impl``'s head splits them (``--head-bytes``)."""
    share = impl.head_bytes_train / (impl.head_bytes_train + impl.head_bytes_teacher)
    return replace(
        impl, head_bytes_train=share * train_with_teacher, head_bytes_teacher=(1 - share) * train_with_teacher
    )


def with_sync(impl: Implementation, rollout: Rollout, weight_sync: str) -> Implementation:
    """``impl`` with a recipe's ``rollout.weight_sync`` (``distributed`` -> broadcast, ``tensor`` ->
    colocated_tensor; a colocated rollout cannot broadcast)."""
    mode = {"distributed": "broadcast", "tensor": "colocated_tensor"}.get(weight_sync, weight_sync)
    if rollout.colocated and mode == "broadcast":
        mode = "colocated_tensor"
    return replace(impl, weight_sync=mode)
