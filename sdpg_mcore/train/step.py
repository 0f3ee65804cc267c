"""One training step, as SDPG.md §2: rollout -> reward -> advantages -> old/ref log-probs -> mini-batch
updates (teacher pass, fused KL head, algorithm loss, optimizer) -> weight sync.

Everything this function calls is in its own module; what it receives (:class:`StepContext`) is
explicit values, not the run config. Runs on every rank: rank 0 generates, all ranks train.

Devices: micro-batches are built on the host and moved once (``MicroBatch.to``, pinned and
non-blocking); advantages and rollout log-probs go over in one pinned copy per step; every tensor
handed to a collective lives on the model's device (NCCL needs it). Host syncs left, each because
a host value is really needed: the broadcast of the rollout batch (Python objects); with a KL
penalty in the reward, one device-to-host copy of the old/ref log-probs per step (the advantages
are computed on the host from the rewards); one ``.tolist()`` of the four all-reduced loss counts
per mini-batch (the normalisers are Python numbers); the optimizer's grad-norm / found-inf check
per mini-batch (Megatron); the metrics reduce once per step. None per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sdpg_mcore import algo
from sdpg_mcore.algo.config import TeacherSignal, TeacherWeights
from sdpg_mcore.train import batch as B
from sdpg_mcore.train.forward import hidden_pass, logprob_pass, train_pass
from sdpg_mcore.train.metrics_log import PhaseTimer
from sdpg_mcore.train.rollout_io import broadcast_responses


@dataclass
class StepContext:
    """What a step needs, resolved once by the trainer."""

    policy: object  # model_setup.Policy
    reference: object | None  # model_setup.ReferenceWeights, when the algorithm needs the frozen policy
    algorithm: algo.Algorithm
    loss_cfg: algo.PolicyLossConfig
    layout: object  # parallel.state.ParallelLayout
    temperature: float
    token_budget: int
    mini_batch_groups: int
    total_steps: int
    pad_id: int
    pad_multiple: int = 1
    """Pad each micro-batch's length to this multiple (TP under sequence parallelism); context
    parallelism adds its own ``2 * cp`` (and ``cp * pad_multiple``) on top."""


def _collective_groups():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True), ps.get_pipeline_model_parallel_group()


def _plan_count(ctx: StepContext, responses, groups_per_rank: list[list[int]], with_teacher: bool) -> int:
    """Micro-batches every DP rank runs: the most any rank needs (all compute the same plans)."""
    return max(
        B.num_micro_batches(
            responses, B.rows_of_groups(responses, g), ctx.token_budget, with_teacher=with_teacher
        )
        for g in groups_per_rank
    )


def _micro_batches(ctx, responses, groups_of, m: int | None, with_teacher: bool) -> list[B.MicroBatch]:
    """This rank's micro-batches for mini-batch ``m`` (None: the whole step), equal in count on all DP ranks."""
    lay = ctx.layout
    plans = [groups_of(r) if m is None else groups_of(r)[m] for r in range(lay.dp)]
    plans = [[g for mb in p for g in mb] if m is None else p for p in plans]
    count = _plan_count(ctx, responses, plans, with_teacher)
    rows = B.rows_of_groups(responses, plans[lay.dp_rank])
    mbs = B.build_micro_batches(
        responses,
        rows,
        ctx.token_budget,
        ctx.pad_id,
        with_teacher=with_teacher,
        min_count=count,
        # CP: 2*cp equal chunks per row, and each rank's S/cp divisible by the SP multiple.
        pad_multiple=math.lcm(2 * lay.cp, lay.cp * ctx.pad_multiple) if lay.cp > 1 else ctx.pad_multiple,
    )
    return [B.shard_for_cp(mb, lay.cp, lay.cp_rank).to(ctx.policy.device) for mb in mbs]


def step_tokens(per_row: dict[str, dict[int, torch.Tensor]], mb: B.MicroBatch) -> B.StepTokens:
    """The micro-batch's per-token tensors from the step's per-row values (all on its device)."""

    def rows(key: str) -> torch.Tensor | None:
        return B.gather_rows(per_row[key], mb) if key in per_row else None

    return B.StepTokens(
        advantages_N=rows("adv"),
        old_logprob_N=rows("old"),
        rollout_logprob_N=rows("rollout"),
        ref_logprob_N=rows("ref"),
        teacher_logprob_N=rows("teacher"),
        stop_token_N=rows("stop"),
    )


def token_inputs(mb, kl_N, logprob_N, entropy_N) -> algo.TokenInputs:
    """The loss inputs of one micro-batch: the head's per-token outputs plus the step's stored tensors."""
    t = mb.tokens
    return algo.TokenInputs(
        logprob_N=logprob_N,
        old_logprob_N=t.old_logprob_N,
        advantages_N=t.advantages_N,
        seq_index_N=mb.seq_index_N,
        num_seqs=mb.num_rows,
        kl_N=kl_N,
        entropy_N=entropy_N,
        ref_logprob_N=t.ref_logprob_N,
        teacher_logprob_N=t.teacher_logprob_N,
        rollout_logprob_N=t.rollout_logprob_N,
        stop_token_N=t.stop_token_N,
        seq_loss_tokens_S=None if mb.seq_tokens_2S is None else mb.seq_tokens_2S[0],
        seq_response_tokens_S=None if mb.seq_tokens_2S is None else mb.seq_tokens_2S[1],
    )


def run_step(ctx: StepContext, step: int, generate: Callable, sync_weights: Callable) -> dict[str, float]:
    """Train one step; returns the step's metrics (complete on global rank 0)."""
    timer, lay, cfg = PhaseTimer(), ctx.layout, ctx.loss_cfg
    needs, head, chunks = cfg.needs(), ctx.policy.head, ctx.policy.chunks
    dp_cp_group, pp_group = _collective_groups()
    # 1-3. Rollout and reward on rank 0 (with DAPO filtering when enabled), then every rank gets the batch.
    with timer.phase("rollout"):
        responses, metrics = generate(step) if dist.get_rank() == 0 else (None, {})
        responses = broadcast_responses(responses)
    num_groups = max(r.group for r in responses) + 1
    groups_of = lambda rank: B.dp_groups(num_groups, lay.dp, rank, ctx.mini_batch_groups)  # noqa: E731
    with_teacher = needs.teacher_prompt

    # 5. Old log-probs (and the rlsd teacher: the step-start policy), reference log-probs (and the opsd teacher).
    loss_metrics: dict[str, float] = {}  # filled where the loss is computed (last pipeline stage)
    all_mbs = _micro_batches(ctx, responses, groups_of, None, with_teacher)
    per_row = _logprob_passes(ctx, all_mbs, responses, timer)
    is_last = per_row["old"] is not None

    # 4. Group-relative advantages (GRPO: reward minus the k1 penalty when configured); loss ranks only.
    if is_last:
        penalty = _host_token_values(responses, per_row, needs.kl_in_reward_coef, ctx.policy.device)
        if penalty is not None:
            loss_metrics["reward_kl_penalty"] = penalty

    # 6. One optimizer step per mini-batch; micro-batches by token budget through the 1F1B schedule.
    sums, grad_norms, lrs = algo.MetricSums(), [], []
    for m in range(len(groups_of(lay.dp_rank))):
        mbs = _micro_batches(ctx, responses, groups_of, m, with_teacher)
        norms = _attach_tokens(ctx, mbs, per_row, dp_cp_group) if is_last else None
        if needs.teacher_signal is TeacherSignal.FULL_KL:
            with timer.phase("teacher"):
                hidden = hidden_pass(chunks, mbs, head)
            for mb, h in zip(mbs, hidden or []):
                mb.teacher_hidden_NH = h

        def loss_fn(mb, kl_N, logprob_N, entropy_N, norms=norms):
            inputs = token_inputs(mb, kl_N, logprob_N, entropy_N)
            out = algo.micro_batch_loss(
                ctx.algorithm, cfg, inputs, norms, step=step, total_steps=ctx.total_steps
            )
            loss_metrics.update(out.scalars)
            return out.loss, out.metrics

        with timer.phase("update"):
            ctx.policy.zero_grad()
            for mb_sums in train_pass(
                chunks,
                mbs,
                head,
                loss_fn,
                temperature=ctx.temperature,
                teacher_temperature=needs.teacher_temperature or 1.0,
            ):
                sums += mb_sums
            grad_norm, lr = ctx.policy.optimizer_step()
        grad_norms.append(grad_norm)
        lrs.append(lr)

    # 7. New weights to the rollout servers (complete first when the weight all-gather overlaps forwards).
    ctx.policy.finish_param_sync()
    with timer.phase("weight_sync"):
        sync_weights(step)

    if is_last:
        loss_metrics.update(sums.reduce(dp_cp_group))
    metrics.update(_from_last_stage(loss_metrics, pp_group))  # rank 0 keeps its rollout metrics
    metrics.update(_rollout_stats(responses))
    metrics.update(grad_norm=max(grad_norms), lr=lrs[-1], num_updates=len(grad_norms))
    if "rollout_mismatch" in metrics:
        metrics["logprob_mismatch"] = metrics.pop("rollout_mismatch")
    metrics.update(timer.pop())
    return metrics


def _logprob_passes(ctx: StepContext, mbs, responses, timer) -> dict[str, dict[int, torch.Tensor] | None]:
    """Per-row old (and reference / sampled-token teacher) log-probs; values None off the last stage."""
    needs, head, chunks = ctx.loss_cfg.needs(), ctx.policy.head, ctx.policy.chunks
    per_row: dict = {}
    with timer.phase("old_logprob"):
        per_row["old"] = _scatter(
            logprob_pass(chunks, mbs, head, temperature=ctx.temperature), mbs, responses
        )
        if needs.teacher_weights is TeacherWeights.STEP_START_POLICY:
            temperature = needs.teacher_temperature or ctx.temperature
            lp = logprob_pass(chunks, mbs, head, temperature=temperature, teacher=True)
            per_row["teacher"] = _scatter(lp, mbs, responses)
    if needs.ref_logprobs or needs.teacher_weights is TeacherWeights.FROZEN_REFERENCE:
        with timer.phase("ref_logprob"), ctx.reference.chunks() as ref_chunks:
            if needs.ref_logprobs:
                lp = logprob_pass(ref_chunks, mbs, head, temperature=ctx.temperature)
                per_row["ref"] = _scatter(lp, mbs, responses)
            if needs.teacher_weights is TeacherWeights.FROZEN_REFERENCE:
                lp = logprob_pass(ref_chunks, mbs, head, temperature=needs.teacher_temperature, teacher=True)
                per_row["teacher"] = _scatter(lp, mbs, responses)
    return per_row


def _attach_tokens(ctx: StepContext, mbs, per_row, dp_cp_group):
    """Set each micro-batch's per-token tensors; the mini-batch's loss normalisers (one all-reduce of
    four device counts, then the one host read of the mini-batch)."""
    lay, cfg = ctx.layout, ctx.loss_cfg
    for mb in mbs:
        mb.tokens = step_tokens(per_row, mb)
    counts = sum(
        algo.loss_counts(ctx.algorithm, cfg, mb.tokens.advantages_N, mb.seq_index_N, mb.num_rows)
        for mb in mbs
    )
    if lay.cp > 1:  # every CP rank holds the whole micro-batch: count it once
        counts = counts * float(lay.cp_rank == 0)
        for mb in mbs:
            mb.seq_tokens_2S = algo.seq_counts(
                ctx.algorithm, cfg, mb.tokens.advantages_N, mb.seq_index_N, mb.num_rows
            )
    dist.all_reduce(counts, group=dp_cp_group)
    return algo.normalisers_from_counts(
        counts, cfg.loss_agg_mode, mini_batch_rows=sum(mb.num_rows for mb in mbs), dp_size=lay.dp * lay.cp
    )


def _scatter(values, mbs, responses):
    return None if values is None else B.scatter_rows(values, mbs, responses)


def _host_token_values(responses, per_row, kl_coef: float, device: torch.device) -> float | None:
    """Set ``per_row["adv"]``, ``["rollout"]`` and ``["stop"]`` on ``device`` (one pinned copy); the mean
    k1 penalty when the reward carries a KL term (GRPO), else None.

    Why on the host: rewards and rollout log-probs arrive as Python numbers and the group statistics
    are a few hundred values; only the KL penalty needs device values (one copy back per step).
    """
    rows = sorted(per_row["old"])
    lengths = [len(responses[i].response_ids) for i in rows]
    rewards_B = torch.tensor([responses[i].reward for i in rows], dtype=torch.float32)
    groups_B = torch.tensor([responses[i].group for i in rows], dtype=torch.long)
    penalty = None
    if kl_coef:
        seq_N = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
        old_N = torch.cat([per_row["old"][i] for i in rows]).cpu()  # host sync: the reward needs it
        ref_N = torch.cat([per_row["ref"][i] for i in rows]).cpu()
        rewards_B, k1_B = algo.kl_in_reward(rewards_B, old_N, ref_N, seq_N, coef=kl_coef)
        penalty = float(k1_B.mean())
    adv_B = algo.grpo_advantages(rewards_B, groups_B).float()
    adv_N = torch.repeat_interleave(adv_B, torch.tensor(lengths))
    rollout_N = torch.tensor([lp for i in rows for lp in responses[i].rollout_logprobs], dtype=torch.float32)
    if rollout_N.numel() != adv_N.numel():
        raise ValueError("rollout_logprobs must hold one log-prob per response token")
    stop_N = torch.cat([B.stop_token_mask(responses[i]) for i in rows]).float()
    adv_N, rollout_N, stop_N = B.to_device(torch.stack([adv_N, rollout_N, stop_N]), device)
    per_row["adv"] = dict(zip(rows, adv_N.split(lengths)))
    per_row["rollout"] = dict(zip(rows, rollout_N.split(lengths)))
    per_row["stop"] = dict(zip(rows, (stop_N > 0.5).split(lengths)))
    return penalty


def _from_last_stage(metrics: dict, pp_group) -> dict:
    """The last pipeline stage's metrics on every stage of the pipeline (rank 0 logs them)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return box[0]


def _rollout_stats(responses) -> dict[str, float]:
    lengths = torch.tensor([len(r.response_ids) for r in responses], dtype=torch.float32)
    return {
        "reward_mean": sum(r.reward for r in responses) / len(responses),
        "acc": sum(r.acc for r in responses) / len(responses),
        "response_len_mean": float(lengths.mean()),
        "response_len_max": float(lengths.max()),
        "response_clip_ratio": sum(r.truncated for r in responses) / len(responses),
        "num_responses": len(responses),
        "num_tokens": sum(len(r.prompt_ids) + len(r.response_ids) for r in responses),
    }
