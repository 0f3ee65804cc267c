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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


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
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token ``[N]`` tensors of the step, by name: ``adv``, ``old``, ``rollout`` and, when the
    algorithm needs them, ``ref`` and ``teacher`` (added by the step with ``dataclasses.replace``)."""
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
    cp_owner_N: torch.Tensor | None = None
    """Context parallelism: the CP rank whose student rows predict each of the full ``[N]`` tokens."""
    teacher_cp_owner_N: torch.Tensor | None = None
    """The same for the teacher rows: where each token's teacher hidden state is computed."""
    seq_tokens_2S: torch.Tensor | None = None
    """CP only: global loss-mask and response tokens per row (``algo.seq_counts``), for seq-mean-token-mean."""
    cp_size: int = 1
    """Context-parallel ranks the rows are split over (1 = whole rows here)."""

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
        cp_owner_N=owner,
        teacher_cp_owner_N=t_owner,
        cp_size=cp,
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
