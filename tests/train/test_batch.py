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


def test_shard_for_cp_owners_cover_every_token_once():
    """Owner vectors agree with each rank's token indices, and the teacher's longer prompts move some
    tokens to another CP rank (the case the teacher-state all-to-all exists for)."""
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
    for owner, index in (("cp_owner_N", "cp_index_N"), ("teacher_cp_owner_N", "teacher_cp_index_N")):
        owners = getattr(shards[0], owner)
        assert all(torch.equal(getattr(s, owner), owners) for s in shards)
        covered = torch.cat([getattr(s, index) for s in shards])
        assert sorted(covered.tolist()) == list(range(mb.num_tokens))
        for rank, shard in enumerate(shards):
            assert bool((owners[getattr(shard, index)] == rank).all())
    assert bool((shards[0].cp_owner_N != shards[0].teacher_cp_owner_N).any())


def test_stop_token_mask_marks_the_last_token_of_stopped_responses_only():
    def response(ids, truncated):
        return Response(0, [1], [1], ids, [0.0] * len(ids), truncated=truncated)

    assert stop_token_mask(response([5, 6, 7], False)).tolist() == [False, False, True]
    assert stop_token_mask(response([5, 6, 7], True)).tolist() == [False, False, False]
    assert stop_token_mask(response([], False)).tolist() == []
