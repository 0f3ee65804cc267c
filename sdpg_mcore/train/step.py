"""One training step on a scored batch, steps 5-6 of the algorithm (``algo/README.md``):
old/ref/teacher log-probs -> advantages -> one optimizer step per mini-batch (teacher pass, fused KL
head, algorithm loss).

The trainer calls :func:`run_step` between its rollout and weight-sync phases, on every rank, with
the same responses everywhere. What it receives (:class:`StepContext`) is explicit values, not the
run config; each stage below is one function.

Devices: micro-batches are built on the host and moved once (``MicroBatch.to``, pinned and
non-blocking); advantages and rollout log-probs go over in one pinned copy per step; every tensor
handed to a collective lives on the model's device (NCCL needs it). Host syncs left, each because
a host value is really needed: with a KL penalty in the reward, one device-to-host copy of the
old/ref log-probs per step (the advantages are computed on the host from the rewards); one
``.tolist()`` of the four all-reduced loss counts per mini-batch (the normalisers are Python
numbers); the optimizer's grad-norm / found-inf check per mini-batch (Megatron); the metrics reduce
once per step. None per micro-batch. (The trainer's broadcast of the scored batch is another.)
With ``teacher_states="host"`` the teacher states go to pinned host memory and back by non-blocking
copies on the current stream (``train/teacher_states.py``): no sync either.

The teacher pass (sdpg) runs with the current weights, or with other weights swapped into the
policy's chunks for the pass (``algorithm.teacher``: the EMA of ``train/ema_weights.py``, or the frozen
initial weights of ``model_setup.ReferenceWeights``), whose own output-layer shard then feeds the
fused head. Both read the weights outside a forward, so after each optimizer step the step completes
the distributed optimizer's overlapped weight all-gather (``Policy.finish_param_sync``) and only then
updates the EMA.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from sdpg_mcore import algo
from sdpg_mcore.algo.config import TeacherSignal, TeacherWeights
from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.train import batch as batching
from sdpg_mcore.train.forward import hidden_pass, logprob_pass, output_weight, train_pass
from sdpg_mcore.train.metrics_log import PhaseTimer
from sdpg_mcore.train.teacher_states import HostTeacherStates, host_store, state_rows


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
    pad_multiple: int | None = None
    """Pad each micro-batch's length to this multiple; None: the policy's own (TP when its head runs
    under sequence parallelism, else 1). Context parallelism adds its own ``2 * cp`` (and
    ``cp * pad_multiple``) on top."""
    teacher_states: str = "device"
    """Where the sdpg teacher states wait for the train pass: device | host (``trainer.teacher_states``)."""
    ema: object | None = None
    """``ema_weights.EMAWeights``, when the teacher is the EMA of the policy (``algorithm.teacher=ema``)."""
    needs: algo.AlgorithmNeeds = field(init=False)
    """``loss_cfg.needs()``: which passes the step runs."""
    teacher_temperature: float = field(init=False)
    """The teacher's temperature, resolved once: the algorithm's, else the rollout ``temperature``."""
    host_states: HostTeacherStates | None = field(init=False)
    """The pinned host buffer of the teacher states (``teacher_states="host"``), reused every mini-batch."""

    def __post_init__(self) -> None:
        if self.pad_multiple is None:  # the sequence-parallel head splits each row across TP ranks
            self.pad_multiple = self.layout.tp if self.policy.head.sequence_parallel else 1
        self.needs = self.loss_cfg.needs()
        t = self.needs.teacher_temperature
        self.teacher_temperature = self.temperature if t is None else t
        self.host_states = host_store(self.teacher_states)
        store = {TeacherWeights.EMA_POLICY: self.ema, TeacherWeights.FROZEN_REFERENCE: self.reference}
        if self.needs.teacher_weights in store and store[self.needs.teacher_weights] is None:
            raise ValueError(
                f"the {self.needs.teacher_weights.value} teacher needs its weights in the StepContext"
            )


def _collective_groups():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True), ps.get_pipeline_model_parallel_group()


def _plan_count(ctx: StepContext, responses, groups_per_rank: list[list[int]], with_teacher: bool) -> int:
    """Micro-batches every DP rank runs: the most any rank needs (all compute the same plans)."""
    return max(
        batching.num_micro_batches(
            responses, batching.rows_of_groups(responses, g), ctx.token_budget, with_teacher=with_teacher
        )
        for g in groups_per_rank
    )


def _micro_batches(
    ctx: StepContext, responses, groups_per_rank: list[list[int]]
) -> list[batching.MicroBatch]:
    """This rank's micro-batches over its groups (``groups_per_rank[dp_rank]``), equal in count on all DP ranks."""
    lay, with_teacher = ctx.layout, ctx.needs.teacher_prompt
    count = _plan_count(ctx, responses, groups_per_rank, with_teacher)
    rows = batching.rows_of_groups(responses, groups_per_rank[lay.dp_rank])
    mbs = batching.build_micro_batches(
        responses,
        rows,
        ctx.token_budget,
        ctx.pad_id,
        with_teacher=with_teacher,
        min_count=count,
        # CP: 2*cp equal chunks per row, and each rank's S/cp divisible by the SP multiple.
        pad_multiple=math.lcm(2 * lay.cp, lay.cp * ctx.pad_multiple) if lay.cp > 1 else ctx.pad_multiple,
    )
    return [batching.shard_for_cp(mb, lay.cp, lay.cp_rank).to(ctx.policy.device) for mb in mbs]


def step_tokens(per_row: dict[str, dict[int, torch.Tensor]], mb: batching.MicroBatch) -> batching.StepTokens:
    """The micro-batch's per-token tensors from the step's per-row values (all on its device)."""

    def rows(key: str) -> torch.Tensor | None:
        return batching.gather_rows(per_row[key], mb) if key in per_row else None

    return batching.StepTokens(
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


def run_step(ctx: StepContext, step: int, responses: list[batching.Response]) -> dict[str, float]:
    """Train one step on ``responses`` (the same on every rank); returns its metrics (complete on rank 0)."""
    timer, lay = PhaseTimer(), ctx.layout
    dp_cp_group, pp_group = _collective_groups()
    num_groups = max(r.group for r in responses) + 1
    # plans[rank][m]: the groups DP rank ``rank`` trains on in mini-batch m.
    plans = [batching.dp_groups(num_groups, lay.dp, rank, ctx.mini_batch_groups) for rank in range(lay.dp)]
    all_mbs = _micro_batches(ctx, responses, [[g for mini in p for g in mini] for p in plans])
    per_row = _logprob_passes(ctx, responses, all_mbs, timer)
    loss_metrics: dict[str, float] = {}  # filled where the loss is computed (last pipeline stage)
    is_last = per_row["old"] is not None
    if is_last:
        penalty = _host_token_values(responses, per_row, ctx.needs.kl_in_reward_coef, ctx.policy.device)
        if penalty is not None:
            loss_metrics["reward_kl_penalty"] = penalty
    sums, grad_norms, lrs = algo.MetricSums(), [], []
    for m in range(len(plans[lay.dp_rank])):
        mbs = _micro_batches(ctx, responses, [p[m] for p in plans])
        mb_sums, grad_norm, lr = _update(ctx, step, mbs, per_row if is_last else None, loss_metrics, timer)
        for one in mb_sums:  # one running sum over the step's micro-batches, in order
            sums += one
        grad_norms.append(grad_norm)
        lrs.append(lr)
    if is_last:
        loss_metrics.update(sums.reduce(dp_cp_group))
    metrics = _from_last_stage(loss_metrics, pp_group)
    metrics.update(_rollout_stats(responses))
    metrics.update(grad_norm=max(grad_norms), lr=lrs[-1], num_updates=len(grad_norms))
    if "rollout_mismatch" in metrics:
        metrics["logprob_mismatch"] = metrics.pop("rollout_mismatch")
    metrics.update(timer.pop())
    return metrics


def _logprob_passes(ctx: StepContext, responses, mbs, timer: PhaseTimer) -> dict[str, dict | None]:
    """Per-row ``old`` log-probs, and ``ref`` and ``teacher`` where the algorithm needs them (last stage; else None).

    The rlsd teacher (the step-start policy) runs with the old pass; the reference and the opsd
    teacher (the frozen initial policy) run with the reference weights swapped in.
    """
    needs, head, chunks, T = ctx.needs, ctx.policy.head, ctx.policy.chunks, ctx.temperature
    per_row: dict[str, dict | None] = {}
    with timer.phase("old_logprob"):
        per_row["old"] = _scatter(logprob_pass(chunks, mbs, head, temperature=T), mbs, responses)
        if needs.teacher_weights is TeacherWeights.STEP_START_POLICY:
            lp = logprob_pass(chunks, mbs, head, temperature=ctx.teacher_temperature, teacher=True)
            per_row["teacher"] = _scatter(lp, mbs, responses)
    frozen_teacher = (
        needs.teacher_weights is TeacherWeights.FROZEN_REFERENCE
        and needs.teacher_signal is TeacherSignal.SAMPLED_LOGPROB
    )  # a full-KL frozen teacher (sdpg's teacher=initial) runs per mini-batch, in _update
    if needs.ref_logprobs or frozen_teacher:
        with timer.phase("ref_logprob"), ctx.reference.chunks() as ref_chunks:
            if needs.ref_logprobs:
                per_row["ref"] = _scatter(logprob_pass(ref_chunks, mbs, head, temperature=T), mbs, responses)
            if frozen_teacher:
                lp = logprob_pass(ref_chunks, mbs, head, temperature=ctx.teacher_temperature, teacher=True)
                per_row["teacher"] = _scatter(lp, mbs, responses)
    return per_row


def _with_inputs(
    ctx: StepContext, mbs: list[batching.MicroBatch], per_row: dict
) -> list[batching.MicroBatch]:
    """The micro-batches with their per-token tensors (and, under CP, their per-row token counts)."""
    out = []
    for mb in mbs:
        tokens = step_tokens(per_row, mb)
        seq_tokens_2S = None
        if ctx.layout.cp > 1:
            seq_tokens_2S = algo.seq_counts(
                ctx.algorithm, ctx.loss_cfg, tokens.advantages_N, mb.seq_index_N, mb.num_rows
            )
        out.append(replace(mb, tokens=tokens, seq_tokens_2S=seq_tokens_2S))
    return out


def _normalisers(ctx: StepContext, mbs: list[batching.MicroBatch]) -> algo.LossNormalisers:
    """The mini-batch's global loss denominators: token and sequence counts all-reduced over DP x CP
    (one all-reduce of four device counts, then the one host read of the mini-batch)."""
    lay, cfg = ctx.layout, ctx.loss_cfg
    counts = sum(
        algo.loss_counts(ctx.algorithm, cfg, mb.tokens.advantages_N, mb.seq_index_N, mb.num_rows)
        for mb in mbs
    )
    if lay.cp > 1:  # every CP rank holds the whole micro-batch: count it once
        counts = counts * float(lay.cp_rank == 0)
    dist.all_reduce(counts, group=_collective_groups()[0])
    return algo.normalisers_from_counts(
        counts, cfg.loss_agg_mode, mini_batch_rows=sum(mb.num_rows for mb in mbs), dp_size=lay.dp * lay.cp
    )


def _update(ctx: StepContext, step: int, mbs, per_row: dict | None, scalars: dict, timer: PhaseTimer):
    """One mini-batch: teacher pass (sdpg), forward + backward of the loss, optimizer step, EMA update.

    ``per_row`` is None off the last pipeline stage (no loss there). Returns (the metric sums of each
    micro-batch, grad norm, lr).
    """
    head, chunks = ctx.policy.head, ctx.policy.chunks
    norms, teacher_weight = None, None
    if per_row is not None:
        mbs = _with_inputs(ctx, mbs, per_row)
        norms = _normalisers(ctx, mbs)
    if ctx.needs.teacher_signal is TeacherSignal.FULL_KL:
        with timer.phase("teacher"), _teacher_model(ctx) as (teacher_chunks, teacher_weight):
            hidden = hidden_pass(teacher_chunks, mbs, head, keep=_teacher_keeper(ctx, mbs))
        if hidden is not None:
            mbs = [replace(mb, teacher_hidden_NH=h) for mb, h in zip(mbs, hidden)]
    loss_fn = functools.partial(micro_batch_loss, ctx, norms, step, scalars)
    with timer.phase("update"):
        ctx.policy.zero_grad()
        T, teacher_T = ctx.temperature, ctx.teacher_temperature
        sums = train_pass(
            chunks,
            mbs,
            head,
            loss_fn,
            temperature=T,
            teacher_temperature=teacher_T,
            teacher_weight=teacher_weight,
        )
        skipped = ctx.policy.skipped_updates
        grad_norm, lr = ctx.policy.optimizer_step()
        _after_optimizer_step(ctx, updated=ctx.policy.skipped_updates == skipped)
    return sums, grad_norm, lr


@contextlib.contextmanager
def _teacher_model(ctx: StepContext) -> Iterator[tuple[list, torch.Tensor | None]]:
    """The model chunks holding the teacher's weights for the teacher pass, and the teacher's own
    output-layer shard for the fused head (None: the student's, the self-teacher's; also None off
    the last pipeline stage). Swapped-in weights leave the chunks when the block ends, so the shard
    is a copy then (``[V/TP, H]``, kept through the train pass)."""
    kind = ctx.needs.teacher_weights
    if kind is TeacherWeights.CURRENT_POLICY:
        yield ctx.policy.chunks, None
        return
    store = ctx.ema if kind is TeacherWeights.EMA_POLICY else ctx.reference
    with store.chunks() as teacher_chunks:
        weight = None
        if unwrap_model(teacher_chunks[-1]).post_process:  # the last pipeline stage holds the head
            weight = output_weight(teacher_chunks[-1]).detach()
            weight = weight.clone() if teacher_chunks is ctx.policy.chunks else weight
        yield teacher_chunks, weight


def _after_optimizer_step(ctx: StepContext, *, updated: bool) -> None:
    """Make the new weights readable outside a forward when the next teacher pass swaps other weights
    in, and advance the EMA teacher by the update (none when the update was skipped)."""
    kind = ctx.needs.teacher_weights if ctx.needs.teacher_signal is TeacherSignal.FULL_KL else None
    swapped = kind is TeacherWeights.EMA_POLICY or (
        kind is TeacherWeights.FROZEN_REFERENCE and ctx.reference.mode == "cpu_swap"
    )
    if swapped:
        ctx.policy.finish_param_sync()
    if ctx.ema is not None and updated:
        ctx.ema.update()


def _teacher_keeper(ctx: StepContext, mbs: list[batching.MicroBatch]):
    """Where ``hidden_pass`` leaves each micro-batch's teacher states: the host buffer, or None (the device)."""
    if ctx.host_states is None:
        return None
    ctx.host_states.start(sum(state_rows(mb) for mb in mbs))
    return ctx.host_states.keep


def micro_batch_loss(ctx: StepContext, norms, step: int, scalars: dict, mb, kl_N, logprob_N, entropy_N):
    """Megatron's loss for one micro-batch: the algorithm loss and its metric sums (step-level scalars into ``scalars``)."""
    inputs = token_inputs(mb, kl_N, logprob_N, entropy_N)
    out = algo.micro_batch_loss(
        ctx.algorithm, ctx.loss_cfg, inputs, norms, step=step, total_steps=ctx.total_steps
    )
    scalars.update(out.scalars)
    return out.loss, out.metrics


def _scatter(values, mbs, responses):
    return None if values is None else batching.scatter_rows(values, mbs, responses)


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
    stop_N = torch.cat([batching.stop_token_mask(responses[i]) for i in rows]).float()
    adv_N, rollout_N, stop_N = batching.to_device(torch.stack([adv_N, rollout_N, stop_N]), device)
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
