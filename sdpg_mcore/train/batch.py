"""The step's data: scored responses, their split over DP ranks and mini-batches, and padded micro-batches.

A :class:`Response` is one rollout sample with its reward. Every rank holds the whole step's list
(rank 0 generates and broadcasts it), so every rank can compute every plan below without talking
to the others. Groups (the ``n`` responses of one prompt) never straddle DP ranks, so group-relative
advantages stay local.

Micro-batches are right-padded ``[B, T]`` rows, at most ``token_budget`` padded tokens each (the
local attention has no packed-sequence support; on CPU and with the local spec padding is the
layout that keeps RoPE positions right). The student and the teacher rows hold the same response
tokens after different prompts, so their response positions line up token for token.
Per-token tensors are flat ``[N]`` in row-major order over the rows' response tokens.

Everything here is built on the host from Python lists: every index a pass needs (where the
response hidden states sit in the model's ``[S, B, H]`` output, the context-parallel exchange plan)
is computed here, so the device never has to answer a data-dependent question (no ``nonzero``, no
boolean-mask gather, no ``.tolist()``) inside the per-micro-batch path. :meth:`MicroBatch.to` is
the one place a micro-batch goes to the device: pinned host memory, non-blocking copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


def to_device(x_host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x_host`` on ``device``: through pinned memory with a non-blocking copy when that is a GPU.

    Why pinned: a pageable host tensor is first staged by the driver (a synchronous copy); a pinned
    one is copied by DMA while the host goes on building the next micro-batch. The caching host
    allocator keeps the pinned block alive until the copy is done, so the host tensor may go.
    """
    if x_host.device == device:
        return x_host
    if device.type == "cpu":
        return x_host.to(device)
    return x_host.pin_memory().to(device, non_blocking=True)


@dataclass
class StepTokens:
    """Per-token tensors the step attaches to a micro-batch (``[N]``, row-major, on its device)."""

    advantages_N: torch.Tensor
    old_logprob_N: torch.Tensor
    """Log-probs of the step-start policy (the old-policy pass)."""
    rollout_logprob_N: torch.Tensor
    """The rollout engine's log-probs."""
    ref_logprob_N: torch.Tensor | None = None
    """Reference-policy log-probs (when the algorithm needs them)."""
    teacher_logprob_N: torch.Tensor | None = None
    """Sampled-token teacher log-probs (rlsd / opsd)."""
    stop_token_N: torch.Tensor | None = None
    """bool: the token that ended its response (``stop_token_mask``), for ``kl_exclude_eos``."""

    def index(self, index_N: torch.Tensor) -> StepTokens:
        """The same tensors at ``index_N`` (a context-parallel rank's tokens)."""
        return StepTokens(**{f.name: _pick(getattr(self, f.name), index_N) for f in fields(self)})


def _pick(x_N: torch.Tensor | None, index_N: torch.Tensor) -> torch.Tensor | None:
    return None if x_N is None else x_N.index_select(0, index_N)


@dataclass(frozen=True)
class CpExchange:
    """Context parallelism: how the teacher hidden states reach the CP rank predicting each token.

    Built on the host by :func:`shard_for_cp`; ``forward._to_student_ranks`` runs one
    ``all_to_all_single`` with it and a gather, nothing data-dependent on the device.
    """

    send_order_N: torch.Tensor
    """Rows of this rank's teacher states in sending order (by destination rank, then token)."""
    send_splits: list[int]
    """Rows sent to each CP rank."""
    recv_splits: list[int]
    """Rows received from each CP rank."""
    gather_index_N: torch.Tensor
    """Received row of each of this rank's student tokens (``cp_index_N`` order)."""

    def to(self, device: torch.device) -> CpExchange:
        return replace(
            self,
            send_order_N=to_device(self.send_order_N, device),
            gather_index_N=to_device(self.gather_index_N, device),
        )


def flat_output_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Rows of a ``[S * B, H]`` view of the model output at the True positions of ``mask_BT``.

    Row-major over ``(b, t)`` like the per-token tensors; position ``(b, t)`` is row ``t * B + b``
    of the sequence-major output. Host-side: the device then needs only an ``index_select``.
    """
    b_N, t_N = mask_BT.nonzero(as_tuple=True)
    return t_N * mask_BT.shape[0] + b_N


@dataclass
class Response:
    """One generated response and everything the trainer needs about it."""

    group: int
    """Index of its prompt within the step (its GRPO group)."""
    prompt_ids: list[int]
    """Student prompt tokens."""
    teacher_prompt_ids: list[int]
    """Teacher prompt tokens (the student prompt when there is no context)."""
    response_ids: list[int]
    """Generated tokens (including a final EOS when generation stopped)."""
    rollout_logprobs: list[float]
    """The engine's log-prob of each generated token."""
    reward: float = 0.0
    """Verifier reward (after the overlong penalty)."""
    acc: float = 0.0
    """1.0 when the answer is correct."""
    truncated: bool = False
    """Generation hit max_response_length."""
    weight_version: int = 0
    """The policy version (trainer step, 0 = initial weights) the server reported generating it with."""


@dataclass
class MicroBatch:
    """Padded student (and teacher) rows of one micro-batch plus its per-token inputs."""

    rows: list[int]
    """Indices of its responses in the rank's response list."""
    input_ids_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    """True at positions whose logits predict a response token."""
    teacher_input_ids_BT: torch.Tensor
    teacher_loss_mask_BT: torch.Tensor
    targets_N: torch.Tensor
    """Response tokens, row-major: what the masked positions predict."""
    seq_index_N: torch.Tensor
    """Row (0..B-1) of each response token."""
    tokens: StepTokens | None = None
    """Per-token tensors of the step (advantages, old/rollout/ref/teacher log-probs), on the micro-batch's
    device; added by the step with ``dataclasses.replace`` after the log-prob passes."""
    teacher_hidden_NH: torch.Tensor | None = None
    """Teacher hidden states of this micro-batch's tokens (sdpg), from the teacher pass; under
    context parallelism only those of this rank's student tokens, in ``cp_index_N`` order."""
    position_ids_BT: torch.Tensor | None = None
    """Global positions of the (local) student columns; None = ``arange(T)``."""
    teacher_position_ids_BT: torch.Tensor | None = None
    cp_index_N: torch.Tensor | None = None
    """Context parallelism: which of the full ``[N]`` tokens this rank's student rows predict, in the
    local row-major order of ``loss_mask_BT`` (None without CP: all of them, in order)."""
    teacher_cp_index_N: torch.Tensor | None = None
    """The same for the teacher rows (their prompts differ, so another subset of the tokens)."""
    cp_exchange: CpExchange | None = None
    """Context parallelism: the plan moving teacher states to the ranks predicting their tokens."""
    seq_tokens_2S: torch.Tensor | None = None
    """CP only: global loss-mask and response tokens per row (``algo.seq_counts``), for seq-mean-token-mean."""
    cp_size: int = 1
    """Context-parallel ranks the rows are split over (1 = whole rows here)."""
    hidden_index_N: torch.Tensor | None = None
    """Rows of the ``[S * B, H]`` student output predicting the (local) response tokens; built on the
    host from ``loss_mask_BT`` when None (pass None again when replacing the masks)."""
    teacher_hidden_index_N: torch.Tensor | None = None
    """The same for the teacher rows."""

    def __post_init__(self) -> None:
        if self.hidden_index_N is None:
            self.hidden_index_N = flat_output_index(self.loss_mask_BT)
        if self.teacher_hidden_index_N is None:
            self.teacher_hidden_index_N = flat_output_index(self.teacher_loss_mask_BT)

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with every tensor on ``device`` (itself when already there)."""
        if self.input_ids_BT.device == device:
            return self
        moved = {
            f.name: to_device(v, device)
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        if self.cp_exchange is not None:
            moved["cp_exchange"] = self.cp_exchange.to(device)
        return replace(self, **moved)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def seq_len(self) -> int:
        """Full padded length (the local length times CP under context parallelism)."""
        return int(self.input_ids_BT.shape[1]) * self.cp_size

    @property
    def teacher_seq_len(self) -> int:
        return int(self.teacher_input_ids_BT.shape[1]) * self.cp_size

    @property
    def num_tokens(self) -> int:
        """Response tokens of the whole micro-batch (all CP ranks)."""
        return int(self.targets_N.numel())


def _cp_split(ids_BT, mask_BT, cp: int, cp_rank: int):
    """This rank's columns of padded rows, their global positions, and the indices of its masked tokens."""
    from sdpg_mcore.ops.cp_attention import cp_positions, split_to_cp_layout

    token_BT = torch.full(mask_BT.shape, -1, dtype=torch.long)
    token_BT[mask_BT] = torch.arange(int(mask_BT.sum()))
    local_mask_BT = split_to_cp_layout(mask_BT, cp, cp_rank, dim=1)
    index_N = split_to_cp_layout(token_BT, cp, cp_rank, dim=1)[local_mask_BT]
    positions_BT = cp_positions(ids_BT.shape[1], cp, cp_rank).expand(ids_BT.shape[0], -1)
    return split_to_cp_layout(ids_BT, cp, cp_rank, dim=1), local_mask_BT, positions_BT, index_N


def shard_for_cp(mb: MicroBatch, cp: int, cp_rank: int) -> MicroBatch:
    """The micro-batch as CP rank ``cp_rank`` runs it: its two load-balanced chunks of every row.

    Why the per-token tensors stay whole: the step aligns old/ref/teacher log-probs and advantages
    with ``targets_N`` row by row, and every CP rank holds the whole step anyway; the forward picks
    this rank's tokens with ``cp_index_N``. Row lengths must be multiples of ``2 * cp``.
    """
    if cp == 1:
        return mb
    student = [_cp_split(mb.input_ids_BT, mb.loss_mask_BT, cp, rank) for rank in range(cp)]
    teacher = [_cp_split(mb.teacher_input_ids_BT, mb.teacher_loss_mask_BT, cp, rank) for rank in range(cp)]
    ids, mask, pos, index = student[cp_rank]
    t_ids, t_mask, t_pos, t_index = teacher[cp_rank]
    owner, t_owner = (torch.empty(mb.num_tokens, dtype=torch.long) for _ in range(2))
    for rank in range(cp):  # every rank's tokens, so ranks can exchange per-token rows (forward.py)
        owner[student[rank][3]] = rank
        t_owner[teacher[rank][3]] = rank
    return replace(
        mb,
        input_ids_BT=ids,
        loss_mask_BT=mask,
        teacher_input_ids_BT=t_ids,
        teacher_loss_mask_BT=t_mask,
        position_ids_BT=pos,
        teacher_position_ids_BT=t_pos,
        cp_index_N=index,
        teacher_cp_index_N=t_index,
        cp_exchange=_cp_exchange(owner, t_owner, index, t_index, cp, cp_rank),
        cp_size=cp,
        hidden_index_N=None,  # rebuilt from the local masks
        teacher_hidden_index_N=None,
    )


def _cp_exchange(owner_N, teacher_owner_N, index_N, teacher_index_N, cp: int, cp_rank: int) -> CpExchange:
    """Where this rank's teacher states go, and where its student tokens' states come from.

    ``owner_N`` / ``teacher_owner_N``: the CP rank predicting / computing the teacher state of each
    of the micro-batch's tokens; ``index_N`` / ``teacher_index_N``: this rank's tokens of each kind.
    Rows travel sorted by (rank, token) both ways, so both sides agree on the order.
    """
    num = owner_N.numel()
    destination = owner_N[teacher_index_N]
    send_order = torch.argsort(destination * num + teacher_index_N)
    mine = torch.nonzero(owner_N == cp_rank).squeeze(1)  # ascending tokens
    source = teacher_owner_N[mine]
    received_tokens = mine[torch.argsort(source * num + mine)]  # the order they arrive in
    row_of_token = torch.empty(num, dtype=torch.long)
    row_of_token[received_tokens] = torch.arange(len(mine))
    return CpExchange(
        send_order_N=send_order,
        send_splits=torch.bincount(destination, minlength=cp).tolist(),
        recv_splits=torch.bincount(source, minlength=cp).tolist(),
        gather_index_N=row_of_token[index_N],
    )


def dp_groups(num_groups: int, dp_size: int, dp_rank: int, mini_batch_groups: int) -> list[list[int]]:
    """The groups this DP rank trains on, per mini-batch: mini-batch m's groups dealt round-robin."""
    out = []
    for start in range(0, num_groups, mini_batch_groups):
        groups = list(range(start, min(start + mini_batch_groups, num_groups)))
        out.append(groups[dp_rank::dp_size])
    return out


def rows_of_groups(responses: Sequence[Response], groups: Sequence[int]) -> list[int]:
    wanted = set(groups)
    return [i for i, r in enumerate(responses) if r.group in wanted]


def _length(r: Response, with_teacher: bool) -> int:
    n = len(r.prompt_ids) + len(r.response_ids)
    return max(n, len(r.teacher_prompt_ids) + len(r.response_ids)) if with_teacher else n


def plan_micro_batches(lengths: Sequence[int], token_budget: int, min_count: int = 1) -> list[list[int]]:
    """Split positions ``0..len-1`` into micro-batches whose padded size ``rows x longest`` fits the budget.

    Longest first, a new micro-batch when the next row would not fit; then the largest micro-batches
    are halved until there are ``min_count`` (every DP rank must run the same number). Rows inside a
    micro-batch are ascending, so the plan is deterministic.
    """
    for n in lengths:
        if n > token_budget:
            raise ValueError(
                f"a sequence of {n} tokens exceeds data.micro_batch_tokens={token_budget}; raise it to at least "
                "max_prompt_length + max_response_length"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    for i in order:
        if plans and (len(plans[-1]) + 1) * lengths[plans[-1][0]] <= token_budget:
            plans[-1].append(i)
        else:
            plans.append([i])
    if min_count > len(lengths):
        raise ValueError(f"cannot make {min_count} micro-batches from {len(lengths)} rows")
    while len(plans) < min_count:
        biggest = max(plans, key=len)
        plans.remove(biggest)
        plans += [biggest[: len(biggest) // 2], biggest[len(biggest) // 2 :]]
    return sorted((sorted(p) for p in plans), key=lambda p: p[0])


def _pad(
    seqs: list[list[int]], prompt_lens: list[int], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, p - 1 : len(seq) - 1] = True
    return ids, mask


def make_micro_batch(
    responses: Sequence[Response], rows: list[int], pad_id: int, pad_multiple: int = 1
) -> MicroBatch:
    """Pad the student and teacher sequences of ``rows``; targets and row indices of the response tokens."""
    picked = [responses[i] for i in rows]
    student = [r.prompt_ids + r.response_ids for r in picked]
    teacher = [r.teacher_prompt_ids + r.response_ids for r in picked]
    ids, mask = _pad(student, [len(r.prompt_ids) for r in picked], pad_id, pad_multiple)
    t_ids, t_mask = _pad(teacher, [len(r.teacher_prompt_ids) for r in picked], pad_id, pad_multiple)
    targets = torch.tensor([t for r in picked for t in r.response_ids], dtype=torch.long)
    seq_index = torch.tensor([b for b, r in enumerate(picked) for _ in r.response_ids], dtype=torch.long)
    return MicroBatch(rows, ids, mask, t_ids, t_mask, targets, seq_index)


def build_micro_batches(
    responses: Sequence[Response],
    rows: list[int],
    token_budget: int,
    pad_id: int,
    *,
    with_teacher: bool,
    min_count: int = 1,
    pad_multiple: int = 1,
) -> list[MicroBatch]:
    """Micro-batches over ``rows`` (indices into ``responses``) by padded-token budget."""
    lengths = [_length(responses[i], with_teacher) for i in rows]
    plans = plan_micro_batches(lengths, token_budget, min_count)
    return [make_micro_batch(responses, [rows[j] for j in plan], pad_id, pad_multiple) for plan in plans]


def num_micro_batches(
    responses: Sequence[Response], rows: list[int], token_budget: int, *, with_teacher: bool
) -> int:
    return len(plan_micro_batches([_length(responses[i], with_teacher) for i in rows], token_budget))


def scatter_rows(
    values: list[torch.Tensor], micro_batches: Sequence[MicroBatch], responses: Sequence[Response]
):
    """Per-micro-batch ``[N]`` tensors -> ``{row: [len(response)]}``."""
    out: dict[int, torch.Tensor] = {}
    for values_N, mb in zip(values, micro_batches):
        lengths = [len(responses[i].response_ids) for i in mb.rows]
        for row, part in zip(mb.rows, torch.split(values_N, lengths)):
            out[row] = part
    return out


def stop_token_mask(response: Response) -> torch.Tensor:
    """bool ``[len]``: True at the token that stopped generation (the last one, unless truncated)."""
    mask = torch.zeros(len(response.response_ids), dtype=torch.bool)
    if response.response_ids and not response.truncated:
        mask[-1] = True
    return mask


def gather_rows(per_row: dict[int, torch.Tensor], mb: MicroBatch) -> torch.Tensor:
    """``{row: [len]}`` -> the micro-batch's ``[N]`` in its row-major token order."""
    return torch.cat([per_row[i] for i in mb.rows])
