import pytest
import torch

from sdpg_mcore.train.batch import (
    Response,
    build_micro_batches,
    dp_groups,
    gather_rows,
    make_micro_batch,
    plan_micro_batches,
    scatter_rows,
    shard_for_cp,
    stop_token_mask,
)


def _responses():
    return [
        Response(
            group=i // 2,
            prompt_ids=[1] * (3 + i),
            teacher_prompt_ids=[2] * (6 + i),
            response_ids=list(range(10, 12 + i % 3)),
            rollout_logprobs=[0.0] * (2 + i % 3),
        )
        for i in range(6)
    ]


def test_plan_respects_padded_budget_and_min_count():
    lengths = [9, 3, 7, 5, 8, 2]
    plans = plan_micro_batches(lengths, token_budget=16)
    assert sorted(i for p in plans for i in p) == list(range(6))
    for plan in plans:
        assert len(plan) * max(lengths[i] for i in plan) <= 16 and plan == sorted(plan)
    assert len(plan_micro_batches(lengths, 16, min_count=5)) == 5
    with pytest.raises(ValueError, match="micro_batch_tokens=8"):
        plan_micro_batches(lengths, 8)


def test_dp_groups_deal_each_mini_batch():
    assert dp_groups(8, 2, 0, 4) == [[0, 2], [4, 6]]
    assert dp_groups(8, 2, 1, 4) == [[1, 3], [5, 7]]


def test_micro_batch_masks_line_up_student_and_teacher():
    rs = _responses()
    mbs = build_micro_batches(rs, [0, 2, 3, 5], token_budget=30, pad_id=0, with_teacher=True)
    assert sorted(r for mb in mbs for r in mb.rows) == [0, 2, 3, 5]
    for mb in mbs:
        n = sum(len(rs[i].response_ids) for i in mb.rows)
        assert mb.loss_mask_BT.sum() == n == mb.teacher_loss_mask_BT.sum() == mb.targets_N.numel()
        # The masked positions predict exactly the response tokens, in row-major order, for both prompts.
        nxt = torch.roll(mb.input_ids_BT, -1, dims=1)[mb.loss_mask_BT]
        t_nxt = torch.roll(mb.teacher_input_ids_BT, -1, dims=1)[mb.teacher_loss_mask_BT]
        assert torch.equal(nxt, mb.targets_N) and torch.equal(t_nxt, mb.targets_N)
        assert mb.seq_index_N.tolist() == [b for b, i in enumerate(mb.rows) for _ in rs[i].response_ids]
    values = [torch.arange(mb.targets_N.numel(), dtype=torch.float32) + 100 * k for k, mb in enumerate(mbs)]
    per_row = scatter_rows(values, mbs, rs)
    assert all(torch.equal(gather_rows(per_row, mb), v) for mb, v in zip(mbs, values))


def test_shard_for_cp_exchange_delivers_every_teacher_state_to_its_student_rank():
    """Each token is predicted by one CP rank and its teacher state computed on one; the host-built
    exchange plan, replayed as the all-to-all would run it, hands every rank the teacher state of
    each of its student tokens in ``cp_index_N`` order. The teacher's longer prompts move some
    tokens to another rank (the case the all-to-all exists for)."""
    responses = [
        Response(
            group=0,
            prompt_ids=[5] * p,
            teacher_prompt_ids=[6] * (p + 5),
            response_ids=[7] * r,
            rollout_logprobs=[0.0] * r,
        )
        for p, r in [(3, 9), (6, 4), (2, 13)]
    ]
    mb = make_micro_batch(responses, [0, 1, 2], pad_id=0, pad_multiple=8)
    cp = 4
    shards = [shard_for_cp(mb, cp, rank) for rank in range(cp)]
    for index in ("cp_index_N", "teacher_cp_index_N"):
        covered = torch.cat([getattr(s, index) for s in shards])
        assert sorted(covered.tolist()) == list(range(mb.num_tokens))
    # Each rank's teacher "state" of a token is the token id; send buffers split by destination.
    sent = [s.teacher_cp_index_N.index_select(0, s.cp_exchange.send_order_N) for s in shards]
    pieces = [list(torch.split(sent[r], shards[r].cp_exchange.send_splits)) for r in range(cp)]
    moved = 0
    for dst, shard in enumerate(shards):
        received = torch.cat([pieces[src][dst] for src in range(cp)])
        assert received.numel() == sum(shard.cp_exchange.recv_splits)
        got = received.index_select(0, shard.cp_exchange.gather_index_N)
        assert torch.equal(got, shard.cp_index_N)
        moved += sum(n for src, n in enumerate(shard.cp_exchange.recv_splits) if src != dst)
    assert moved > 0


def test_micro_batch_hidden_index_picks_the_masked_positions_of_the_sequence_major_output():
    """``hidden_index_N`` rows of the ``[S * B, H]`` output are the boolean-mask positions, row-major."""
    responses = [
        Response(
            group=0,
            prompt_ids=[5] * p,
            teacher_prompt_ids=[6] * (p + 2),
            response_ids=[7] * r,
            rollout_logprobs=[0.0] * r,
        )
        for p, r in [(3, 4), (1, 6)]
    ]
    mb = make_micro_batch(responses, [0, 1], pad_id=0)
    for mask, index in (
        (mb.loss_mask_BT, mb.hidden_index_N),
        (mb.teacher_loss_mask_BT, mb.teacher_hidden_index_N),
    ):
        b, t = mask.shape
        output_SBH = torch.randn(t, b, 3)
        expected = output_SBH.transpose(0, 1)[mask]
        assert torch.equal(output_SBH.reshape(-1, 3).index_select(0, index), expected)
    assert mb.to(torch.device("cpu")) is mb


def test_stop_token_mask_marks_the_last_token_of_stopped_responses_only():
    def response(ids, truncated):
        return Response(0, [1], [1], ids, [0.0] * len(ids), truncated=truncated)

    assert stop_token_mask(response([5, 6, 7], False)).tolist() == [False, False, True]
    assert stop_token_mask(response([5, 6, 7], True)).tolist() == [False, False, False]
    assert stop_token_mask(response([], False)).tolist() == []
