"""Forward passes of the step through Megatron's pipeline schedule, ending in the fused LM head.

Every pass runs ``get_forward_backward_func()`` (1F1B with PP, plain accumulation without), over
micro-batches of right-padded rows. The model runs with its output layer skipped
(:func:`hidden_states_only`), so the last stage returns final-norm hidden states ``[S, B, H]``; only
the positions that predict response tokens are kept (``[N, H]``) and handed to ``ops`` together
with this rank's output-layer shard. Full-vocabulary logits never exist.

- :func:`logprob_pass` (forward-only): per-row ``log π(y_t)`` at a temperature (old, ref, teacher
  sampled-token log-probs).
- :func:`hidden_pass` (forward-only): the teacher's response hidden states per micro-batch (sdpg),
  kept on the device or handed to a host store (``train/teacher_states.py``).
- :func:`train_pass`: forward + backward of the algorithm loss; returns the metric sums.

Context parallelism (``shard_for_cp`` micro-batches): each CP rank runs its two load-balanced
chunks of every row. Forward-only log-prob passes hand back *full* per-micro-batch tensors (every
token's log-prob, assembled over the CP group), so the step sees the same per-row values as without
CP; the teacher pass hands each rank the hidden states of its own student tokens only (they are
``[N, H]``, too big to replicate); the train pass evaluates the loss on this rank's tokens only (the algo's
counts are global over DP x CP), and DDP's gradient all-reduce spans DP x CP.

Loss scaling: the model config has ``calculate_per_token_loss=True`` and the grad finaliser is
called without a token count, so Megatron neither divides the loss by the number of micro-batches
nor averages gradients over DP — the algo's contributions already sum to the mini-batch loss
(``algo/aggregation.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.train.batch import MicroBatch, to_device


@contextlib.contextmanager
def hidden_states_only(model: torch.nn.Module) -> Iterator[None]:
    """Make the last stage's forward return the final-norm hidden states instead of logits.

    Why: ``GPTModel._postprocess`` returns the decoder output (the final norm belongs to the
    decoder) when ``post_process`` is False, which is exactly what the fused head needs; the output
    layer's weight is then used directly by ``ops``. Held only around the forward call: Megatron's
    grad finaliser reads ``post_process`` to find the tied embedding on the last stage.
    """
    gpt = unwrap_model(model)
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def output_weight(model) -> torch.Tensor:
    """This rank's output-layer shard ``[V_local, H]`` (the embedding when tied)."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights and gpt.pre_process:
        return gpt.embedding.word_embeddings.weight
    # Untied, or tied under PP: the last stage's output layer holds the (synced) copy.
    return gpt.output_layer.weight


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True = masked, built on ``device``. Right padding needs nothing more: a
    real token never attends to a later (pad) position, and pad positions are never read."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def response_hidden(output_SBH: torch.Tensor, index_N: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """``[N, H]``: the hidden states at the positions predicting response tokens, row-major.

    ``index_N`` is the micro-batch's host-built ``hidden_index_N`` (rows of the ``[S * B, H]``
    view): an ``index_select``, where a boolean-mask gather would wait for the device to count.
    """
    if sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        output_SBH = gather_from_sequence_parallel_region(output_SBH, tensor_parallel_output_grad=False)
    return output_SBH.reshape(-1, output_SBH.shape[-1]).index_select(0, index_N)


@dataclass(frozen=True)
class HeadSpec:
    """What the fused head needs besides tensors."""

    vocab_size: int
    """True vocabulary (rows past it are Megatron padding)."""
    chunk_size: int
    """Tokens per fused-head chunk."""
    tp_group: object
    """Tensor-parallel group splitting the vocabulary (None for TP1 without torch.distributed)."""
    sequence_parallel: bool = False
    causal_mask: bool = True
    """Pass an explicit causal mask to the model (local spec). The Transformer-Engine spec masks by
    ``attn_mask_type=causal`` inside its kernels, so no ``[T, T]`` mask is built at all."""
    backend: str = "auto"
    """The fused head's kernels (``trainer.logprob_backend``): auto, torch or triton."""


def _run(
    model_chunks,
    micro_batches: list[MicroBatch],
    forward_step: Callable,
    *,
    forward_only: bool,
    collect: bool,
):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    max_len = max(max(mb.seq_len, mb.teacher_seq_len) for mb in micro_batches)
    max_rows = max(mb.num_rows for mb in micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(model_chunks),
        num_microbatches=len(micro_batches),
        seq_length=max_len,
        micro_batch_size=max_rows,
        forward_only=forward_only,
        collect_non_loss_data=collect,
    )


def _model_forward(model, mb: MicroBatch, teacher: bool, head: HeadSpec) -> torch.Tensor:
    ids_BT = mb.teacher_input_ids_BT if teacher else mb.input_ids_BT
    positions_BT = mb.teacher_position_ids_BT if teacher else mb.position_ids_BT
    seq_len, device = ids_BT.shape[1], ids_BT.device
    if positions_BT is None:
        positions_BT = torch.arange(seq_len, device=device).expand(ids_BT.shape[0], seq_len)
    # Under CP the attention masks by global positions itself (ops.cp_attention); no [T, T] mask.
    mask = causal_mask(seq_len, device) if head.causal_mask and mb.cp_size == 1 else None
    with hidden_states_only(model):
        return model(ids_BT, positions_BT, mask)


def _local_index(mb: MicroBatch, teacher: bool) -> torch.Tensor | None:
    return mb.teacher_cp_index_N if teacher else mb.cp_index_N


def _to_full(local_N: torch.Tensor, mb: MicroBatch, teacher: bool) -> torch.Tensor:
    """``[N_local, ...]`` of this CP rank -> ``[N, ...]`` of the micro-batch, on every CP rank.

    Every token is produced by exactly one CP rank, so a sum of zero-filled copies is an exact gather.
    """
    index_N = _local_index(mb, teacher)
    if index_N is None:
        return local_N
    from megatron.core import parallel_state as ps

    full = local_N.new_zeros((mb.num_tokens, *local_N.shape[1:]))
    full.index_copy_(0, index_N, local_N)
    dist.all_reduce(full, group=ps.get_context_parallel_group())
    return full


def local_view(mb: MicroBatch) -> MicroBatch:
    """The micro-batch's per-token tensors restricted to this CP rank's student tokens (itself without CP)."""
    index_N = mb.cp_index_N
    if index_N is None:
        return mb
    return replace(
        mb,
        targets_N=mb.targets_N.index_select(0, index_N),
        seq_index_N=mb.seq_index_N.index_select(0, index_N),
        tokens=None if mb.tokens is None else mb.tokens.index(index_N),
    )  # teacher_hidden_NH already holds only this rank's student tokens (hidden_pass)


def _to_student_ranks(teacher_local_NH: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Teacher hidden states computed on this CP rank -> those of this rank's student tokens (``cp_index_N`` order).

    The teacher's longer prompts shift its chunk boundaries, so a token's teacher state is often
    computed on another CP rank than the one predicting it. One all-to-all moves every row to the
    rank that needs it: each rank holds ``N / CP`` rows, never the micro-batch's whole ``[N, H]``.
    """
    from megatron.core import parallel_state as ps

    plan = mb.cp_exchange
    assert plan is not None
    received = teacher_local_NH.new_empty((sum(plan.recv_splits), teacher_local_NH.shape[1]))
    dist.all_to_all_single(
        received,
        teacher_local_NH.index_select(0, plan.send_order_N),
        output_split_sizes=plan.recv_splits,
        input_split_sizes=plan.send_splits,
        group=ps.get_context_parallel_group(),
    )
    return received.index_select(0, plan.gather_index_N)


def logprob_pass(
    model_chunks,
    micro_batches: list[MicroBatch],
    head: HeadSpec,
    *,
    temperature: float,
    teacher: bool = False,
) -> list[torch.Tensor] | None:
    """Forward-only ``log π(y_t)`` per micro-batch (``[N]`` fp32, row-major) on the last stage, else None."""
    from sdpg_mcore.ops import vocab_parallel_logprob_entropy

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = _model_forward(model, mb, teacher, head)

        def collect(output_SBH, non_loss_data=True):
            rows_N = mb.teacher_hidden_index_N if teacher else mb.hidden_index_N
            hidden_NH = response_hidden(output_SBH, rows_N, head.sequence_parallel)
            index_N = _local_index(mb, teacher)
            logprob_N, _ = vocab_parallel_logprob_entropy(
                hidden_NH,
                output_weight(model),
                mb.targets_N if index_N is None else mb.targets_N.index_select(0, index_N),
                vocab_size=head.vocab_size,
                temperature=temperature,
                chunk_size=head.chunk_size,
                tp_group=head.tp_group,
                backend=head.backend,
            )
            return _to_full(logprob_N.float(), mb, teacher)

        return output, collect

    with torch.no_grad():
        out = _run(model_chunks, micro_batches, forward_step, forward_only=True, collect=True)
    return list(out) if _is_last_stage() else None


def hidden_pass(
    model_chunks,
    micro_batches: list[MicroBatch],
    head: HeadSpec,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """Forward-only teacher pass: response hidden states ``[N, H]`` per micro-batch (last stage), else None.

    Under CP only the rows of this rank's student tokens (``[N_local, H]``, ``cp_index_N`` order).
    ``keep`` (``teacher_states.HostTeacherStates.keep``) takes each micro-batch's states as soon as
    they exist and returns what to keep instead (their host copy), so the device never holds more
    than one micro-batch's.
    """

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = _model_forward(model, mb, True, head)

        def collect(output_SBH, non_loss_data=True):
            hidden_NH = response_hidden(
                output_SBH, mb.teacher_hidden_index_N, head.sequence_parallel
            ).detach()
            hidden_NH = hidden_NH if mb.cp_index_N is None else _to_student_ranks(hidden_NH, mb)
            return hidden_NH if keep is None else keep(hidden_NH)

        return output, collect

    with torch.no_grad():
        out = _run(model_chunks, micro_batches, forward_step, forward_only=True, collect=True)
    return list(out) if _is_last_stage() else None


def teacher_states_to_device(mb: MicroBatch) -> MicroBatch:
    """``mb`` with its teacher states on its own device: a non-blocking copy from pinned memory when
    they were kept on the host (``trainer.teacher_states=host``), else ``mb`` itself. The device copy
    lives only as long as this micro-batch's forward, loss and backward hold it."""
    hidden_NH, device = mb.teacher_hidden_NH, mb.input_ids_BT.device
    if hidden_NH is None or hidden_NH.device == device:
        return mb
    return replace(mb, teacher_hidden_NH=to_device(hidden_NH, device))


def train_pass(
    model_chunks,
    micro_batches: list[MicroBatch],
    head: HeadSpec,
    loss_fn: Callable,
    *,
    temperature: float,
    teacher_temperature: float,
    teacher_weight: torch.Tensor | None = None,
) -> list:
    """Forward + backward of ``loss_fn(mb, kl_N, logprob_N, entropy_N) -> (loss, metric_sums)``.

    ``mb.teacher_hidden_NH`` (from :func:`hidden_pass`) feeds the reverse KL, its logits taken with
    ``teacher_weight`` (the teacher's output-layer shard, when the teacher is other weights than
    the policy's) or else the student's; when it is None the KL is None and no teacher matmul
    runs; states kept on the host come to the device just before
    the micro-batch's student forward (:func:`teacher_states_to_device`). Under CP ``loss_fn`` gets
    :func:`local_view` of the micro-batch (this rank's tokens). Returns the per-micro-batch metric
    sums on the last stage (empty elsewhere).
    """
    from sdpg_mcore.ops import fused_kl_head

    def forward_step(data_iterator, model):
        mb = teacher_states_to_device(next(data_iterator))
        output = _model_forward(model, mb, False, head)

        def loss_func(output_SBH):
            hidden_NH = response_hidden(output_SBH, mb.hidden_index_N, head.sequence_parallel)
            local = local_view(mb)
            kl_N, logprob_N, entropy_N = fused_kl_head(
                hidden_NH,
                local.teacher_hidden_NH,
                output_weight(model),
                local.targets_N,
                vocab_size=head.vocab_size,
                temperature=temperature,
                teacher_temperature=teacher_temperature,
                chunk_size=head.chunk_size,
                tp_group=head.tp_group,
                backend=head.backend,
                teacher_weight=teacher_weight,
            )
            kl_N = kl_N if local.teacher_hidden_NH is not None else None
            loss, metrics = loss_fn(local, kl_N, logprob_N, entropy_N)
            return loss, torch.ones((), dtype=torch.int, device=loss.device), metrics

        return output, loss_func

    return list(_run(model_chunks, micro_batches, forward_step, forward_only=False, collect=False))


def _is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage()
