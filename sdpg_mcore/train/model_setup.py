"""The policy on Megatron: GPTModel from the HF checkpoint, DDP, the Megatron optimizer, the LR schedule,
and the frozen reference weights.

One code path for CPU and GPU: on CPU the compatibility layer (``sdpg_mcore.parallel.cpu_compat``)
lets Megatron's DDP and (distributed) optimizer run on gloo.

    policy = build_policy(model_path, layout, dtype=torch.float32, optim=cfg.optimizer, total_updates=400)
    policy.optimizer_step()   # grad clip + step + LR schedule; returns (grad_norm, lr)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch

from sdpg_mcore.algo.config import TeacherWeights
from sdpg_mcore.config import OptimizerConfig
from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.models.spec import resolve_use_te
from sdpg_mcore.train.forward import HeadSpec
from sdpg_mcore.train.health import grads_finite


def _finalize_grads(model, num_tokens=None, **kwargs):
    """Megatron's grad finaliser without the per-token division: the algo loss is already normalised."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


def build_model(
    model_path: str | Path,
    layout,
    *,
    dtype: torch.dtype,
    recompute: bool = False,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
    use_te: bool | None = None,
):
    """This rank's GPTModel stage with the HF weights loaded (not wrapped).

    ``use_te``: the Transformer-Engine spec (``models.spec.resolve_transformer_impl``; None: TE when
    it imports). ``gradient_accumulation_fusion`` takes effect with the Transformer-Engine spec only
    (its GEMMs accumulate into ``main_grad``); the local spec has no fused kernel for it.
    """
    from checkpoints_convert.model_io import load_hf_into_model
    from sdpg_mcore.models.builder import build_gpt_model

    use_te = resolve_use_te(use_te)
    overrides: dict = dict(
        calculate_per_token_loss=True,
        sequence_parallel=sequence_parallel,
        gradient_accumulation_fusion=gradient_accumulation_fusion and use_te,
    )
    if recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(str(model_path), params_dtype=dtype, use_te=use_te, **overrides)
    # Micro-batches differ in rows and length; PP stages then exchange shapes before each tensor.
    # Set after construction: the config's MoE check rejects it for the (unused) allgather dispatcher.
    model.config.variable_seq_lengths = True
    load_hf_into_model([model], str(model_path))
    return model


@dataclass
class Policy:
    """The trained model chunks with their optimizer and LR schedule."""

    chunks: list
    optimizer: object
    scheduler: object
    head: HeadSpec
    _: KW_ONLY  # the counters and flags below by name only: a positional flag once landed in a counter
    skipped_updates: int = 0
    """Updates skipped because a gradient was non-finite on some rank (``train.health`` stops the run
    after ``trainer.nonfinite_patience`` bad steps in a row)."""
    overlap_param_gather: bool = False
    """Updated weights arrive during the next forward (see :meth:`finish_param_sync`)."""
    use_te: bool = False
    """The layers use the Transformer-Engine spec (a resident reference model is built the same way)."""

    @property
    def device(self) -> torch.device:
        """Where the model lives: every tensor of the step goes there."""
        return next(unwrap_model(self.chunks[0]).parameters()).device

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finish_param_sync(self) -> None:
        """Complete the weight all-gather now (weight sync, checkpoints and the reference swap read
        the weights outside a forward); a no-op unless ``overlap_param_gather``."""
        if self.overlap_param_gather:
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, step, advance the LR schedule; returns (grad norm, learning rate used).

        A non-finite gradient on any rank skips the update (NaN grad norm, schedule not advanced):
        Megatron applies it otherwise, except under fp16 loss scaling."""
        lr = self.optimizer.param_groups[0]["lr"]
        if not grads_finite(self.chunks):
            self.skipped_updates += 1
            return float("nan"), float(lr)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
        self.scheduler.step(increment=1)
        return float(grad_norm or 0.0), float(lr)


def build_policy(
    model_path,
    layout,
    *,
    dtype: torch.dtype,
    optim: OptimizerConfig,
    total_updates: int,
    chunk_size: int,
    vocab_size: int | None = None,
    recompute: bool = False,
    sequence_parallel: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    gradient_accumulation_fusion: bool = False,
    head_backend: str = "auto",
    use_te: bool | None = None,
) -> Policy:
    """Model + Megatron DDP + ``get_megatron_optimizer`` + ``OptimizerParamScheduler``.

    ``head_backend``: the fused head's kernels (``trainer.logprob_backend``).

    The head normalises over the checkpoint's ``config.vocab_size`` rows, as the HF logits, the
    built-in engine and SGLang do (not ``len(tokenizer)``, which is often shorter: 151,669 vs
    151,936 for Qwen3); ``vocab_size``, when given, must equal it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    use_te = resolve_use_te(use_te)
    model = build_model(
        model_path,
        layout,
        dtype=dtype,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        use_te=use_te,
    )
    config = model.config
    vocab_size = _checked_vocab_size(model_path, vocab_size)
    overlap_param_gather = overlap_param_gather and optim.use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = _finalize_grads
    opt_config = _optimizer_config(optim, dtype)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=max(total_updates, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
    )
    tp_group = ps.get_tensor_model_parallel_group() if layout.tp > 1 else None
    head = HeadSpec(
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        tp_group=tp_group,
        sequence_parallel=model.config.sequence_parallel,
        causal_mask=not use_te,
        backend=head_backend,
    )
    return Policy([ddp], optimizer, scheduler, head, overlap_param_gather=overlap_param_gather, use_te=use_te)


def _optimizer_config(optim: OptimizerConfig, dtype: torch.dtype):
    """Megatron's optimizer config from the run's ``optimizer:`` section."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )


def _checked_vocab_size(model_path, vocab_size: int | None) -> int:
    from sdpg_mcore.models.hf_config import parse_hf_config

    config_vocab = parse_hf_config(str(model_path)).vocab_size
    if vocab_size is not None and vocab_size != config_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} differs from {model_path}/config.json vocab_size={config_vocab}; the head "
            "must normalise over the model's rows (leave vocab_size unset)"
        )
    return config_vocab


class PinnedSwap:
    """Exchange tensors' contents with one pinned host buffer per dtype, without host syncs.

    Why: the reference pass needs the initial weights in the live parameters for one forward per
    step. Copying parameter by parameter through pageable memory makes every copy synchronous
    (the driver stages it); one pinned flat buffer lets every copy be a non-blocking DMA on the
    current stream. Each exchange goes through a device copy of one tensor at a time (the largest
    parameter is the extra device memory): ``tmp = p.clone(); p <- host; host <- tmp``, all on one
    stream, so each copy is ordered after the one before and the host never waits.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self._tensors = tensors
        self._views: list[torch.Tensor] = []
        pin = bool(tensors) and tensors[0].device.type == "cuda"
        sizes: dict[torch.dtype, int] = {}
        for t in tensors:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        flat = {}
        for dtype, numel in sizes.items():
            buf = torch.empty(numel, dtype=dtype)
            flat[dtype] = buf.pin_memory() if pin else buf
        offsets = dict.fromkeys(sizes, 0)
        with torch.no_grad():
            for t in tensors:
                start = offsets[t.dtype]
                view = flat[t.dtype][start : start + t.numel()].view(t.shape)
                view.copy_(t.detach(), non_blocking=True)
                self._views.append(view)
                offsets[t.dtype] = start + t.numel()
        self.nbytes = sum(b.numel() * b.element_size() for b in flat.values())

    @torch.no_grad()
    def exchange(self) -> None:
        """Host buffer <-> tensors (call twice to restore)."""
        for t, view in zip(self._tensors, self._views):
            live = t.detach().clone()
            t.copy_(view, non_blocking=True)
            view.copy_(live, non_blocking=True)


class ReferenceWeights:
    """The frozen initial policy for ``lp_ref`` (and the opsd teacher).

    ``cpu_swap``: the initial weights wait in one pinned host buffer (:class:`PinnedSwap`) and are
    exchanged with the live weights around the reference pass with non-blocking copies (no second
    model in device memory: the 70B choice). ``separate_model``: a second, never-trained model stays
    resident (no copies, twice the weight memory; ``tools/plan.py`` says whether it fits).
    """

    def __init__(self, policy: Policy, mode: str, model_path, layout, dtype: torch.dtype | None):
        self.mode = mode
        self._policy = policy
        if mode == "cpu_swap":
            self._swap = PinnedSwap(self._params())
            self._model = None
        elif mode == "separate_model":  # laid out like the policy: the same head reads its outputs
            sp = policy.head.sequence_parallel
            self._model = build_model(
                model_path, layout, dtype=dtype, sequence_parallel=sp, use_te=policy.use_te
            ).eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        else:
            raise ValueError(f"trainer.reference_weights={mode!r}: choose cpu_swap or separate_model")

    @property
    def model(self):
        """The resident reference model (``separate_model``), else None."""
        return self._model

    def _params(self) -> list[torch.Tensor]:
        return [p for chunk in self._policy.chunks for p in unwrap_model(chunk).parameters()]

    @contextlib.contextmanager
    def chunks(self) -> Iterator[list]:
        """Model chunks holding the reference weights for the duration of the block."""
        if self._model is not None:
            yield [self._model]
            return
        self._swap.exchange()
        try:
            yield self._policy.chunks
        finally:
            self._swap.exchange()


def reference_weights(
    policy: Policy, needs, mode: str, model_path, layout, dtype: torch.dtype | None
) -> ReferenceWeights | None:
    """The frozen initial policy when the algorithm reads it (``needs``: its ``AlgorithmNeeds``): for
    reference log-probs or as the frozen-reference teacher; None otherwise. ``model_path`` and
    ``dtype`` build the ``separate_model`` copy (unused by ``cpu_swap``)."""
    frozen = needs.ref_logprobs or needs.teacher_weights is TeacherWeights.FROZEN_REFERENCE
    return ReferenceWeights(policy, mode, model_path, layout, dtype) if frozen else None
