"""The run, top-down: :func:`setup` builds a :class:`Run` from a validated :class:`Config`, :func:`loop` trains it.

Each step is six phases, one function each, in this order (every rank runs every phase):

- :func:`rollout`: rank 0 generates ``rollout.n`` responses per prompt and scores each once (DAPO
  dynamic sampling drops all-equal groups); every rank gets the scored batch.
- ``run_step`` (``step.py``): old/reference/teacher log-probs, group advantages, one optimizer
  step per mini-batch.
- :func:`sync_weights`: the new weights to the rollout servers.
- :func:`evaluate`: held-out avg@k / pass@k on evaluation steps (rank 0).
- :func:`log`: metrics to jsonl / TensorBoard / wandb and the progress line.
- :func:`save`: a checkpoint on save steps, at the end, or when asked to stop (SIGUSR1).

This is the only module below the CLI that reads the config; it hands the typed sections to the
rollout session and the policy builder, and explicit values to the step.

    train(load_config("examples/tiny/sdpg.yaml", ["trainer.total_steps=20"]))   # on every rank
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_mcore import algo
from sdpg_mcore.config import Config, config_to_dict, dump_config, resolve_world
from sdpg_mcore.models.spec import resolve_transformer_impl
from sdpg_mcore.parallel.lifetime import kill_children_with_parent
from sdpg_mcore.train import async_rollout, health, mechanism
from sdpg_mcore.train import checkpoint as ckpt
from sdpg_mcore.train.batch import Response
from sdpg_mcore.train.colocate import Colocation, TrainerOffload, release_before_start
from sdpg_mcore.train.ema_weights import EMAWeights, ema_teacher
from sdpg_mcore.train.failure import rank_log_path
from sdpg_mcore.train.metrics_log import MetricsLogger, PhaseTimer
from sdpg_mcore.train.model_setup import Policy, build_policy, reference_weights
from sdpg_mcore.train.progress import StepProgress, setup_logging
from sdpg_mcore.train.rollout_io import RolloutSession, WeightPusher, broadcast_responses, served
from sdpg_mcore.train.step import StepContext, run_step

logger = logging.getLogger(__name__)

#: Env var naming the file whose existence asks for checkpoint-and-exit (set by ``slurm/lib.sh``).
SAVE_FILE_ENV = "SDPG_SAVE_FILE"


class SaveRequest:
    """Checkpoint-and-exit asked for by SIGUSR1 or by the save file; every rank agrees on it.

    ``slurm/lib.sh`` forwards the time-limit SIGUSR1 to the trainer and touches the save file (env
    ``SDPG_SAVE_FILE``, default ``RUN_DIR/SAVE_AND_EXIT``). The signal handler only sets a flag;
    :meth:`requested` (at step boundaries, on every rank) takes the MAX over ranks, so a signal
    that reached one rank, or a file seen by one node, stops all ranks after the same step.
    """

    def __init__(self, save_file: Path):
        self.save_file = save_file
        self.signalled = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal.signal: main thread only
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """Collective: whether any rank got SIGUSR1 or sees the save file."""
        flag = torch.tensor([int(self.signalled or self.save_file.exists())], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self, *, remove_file: bool) -> None:
        """Restore the previous SIGUSR1 handler; remove the save file once the request is served."""
        if remove_file:
            self.save_file.unlink(missing_ok=True)
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None


@dataclass
class Run:
    """Everything the loop reads, built once by :func:`setup`; ``close`` stops what it started."""

    cfg: Config
    rank0: bool
    dataset: object  # data.PromptDataset
    sampler: object  # data.PromptSampler, saved in checkpoints
    policy: Policy
    step_ctx: StepContext
    session: RolloutSession | None  # rank 0 only
    weights: WeightPusher
    colocation: Colocation
    sink: MetricsLogger
    progress: StepProgress
    save_request: SaveRequest
    start_step: int
    evals: dict[str, object] = field(default_factory=dict)  # held-out sets by name, rank 0 only

    def steps(self) -> range:
        """The steps left: after the resumed one, up to ``trainer.stop_at_step`` or ``total_steps``."""
        tr = self.cfg.trainer
        return range(self.start_step + 1, min(tr.stop_at_step or tr.total_steps, tr.total_steps) + 1)

    def close(self) -> None:
        self.progress.close()
        self.sink.close()
        self.weights.close()
        if self.session is not None:
            self.session.close()


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) the training described by ``cfg``; collective over all ranks. Returns the last metrics.

    Stops early, with a checkpoint and a normal return, after the step during which SIGUSR1 arrived
    or the save file appeared (:class:`SaveRequest`); the handler is installed first, so a signal
    during model building is not fatal either.
    """
    kill_children_with_parent()  # Megatron's checkpoint writers must not outlive a killed trainer
    save_file = os.environ.get(SAVE_FILE_ENV) or Path(cfg.trainer.run_dir) / "SAVE_AND_EXIT"
    save_request = SaveRequest(Path(save_file))
    try:
        run = setup(cfg, save_request)
        try:
            return loop(run)
        finally:
            run.close()
    finally:
        save_request.close(remove_file=False)


def loop(run: Run) -> dict[str, float]:
    """Train step after step: rollout (generate + score) -> step -> sync -> eval -> log -> save.

    Returns the last step's metrics (complete on rank 0).
    """
    metrics: dict[str, float] = {}
    guard = health.NonFiniteGuard(run.cfg.trainer.nonfinite_patience)
    # rollout.async_steps picks the rollout and weight-sync phases: these two, or the overlapped ones
    # (async_rollout.py) that generate the next steps' rollouts with ``generate`` while this one trains.
    with async_rollout.phases(run, rollout, sync_weights, generate) as (get_rollout, push_weights):
        for step in run.steps():
            began = time.perf_counter()
            responses, metrics = get_rollout(run, step)
            metrics.update(run_step(run.step_ctx, step, responses))
            guard.check(step, metrics, run.policy.skipped_updates)
            metrics.update(push_weights(run, step))
            seconds = time.perf_counter() - began
            metrics.update(evaluate(run, step))
            log(run, step, metrics, seconds)
            if save(run, step):
                break
    return metrics


def rollout(run: Run, step: int) -> tuple[list[Response], dict[str, float]]:
    """This step's prompts; rank 0 generates and scores them; every rank returns the scored responses.

    When restarted servers wait for weights that only every rank can push, they get them and rank 0
    generates again, drawing the same prompts (``served``)."""
    timer = PhaseTimer()
    with timer.phase("rollout"):
        # Colocated engines released for a checkpoint need the memory and step - 1's weights again.
        run.colocation.before_generation(lambda: run.weights(step - 1))
        first = run.sampler.next_batch()  # on every rank: the sampler state is checkpointed
        after_first = copy.deepcopy(run.sampler.state_dict())

        def produce():
            run.sampler.load_state_dict(after_first)  # dynamic sampling draws again from here
            return generate(run, run.session, run.sampler, first, step)

        responses, metrics = served(run.weights, run.rank0, produce) or (None, {})
        responses = broadcast_responses(responses)
        run.colocation.to_training()  # colocated: the engines hand the memory back for the step
    return responses, {**metrics, **async_rollout.staleness(responses, step), **timer.pop()}


def generate(run: Run, session, sampler, first: list[int], step: int) -> tuple[list[Response], dict]:
    """Rank 0: step ``step``'s scored responses for the prompts ``first``, more drawn from ``sampler``
    only when dynamic sampling asks for them. No collective: the asynchronous rollouts call it from
    their thread with their own session and sampler."""

    def batches() -> Iterator[list]:
        yield run.dataset.batch(first)
        while True:
            yield run.dataset.batch(sampler.next_batch())

    return session.generate(batches(), step, run.cfg.trainer.seed)


def sync_weights(run: Run, step: int) -> dict[str, float]:
    """Push the policy's new weights to the rollout servers (collective), as version ``step``.

    With ``parallel.overlap_param_gather`` the optimizer's updated shards are all-gathered during the
    next forward; the push needs them now, so the gather completes first. Colocated, the memory
    goes to the engines around the push (``train/colocate.py``).
    """
    timer = PhaseTimer()
    with timer.phase("weight_sync"):
        run.policy.finish_param_sync()
        health.check_weights(run.policy.chunks, step, run.policy.optimizer.param_groups[0]["lr"])
        run.colocation.sync(lambda: run.weights(step))
    return timer.pop()


def evaluate(run: Run, step: int) -> dict[str, float]:
    """avg@k and pass@k per held-out file, every ``eval.interval`` steps and after the last (rank 0
    evaluates; every rank takes part when restarted servers need the weights pushed: ``served``)."""
    ev, total = run.cfg.eval, run.cfg.trainer.total_steps
    if not (ev.interval and ev.files and (step % ev.interval == 0 or step == total)):
        return {}
    return served(run.weights, run.rank0, lambda: _evaluate_files(run, step)) or {}


def _evaluate_files(run: Run, step: int) -> dict[str, float]:
    ev = run.cfg.eval
    out: dict[str, float] = {}
    for name, dataset in run.evals.items():
        count = len(dataset) if not ev.max_prompts else min(ev.max_prompts, len(dataset))
        prompts = dataset.batch(list(range(count)))
        if ev.mechanism and (not ev.mechanism_sets or name in ev.mechanism_sets):
            # the same avg@k / pass@k plus the self-distillation probe (train/mechanism.py)
            out.update(mechanism.probe(run.session, run.policy, run.cfg.model.path, name, prompts, ev, step))
        else:
            out.update(run.session.evaluate(name, prompts, ev.n_samples, ev.temperature, seed=step))
    return out


def log(run: Run, step: int, metrics: dict[str, float], seconds: float) -> None:
    """Step time and throughput, then the metrics to the sinks and the progress display."""
    metrics["step_seconds"] = seconds
    metrics["tokens_per_s"] = metrics.pop("num_tokens", 0.0) / seconds
    run.sink.log(step, metrics)
    run.progress.step_done(step, metrics)


def save(run: Run, step: int) -> bool:
    """Checkpoint on save steps, the last step, or when asked to stop; True when the run must stop now."""
    tr = run.cfg.trainer
    stop = run.save_request.requested()
    if stop or step == tr.total_steps or (tr.save_interval and step % tr.save_interval == 0):
        run.colocation.to_training()  # the checkpoint reads the trainer's state
        path = ckpt.save_checkpoint(
            Path(tr.run_dir) / "checkpoints",
            step,
            run.policy.chunks,
            run.policy.optimizer,
            run.policy.scheduler,
            hf_dir=run.cfg.model.path,
            extra_state={"sampler": run.sampler.state_dict()},
            keep_last=tr.keep_checkpoints or None,
            teacher_ema=run.step_ctx.ema,
        )
    if stop:
        logger.info("save requested (SIGUSR1 or %s): saved %s; exiting", run.save_request.save_file, path)
        if run.rank0:
            run.save_request.close(remove_file=True)
    return stop


# ---------------------------------------------------------------- set-up


def setup(cfg: Config, save_request: SaveRequest) -> Run:
    """Ranks, data, policy (and reference), resumed state, rollout servers and sinks; collective."""
    from sdpg_mcore.parallel import state

    env = state.initialize_distributed()
    resolve_world(cfg, env.world_size)
    use_te = resolve_transformer_impl(cfg.model.transformer_impl)
    layout = state.initialize_model_parallel(
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.trainer.seed
    )
    rank0 = dist.get_rank() == 0
    setup_logging(
        cfg.logging.level, rank=dist.get_rank(), log_file=rank_log_path(cfg.trainer.run_dir, dist.get_rank())
    )
    torch.manual_seed(cfg.trainer.seed)
    run_dir = Path(cfg.trainer.run_dir)
    # External servers are checked (and, colocated, told to release their memory) before minutes of
    # model building; launched ones start after it.
    session = _rollout_session(cfg, run_dir, env.local_world_size) if _external_first(cfg, rank0) else None
    if cfg.rollout.colocated and cfg.rollout.backend == "external":  # they release before the model exists
        release_before_start(session.memory if rank0 else None)
    needs = cfg.algorithm.needs()
    tokenizer, dataset, sampler = _data(cfg, needs.teacher_prompt)
    policy = _policy(cfg, layout, use_te)
    reference = reference_weights(
        policy, needs, cfg.trainer.reference_weights, cfg.model.path, layout, _dtype(cfg)
    )
    ema = ema_teacher(policy, needs, cfg.trainer.ema_weights)  # _resume loads a checkpoint's average
    start = _resume(cfg, policy, sampler, ema)
    session, colocation = _start_rollout(cfg, env, rank0, session, policy, reference, ema)
    weights = (
        WeightPusher(
            cfg.rollout.weight_sync,
            layout,
            cfg.model.path,
            run_dir,
            session.worker_urls if rank0 else None,
            cfg.rollout.bucket_mb,
            api_key=session.api_key if rank0 else None,
        )
        .bind(policy.chunks)
        .supervise(session)
    )
    if start:  # the servers started from the initial weights
        colocation.sync(lambda: weights(start))
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    step_ctx = StepContext(
        policy=policy,
        reference=reference,
        algorithm=algo.algorithm_of(cfg.algorithm),
        loss_cfg=cfg.algorithm,
        layout=layout,
        temperature=cfg.rollout.temperature,
        token_budget=cfg.data.micro_batch_tokens,
        mini_batch_groups=cfg.data.mini_batch_prompts,
        total_steps=cfg.trainer.total_steps,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        teacher_states=cfg.trainer.teacher_states,
        ema=ema,
    )
    evals = {Path(f).stem: load_prompts(cfg, [f], tokenizer, False) for f in cfg.eval.files} if rank0 else {}
    sink, progress = _sinks(cfg, rank0, start)
    return Run(
        cfg,
        rank0,
        dataset,
        sampler,
        policy,
        step_ctx,
        session,
        weights,
        colocation,
        sink,
        progress,
        save_request,
        start,
        evals,
    )


def _rollout_session(cfg: Config, run_dir: Path, local_world_size: int) -> RolloutSession:
    """Rank 0's rollout servers (started or reached), client and scorer."""
    rollout, reward, deadline_s = cfg.rollout, cfg.reward, cfg.trainer.rollout_deadline_s
    return RolloutSession.start(
        rollout,
        reward,
        cfg.model.path,
        cfg.data.max_response_length,
        run_dir,
        deadline_s=deadline_s,
        local_world_size=local_world_size,
    )


def _external_first(cfg: Config, rank0: bool) -> bool:
    return rank0 and cfg.rollout.backend == "external"


def _start_rollout(cfg: Config, env, rank0: bool, session, policy: Policy, reference, ema) -> tuple:
    """Rank 0's rollout session (``session``: the external one, already reached) and the
    turn-taking with colocated engines (``train/colocate.py``; a pass-through when the servers have
    GPUs of their own). Launched colocated engines start while the trainer is offloaded and then
    hold the initial weights; external ones were started first and released their memory before the
    model was built (``release_before_start``), so the first rollout pushes the weights."""
    run_dir = Path(cfg.trainer.run_dir)
    if not cfg.rollout.colocated:
        if cfg.rollout.backend != "external" and rank0:
            session = _rollout_session(cfg, run_dir, env.local_world_size)
        return session, Colocation(None)
    resident = [reference.model] if reference is not None and reference.model is not None else []
    offload = TrainerOffload(
        policy.chunks,
        policy.optimizer,
        policy.device,
        resident,
        ema.device_buffers() if ema is not None else [],
    )
    colocation = Colocation(offload)
    if cfg.rollout.backend == "external":  # released at set-up: the first rollout pushes the weights
        colocation.engines = session.memory if rank0 else None
        return session, colocation
    session = colocation.start_engines(
        lambda: _rollout_session(cfg, run_dir, env.local_world_size) if rank0 else None
    )
    colocation.engines = session.memory if rank0 else None
    return session, colocation


def _dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


def load_prompts(cfg: Config, files: list[str], tokenizer, needs_teacher: bool):
    """The prompt dataset of ``files`` as the trainer reads it (length policy, chat template, answer format)."""
    from sdpg_mcore.data import PromptConfig, load_prompt_dataset

    config = PromptConfig(
        max_prompt_length=cfg.data.max_prompt_length,
        overlong="filter" if cfg.data.filter_overlong_prompts else "truncate",
        chat_template_kwargs={"enable_thinking": cfg.data.enable_thinking},
        answer_format=cfg.reward.answer_format,
        missing_sentinel="error" if needs_teacher else "no_teacher_context",
    )
    return load_prompt_dataset(files, tokenizer, config)


def _data(cfg: Config, needs_teacher: bool):
    """The tokenizer, the training prompts and their sampler."""
    from transformers import AutoTokenizer

    from sdpg_mcore.data import PromptSampler

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = load_prompts(cfg, cfg.data.train_files, tokenizer, needs_teacher)
    sampler = PromptSampler(
        len(dataset), cfg.data.batch_prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle
    )
    return tokenizer, dataset, sampler


def _policy(cfg: Config, layout, use_te: bool) -> Policy:
    updates_per_step = cfg.data.batch_prompts // cfg.data.mini_batch_prompts
    return build_policy(
        cfg.model.path,
        layout,
        use_te=use_te,
        dtype=_dtype(cfg),
        total_updates=cfg.trainer.total_steps * updates_per_step,
        optim=cfg.optimizer,
        chunk_size=cfg.trainer.logprob_chunk_size,
        head_backend=cfg.trainer.logprob_backend,
        recompute=cfg.model.recompute_activations,
        sequence_parallel=cfg.parallel.sequence_parallel,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        gradient_accumulation_fusion=cfg.parallel.gradient_accumulation_fusion,
    )


def _resume(cfg: Config, policy: Policy, sampler, ema: EMAWeights | None) -> int:
    """Load the checkpoint ``trainer.resume`` names (auto: the latest, if any), with the EMA teacher's
    average when there is one; returns its step (0: fresh)."""
    if cfg.trainer.resume == "none":
        return 0
    ckpt_root = Path(cfg.trainer.run_dir) / "checkpoints"
    root, step = (ckpt_root, None) if cfg.trainer.resume == "auto" else _explicit(cfg.trainer.resume)
    loaded = ckpt.load_checkpoint(
        root,
        policy.chunks,
        policy.optimizer,
        policy.scheduler,
        step=step,
        hf_dir=cfg.model.path,
        teacher_ema=ema,
    )
    if loaded is None:
        return 0
    sampler.load_state_dict(loaded.extra_state["sampler"])
    logger.info("resumed from %s (step %d)", loaded.path, loaded.step)
    return loaded.step


def _explicit(path: str) -> tuple[Path, int]:
    p = Path(path)
    try:
        return p.parent, int(p.name.split("_")[-1])
    except ValueError:
        raise ValueError(
            f"trainer.resume={path!r}: give auto, none, or a checkpoint directory step_<N>"
        ) from None


def _sinks(cfg: Config, rank0: bool, start: int) -> tuple[MetricsLogger, StepProgress]:
    lg = cfg.logging
    sink = MetricsLogger(
        cfg.trainer.run_dir,
        enabled=rank0,
        jsonl=lg.jsonl,
        tensorboard=lg.tensorboard,
        wandb_mode=lg.wandb,
        project=lg.project,
        run_name=lg.run_name,
        config=config_to_dict(cfg),
        resume_step=start,
    )
    return sink, StepProgress(cfg.trainer.total_steps, start, enabled=rank0 and lg.progress)
