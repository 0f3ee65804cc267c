"""The run: set up ranks, data, policy, rollouts and sinks from a validated :class:`Config`, then loop.

This is the only module below the CLI that reads the config; it turns it into the explicit values
the step, the model setup and the rollout session take.

    train(load_config("examples/tiny/sdpg.yaml", ["trainer.total_steps=20"]))   # on every rank
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_mcore import algo
from sdpg_mcore.algo.config import TeacherWeights
from sdpg_mcore.config import Config, config_to_dict, dump_config, resolve_world
from sdpg_mcore.train import checkpoint as ckpt
from sdpg_mcore.train.metrics_log import MetricsLogger
from sdpg_mcore.train.model_setup import OptimSettings, ReferenceWeights, build_policy
from sdpg_mcore.train.progress import StepProgress, setup_logging
from sdpg_mcore.train.rollout_io import RolloutSession, RolloutSettings, WeightPusher, check_reachable
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


def loss_config(cfg: Config) -> algo.PolicyLossConfig:
    """The algorithm's typed loss config, from the run config fields that it has.

    The run config's algorithm fields carry the algo configs' own names, so ``config_from_fields``
    maps them one to one; ``None`` (clip settings left unset, entropy_coef 0) keeps the
    algorithm's default (e.g. opsd's 0.02 entropy bonus).
    """
    values = {
        **dataclasses.asdict(cfg.algorithm),
        "lr": cfg.optimizer.lr,
        "entropy_coef": cfg.algorithm.entropy_coef or None,
    }
    return algo.config_from_fields(algo.get_algorithm(cfg.algorithm.name).config_cls, values)


def rollout_settings(cfg: Config) -> RolloutSettings:
    r, rw = cfg.rollout, cfg.reward
    return RolloutSettings(
        backend=r.backend,
        urls=list(r.urls),
        num_servers=r.num_servers,
        router=r.router,
        model_path=cfg.model.path,
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_response_length=cfg.data.max_response_length,
        dynamic_sampling=r.dynamic_sampling,
        max_num_gen_batches=r.max_num_gen_batches,
        request_timeout_s=r.request_timeout_s,
        startup_timeout_s=r.startup_timeout_s,
        max_concurrency=r.max_concurrency,
        scorer=rw.scorer,
        strict=rw.strict,
        answer_format=rw.answer_format,
        overlong=rw.overlong_penalty,
        overlong_buffer=rw.overlong_buffer,
        overlong_factor=rw.overlong_factor,
        server_env={"OMP_NUM_THREADS": str(r.server_threads)},
    )


def _prompts(cfg: Config, files: list[str], tokenizer, needs_teacher: bool):
    from sdpg_mcore.data import PromptConfig, load_prompt_dataset

    config = PromptConfig(
        max_prompt_length=cfg.data.max_prompt_length,
        overlong="filter" if cfg.data.filter_overlong_prompts else "truncate",
        chat_template_kwargs={"enable_thinking": cfg.data.enable_thinking},
        answer_format=cfg.reward.answer_format,
        missing_sentinel="error" if needs_teacher else "no_teacher_context",
    )
    return load_prompt_dataset(files, tokenizer, config)


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) the training described by ``cfg``; collective over all ranks. Returns the last metrics.

    Stops early, with a checkpoint and a normal return, after the step during which SIGUSR1 arrived
    or the save file appeared (:class:`SaveRequest`); the handler is installed first, so a signal
    during model building is not fatal either.
    """
    save_file = os.environ.get(SAVE_FILE_ENV) or Path(cfg.trainer.run_dir) / "SAVE_AND_EXIT"
    save_request = SaveRequest(Path(save_file))
    try:
        return _train(cfg, save_request)
    finally:
        save_request.close(remove_file=False)


def _train(cfg: Config, save_request: SaveRequest) -> dict[str, float]:
    from transformers import AutoTokenizer

    from sdpg_mcore.data import PromptSampler
    from sdpg_mcore.parallel import state

    env = state.initialize_distributed()
    resolve_world(cfg, env.world_size)
    layout = state.initialize_model_parallel(
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.trainer.seed
    )
    rank0 = dist.get_rank() == 0
    setup_logging(cfg.logging.level, rank=dist.get_rank())
    torch.manual_seed(cfg.trainer.seed)
    run_dir = Path(cfg.trainer.run_dir)
    if rank0 and cfg.rollout.backend == "external":
        check_reachable(cfg.rollout.urls)  # fail before minutes of model building
    loss_cfg = loss_config(cfg)
    needs = loss_cfg.needs()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = _prompts(cfg, cfg.data.train_files, tokenizer, needs.teacher_prompt)
    sampler = PromptSampler(
        len(dataset), cfg.data.batch_prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle
    )
    updates_per_step = cfg.data.batch_prompts // cfg.data.mini_batch_prompts
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    o = cfg.optimizer
    policy = build_policy(
        cfg.model.path,
        layout,
        dtype=dtype,
        total_updates=cfg.trainer.total_steps * updates_per_step,
        optim=OptimSettings(
            o.lr,
            o.min_lr,
            o.lr_warmup_steps,
            o.lr_decay_style,
            o.weight_decay,
            o.adam_beta1,
            o.adam_beta2,
            o.adam_eps,
            o.clip_grad,
            o.use_distributed_optimizer,
        ),
        chunk_size=cfg.trainer.logprob_chunk_size,
        recompute=cfg.model.recompute_activations,
        sequence_parallel=cfg.parallel.sequence_parallel,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        gradient_accumulation_fusion=cfg.parallel.gradient_accumulation_fusion,
    )
    frozen = needs.ref_logprobs or needs.teacher_weights is TeacherWeights.FROZEN_REFERENCE
    reference = (
        ReferenceWeights(policy, cfg.trainer.reference_weights, cfg.model.path, layout, dtype)
        if frozen
        else None
    )

    ckpt_root = run_dir / "checkpoints"
    start = 0
    if cfg.trainer.resume != "none":
        root, step = (ckpt_root, None) if cfg.trainer.resume == "auto" else _explicit(cfg.trainer.resume)
        loaded = ckpt.load_checkpoint(root, policy.chunks, policy.optimizer, policy.scheduler, step=step)
        if loaded is not None:
            start = loaded.step
            sampler.load_state_dict(loaded.extra_state["sampler"])
            logger.info("resumed from %s (step %d)", loaded.path, start)

    session = RolloutSession.start(rollout_settings(cfg), run_dir) if rank0 else None
    sync_weights = WeightPusher(
        cfg.rollout.weight_sync,
        layout,
        cfg.model.path,
        run_dir,
        session.worker_urls if rank0 else None,
        cfg.rollout.bucket_mb,
    ).bind(policy.chunks)
    if start:
        sync_weights(start)  # the servers started from the initial weights
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    sink = MetricsLogger(
        run_dir,
        enabled=rank0,
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        wandb_mode=cfg.logging.wandb,
        project=cfg.logging.project,
        run_name=cfg.logging.run_name,
        config=config_to_dict(cfg),
        resume_step=start,
    )
    progress = StepProgress(cfg.trainer.total_steps, start, enabled=rank0 and cfg.logging.progress)
    ctx = StepContext(
        policy=policy,
        reference=reference,
        algorithm=algo.get_algorithm(cfg.algorithm.name),
        loss_cfg=loss_cfg,
        layout=layout,
        temperature=cfg.rollout.temperature,
        token_budget=cfg.data.micro_batch_tokens,
        mini_batch_groups=cfg.data.mini_batch_prompts,
        total_steps=cfg.trainer.total_steps,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        pad_multiple=layout.tp if policy.head.sequence_parallel else 1,
    )
    evals = {Path(f).stem: _prompts(cfg, [f], tokenizer, False) for f in cfg.eval.files} if rank0 else {}
    metrics: dict[str, float] = {}

    def more() -> list:  # further prompts for dynamic sampling (drawn on rank 0 only)
        return dataset.batch(sampler.next_batch())

    try:
        last = cfg.trainer.stop_at_step or cfg.trainer.total_steps
        for step in range(start + 1, min(last, cfg.trainer.total_steps) + 1):
            began = time.perf_counter()
            prompts = dataset.batch(sampler.next_batch())
            generate = lambda s, prompts=prompts: session.generate(prompts, s, cfg.trainer.seed, more)  # noqa: E731
            metrics = run_step(ctx, step, generate, sync_weights)
            metrics["step_seconds"] = time.perf_counter() - began
            metrics["tokens_per_s"] = metrics.pop("num_tokens", 0.0) / metrics["step_seconds"]
            if (
                rank0
                and cfg.eval.interval
                and (step % cfg.eval.interval == 0 or step == cfg.trainer.total_steps)
            ):
                metrics.update(_evaluate(session, evals, cfg, step))
            sink.log(step, metrics)
            progress.step_done(step, metrics)
            stop = save_request.requested()
            if (
                stop
                or step == cfg.trainer.total_steps
                or (cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0)
            ):
                path = ckpt.save_checkpoint(
                    ckpt_root,
                    step,
                    policy.chunks,
                    policy.optimizer,
                    policy.scheduler,
                    hf_dir=cfg.model.path,
                    extra_state={"sampler": sampler.state_dict()},
                    keep_last=cfg.trainer.keep_checkpoints or None,
                )
            if stop:
                logger.info("save requested (SIGUSR1 or %s): saved %s; exiting", save_request.save_file, path)
                if rank0:
                    save_request.close(remove_file=True)
                break
    finally:
        progress.close()
        sink.close()
        sync_weights.close()
        if session is not None:
            session.close()
    return metrics


def _explicit(path: str) -> tuple[Path, int]:
    p = Path(path)
    try:
        return p.parent, int(p.name.split("_")[-1])
    except ValueError:
        raise ValueError(
            f"trainer.resume={path!r}: give auto, none, or a checkpoint directory step_<N>"
        ) from None


def _evaluate(session, evals, cfg: Config, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, dataset in evals.items():
        count = len(dataset) if not cfg.eval.max_prompts else min(cfg.eval.max_prompts, len(dataset))
        prompts = dataset.batch(list(range(count)))
        out.update(session.evaluate(name, prompts, cfg.eval.n_samples, cfg.eval.temperature, seed=step))
    return out
