"""Predicted time of one RL step, phase by phase, as the trainer runs them (``train/step.py``).

    generation     the rollout engines generate ``prompts x n`` responses (``generation_time``)
    old_logprob    forward-only pass over the step's responses with the log-prob head
    ref_logprob    the same with the reference weights swapped in (when the algorithm needs them)
    teacher        SDPG, per mini-batch: forward-only pass over ``[teacher prompt, response]`` (with a
                   guarded teacher, ``algorithm.teacher=ema | initial``, its weights swapped in and out)
    train          per mini-batch: forward + backward with the fused head (student and teacher logits)
    optimizer      per mini-batch: exposed DP reduce-scatter / all-gather and Adam (and the EMA
                   teacher's update of its average)
    weight_sync    the new weights to every engine (``transfer_time``)

Colocated frameworks that move the training state off the GPU for generation add ``state_offload`` and
``state_onload``. With ``rollout.async_steps >= 1`` the next step's rollout is generated while this one
trains, so ``generation`` is only what sticks out beyond the trainer's work. Every phase is on the
critical path of the slowest rank; the total is their sum. ``details`` (seconds) says where the
trainer's phases go: pipeline bubble, tensor-parallel and data-parallel communication, LM head,
reference swap, the guarded teacher's swaps and EMA updates (``teacher_swap``); ``generation_total`` is the whole generation even where an async rollout hides it.

    step = predict_step(shape, layout, work, settings, rollout, SDPG_MCORE, Machine(hw, EFFICIENCY, 8))
    step.total, step.phases, step.tokens_per_s_per_gpu
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpg_mcore.plan.compute_time import Machine, PassSpec, PassTime, optimizer_time, pass_time
from sdpg_mcore.plan.generation_time import GenerationTime, generation_time
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.transfer_time import (
    offload_time,
    reference_swap_time,
    teacher_swap_time,
    weight_sync_time,
)
from sdpg_mcore.plan.workload import Implementation, Rollout, TrainSettings, Workload

PHASES = (
    "generation",
    "state_onload",
    "old_logprob",
    "ref_logprob",
    "teacher",
    "train",
    "optimizer",
    "state_offload",
    "weight_sync",
)


@dataclass(frozen=True)
class StepTime:
    """Seconds per phase (``PHASES`` order, zero-time phases left out) and their sum."""

    phases: dict[str, float]
    details: dict[str, float] = field(default_factory=dict)
    generation: GenerationTime | None = None
    gpus: int = 1
    tokens: float = 0.0
    train_micro_batches: int = 0
    """Train-pass micro-batches per DP rank over the step's mini-batches."""

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Prompt + response tokens of the step per second per GPU (trainer and engines)."""
        return self.tokens / self.total / self.gpus

    def as_dict(self) -> dict:
        return {
            "total_s": self.total,
            "phases": dict(self.phases),
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "details": dict(self.details),
            "gpus": self.gpus,
            "train_micro_batches": self.train_micro_batches,
        }


@dataclass(frozen=True)
class TrainerPasses:
    """The trainer's passes of one step (per step, all mini-batches summed)."""

    old: PassTime
    teacher: PassTime | None
    train: PassTime
    optimizer: float
    dp_comm: float
    teacher_states_copy: float
    teacher_swap: float = 0.0
    """The guarded teacher's weight swaps, one per teacher pass (``transfer_time.teacher_swap_time``)."""
    ema_update: float = 0.0
    """The EMA teacher's updates, one per optimizer step."""


def logprob_spec(work: Workload, layout: Layout, settings: TrainSettings, impl: Implementation) -> PassSpec:
    """The forward-only log-prob pass over a DP rank's share of the step."""
    rows = work.mini_batches * work.rows_per_rank(layout.dp, impl.whole_groups)
    head = work.row_len if impl.head_all_positions else work.lengths.mean
    return PassSpec(
        tokens=rows * work.row_len,
        budget=_student_budget(settings.logprob_tokens, work),
        context=work.attended_context(),
        head_tokens=rows * head,
        head_matmuls=1,
        head_bytes=impl.head_bytes_logprob,
    )


def _student_budget(budget: int, work: Workload) -> int:
    """Student tokens per micro-batch when rows are planned on the (longer) teacher rows, as the step
    plans them for SDPG: the budget times student / teacher row length."""
    teacher_row = work.row_len + (work.teacher_extra_len if work.teacher_pass else 0.0)
    return max(1, int(budget * work.row_len / teacher_row))


def train_specs(
    work: Workload, layout: Layout, settings: TrainSettings, impl: Implementation
) -> tuple[PassSpec, PassSpec | None]:
    """(train pass, teacher pass or None) of one mini-batch on a DP rank; micro-batches are planned on
    the longer of the student and teacher rows, so both passes run as many."""
    rows = work.rows_per_rank(layout.dp, impl.whole_groups)
    teacher_row = work.row_len + (work.teacher_extra_len if work.teacher_pass else 0.0)
    head = work.row_len if impl.head_all_positions else work.lengths.mean
    teach = work.teacher_pass
    train = PassSpec(
        tokens=rows * work.row_len,
        budget=_student_budget(settings.micro_batch_tokens, work),
        context=work.attended_context(),
        head_tokens=rows * head,
        head_matmuls=impl.head_matmuls_train + (impl.head_matmuls_teacher if teach else 0),
        head_bytes=impl.head_bytes_train + (impl.head_bytes_teacher if teach else 0.0),
        backward=True,
        recompute=settings.recompute == "full",
    )
    if not teach:
        return train, None
    teacher = PassSpec(
        tokens=rows * teacher_row,
        budget=settings.micro_batch_tokens,
        context=work.attended_context(work.teacher_extra_len),
    )
    return train, teacher


def trainer_passes(
    shape: ModelShape,
    layout: Layout,
    work: Workload,
    settings: TrainSettings,
    impl: Implementation,
    m: Machine,
) -> TrainerPasses:
    """Log-prob pass, and per mini-batch teacher + train passes and the optimizer step, times ``mini_batches``."""
    old = pass_time(shape, layout, logprob_spec(work, layout, settings, impl), m)
    train_spec, teacher_spec = train_specs(work, layout, settings, impl)
    train = pass_time(shape, layout, train_spec, m)
    teacher = pass_time(shape, layout, teacher_spec, m) if teacher_spec else None
    per_mb = train.compute / train.micro_batches
    passes = 4 if train_spec.recompute else 3
    opt = optimizer_time(
        shape,
        layout,
        m,
        grad_bytes=impl.grad_bytes,
        hide_reduce_s=per_mb * (passes - 1) / passes if settings.overlap_grad_reduce else 0.0,  # its backward
        hide_gather_s=per_mb / passes if settings.overlap_param_gather else 0.0,
    )
    copy = 0.0
    if teacher_spec and settings.teacher_states_host:  # [N, H] bf16 out after teacher, back before train
        states = train_spec.head_tokens / layout.cp * shape.hidden_size * 2
        copy = 2 * states / (m.hw.host_link_bytes_per_s * m.eff.link)
    k = work.mini_batches
    swap, update = teacher_swap_time(shape, layout, settings, impl, m) if teacher_spec else (0.0, 0.0)
    return TrainerPasses(
        old=old,
        teacher=_scaled(teacher, k) if teacher else None,
        train=_scaled(train, k),
        optimizer=k * (opt.total + update),
        dp_comm=k * (opt.grad_reduce + opt.param_gather),
        teacher_states_copy=k * copy,
        teacher_swap=k * swap,
        ema_update=k * update,
    )


def _scaled(t: PassTime, k: int) -> PassTime:
    return PassTime(
        compute=k * t.compute,
        head=k * t.head,
        tp_comm=k * t.tp_comm,
        cp_comm=k * t.cp_comm,
        pp_p2p=k * t.pp_p2p,
        bubble=k * t.bubble,
        micro_batches=k * t.micro_batches,
    )


def predict_step(
    shape: ModelShape,
    layout: Layout,
    work: Workload,
    settings: TrainSettings,
    rollout: Rollout,
    impl: Implementation,
    m: Machine,
) -> StepTime:
    """The phases of one step (module docstring)."""
    passes = trainer_passes(shape, layout, work, settings, impl, m)
    swap = reference_swap_time(shape, layout, impl, m) if work.reference_pass else 0.0
    gen = generation_time(shape, work, rollout, m)
    sync = weight_sync_time(shape, layout, rollout, impl, m)
    phases = {
        "old_logprob": passes.old.total,
        "ref_logprob": passes.old.total + swap if work.reference_pass else 0.0,
        "teacher": (
            passes.teacher.total + passes.teacher_states_copy / 2 + passes.teacher_swap
            if passes.teacher
            else 0.0
        ),
        "train": passes.train.total + passes.teacher_states_copy / 2,
        "optimizer": passes.optimizer,
        "weight_sync": sync.total,
    }
    if rollout.colocated and impl.offload_training_state:
        phases["state_offload"], phases["state_onload"] = offload_time(shape, layout, m, impl.offload_pinned)
    busy = sum(phases.values())
    phases["generation"] = (
        max(0.0, gen.total - busy) if rollout.async_steps and not rollout.colocated else gen.total
    )
    bubble = passes.old.bubble * (2 if work.reference_pass else 1) + passes.train.bubble
    heads = passes.old.head * (2 if work.reference_pass else 1) + passes.train.head
    tp = passes.old.tp_comm * (2 if work.reference_pass else 1) + passes.train.tp_comm
    if passes.teacher:
        bubble, tp = bubble + passes.teacher.bubble, tp + passes.teacher.tp_comm
    details = {
        "generation_total": gen.total,
        "pipeline_bubble": bubble,
        "tp_comm": tp,
        "dp_comm": passes.dp_comm,
        "lm_head": heads,
        "reference_swap": swap,
        "teacher_swap": passes.teacher_swap + passes.ema_update,
    }
    gpus = layout.world_size + (0 if rollout.colocated else rollout.gpus)
    ordered = {name: phases[name] for name in PHASES if phases.get(name)}
    return StepTime(
        phases=ordered,
        details=details,
        generation=gen,
        gpus=gpus,
        tokens=work.tokens,
        train_micro_batches=passes.train.micro_batches,
    )
