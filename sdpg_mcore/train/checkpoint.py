"""Trainer checkpoints: atomic Megatron distributed checkpoints that resume a run exactly.

A checkpoint of step ``k`` is the directory ``CKPT_ROOT/step_{k:08d}``:

- the Megatron ``torch_dist`` checkpoint (``.metadata``, ``*.distcp``, ``common.pt``,
  ``metadata.json``) of the model (``GPTModel.sharded_state_dict()``, the global key layout the
  converter uses) and the optimizer (``optimizer.sharded_state_dict``; the distributed optimizer
  as ``dp_reshardable``), written collectively by all ranks;
- ``sdpg_convert.json`` + ``hf_assets/`` (the HF config and tokenizer files of ``hf_dir``), so
  ``tools/convert_hf.py to-hf --mcore CKPT_ROOT/step_{k:08d}`` exports the policy to HF;
- ``trainer_state.json``: step, LR-scheduler state, parallel layout, model signature and the
  trainer's JSON-able ``extra_state`` (the trainer stores the prompt sampler's position); the beta
  and lambda schedules are functions of the step and need nothing more;
- ``rng/rank_{r:05d}.pt``: each rank's python / numpy / torch (CPU, CUDA) RNG states and Megatron's
  tensor-parallel RNG tracker states, read back with ``torch.load(weights_only=True)``;
- ``teacher_ema/pp{p:03d}_tp{t:03d}.pt`` (``algorithm.teacher=ema`` only): the EMA teacher's fp32
  average of each TP/PP shard of the weights (``train/ema_weights.py``), written once per shard by
  the first data-parallel replica and read back by every replica, bit for bit;
- ``checksums.json``: size and SHA-256 of every other file, verified before anything is loaded
  (``checkpoint_manifest``), so a damaged or truncated file is refused instead of loaded.

Atomicity: everything is written into ``CKPT_ROOT/.tmp-step_{k:08d}``; after a barrier rank 0
renames it to ``step_{k:08d}`` and then replaces the ``latest`` pointer file (write a temporary
file, fsync, ``os.replace``). A crash at any point leaves ``latest`` naming a complete checkpoint;
leftover ``.tmp-*`` entries are removed by the next save. ``CKPT_ROOT`` must be one directory that
every rank sees (a shared filesystem on multi-node runs). Resume needs the same layout, model and
LR schedule (a constant-LR run may raise ``total_steps``); ``CheckpointError`` (a ``ValueError``)
names what differs and the fix.

Two quirks of Megatron's distributed optimizer on the torch-Adam path (no Transformer Engine /
Apex, as on CPU) are handled at load: a never-stepped optimizer has no state to load into, and
the loaded Adam step count is wrong (see ``allocate_distributed_optimizer_state``,
``restore_adam_steps``).

    save_checkpoint(ckpt_root, step, policy.chunks, policy.optimizer, policy.scheduler,
                    hf_dir=model_path, extra_state={"sampler": sampler.state_dict()}, keep_last=3)
    loaded = load_checkpoint(ckpt_root, policy.chunks, policy.optimizer, policy.scheduler, hf_dir=model_path)
    if loaded is not None:  # the run continues with step loaded.step + 1
        sampler.load_state_dict(loaded.extra_state["sampler"])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpoints_convert.arch_maps import config_hash
from checkpoints_convert.convert import ASSETS_DIR, FORMAT_VERSION, METADATA_FILE
from checkpoints_convert.hf_io import CheckpointError, copy_hf_assets
from sdpg_mcore.models.builder import unwrap_model
from sdpg_mcore.train import checkpoint_manifest
from sdpg_mcore.train.checkpoint_dir import (
    LATEST_FILE,
    TMP_PREFIX,
    commit,
    complete_steps,
    latest_step,
    prune,
    remove,
    step_dir,
    write_file,
    write_latest,
)
from sdpg_mcore.train.checkpoint_state import (
    allocate_distributed_optimizer_state,
    model_signature,
    parallel_layout,
    restore_adam_steps,
    rng_state,
    set_rng_state,
    sharded_state_dict,
)
from sdpg_mcore.train.ema_weights import shard_file

__all__ = [
    "LATEST_FILE",
    "RNG_DIR",
    "STATE_FILE",
    "TMP_PREFIX",
    "CheckpointError",
    "LoadedCheckpoint",
    "complete_steps",
    "latest_step",
    "load_checkpoint",
    "save_checkpoint",
    "step_dir",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
STATE_VERSION = 1
#: Scheduler fields that must match on resume (``num_steps`` is the restored position).
_SCHEDULER_FIXED = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored besides the objects it loaded in place."""

    step: int
    """The step the checkpoint was saved at (the next step to run is ``step + 1``)."""
    extra_state: dict[str, Any]
    """The trainer's ``extra_state`` as saved (sampler state, config hash, counters)."""
    path: Path
    """The checkpoint directory that was read."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- save ----------------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    hf_dir: str | Path,
    extra_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    teacher_ema=None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and point ``latest`` at it; collective over all ranks.

    ``model_chunks`` are this rank's (possibly DDP-wrapped) model chunks, ``optimizer`` the Megatron
    optimizer over them, ``scheduler`` the ``OptimizerParamScheduler``. ``hf_dir`` is the HF model
    directory the policy was built from: its config and tokenizer files make the checkpoint
    exportable with ``tools/convert_hf.py to-hf``. ``extra_state`` must be JSON-serialisable (rank
    0's copy is stored). ``keep_last=K`` then deletes all but the K newest checkpoints up to
    ``step`` (checkpoints of later steps, left by a run resumed from an earlier one, are kept until
    this run overwrites them). ``teacher_ema`` (``ema_weights.EMAWeights``) adds the EMA teacher's
    shard files. Saving a step that already exists replaces it. Returns the directory.
    """
    from megatron.core import dist_checkpointing

    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (or None to keep every checkpoint)")
    hf_config_path = Path(hf_dir) / "config.json"
    if not hf_config_path.is_file():
        raise CheckpointError(
            f"hf_dir={hf_dir} has no config.json; pass the HF model directory the policy was built from"
        )
    try:
        extra_json = json.dumps(extra_state or {}, sort_keys=True)
    except TypeError as err:
        raise ValueError(
            f"extra_state must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}"
        ) from None
    root = Path(ckpt_root)
    final, tmp = step_dir(root, step), root / f"{TMP_PREFIX}step_{step:08d}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{TMP_PREFIX}*"):  # an earlier save that crashed
            logger.warning("removing incomplete checkpoint leftover %s", leftover)
            remove(leftover)
        tmp.mkdir(parents=True)  # empty: dist_checkpointing.save warns about a non-empty directory
    _barrier()

    dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer, is_loading=False), str(tmp))
    rng_buf = _torch_bytes(rng_state())
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    write_file(tmp / RNG_DIR / f"rank_{rank:05d}.pt", rng_buf)
    if teacher_ema is not None:
        name, writer = shard_file()
        if writer:
            (tmp / name).parent.mkdir(exist_ok=True)
            write_file(tmp / name, _torch_bytes(teacher_ema.state_dict()))
    if rank == 0:
        _write_rank0_files(tmp, step, model_chunks, optimizer, scheduler, hf_dir, extra_json)
    _barrier()
    entries = checkpoint_manifest.manifest(tmp)
    if rank == 0:
        write_file(tmp / checkpoint_manifest.MANIFEST_FILE, checkpoint_manifest.manifest_bytes(entries))
    _barrier()

    if rank == 0:
        commit(tmp, final, root)
        write_latest(root, final.name)
        if keep_last is not None:
            prune(root, step, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_rank0_files(tmp: Path, step, model_chunks, optimizer, scheduler, hf_dir, extra_json: str) -> None:
    """Trainer state and the converter's metadata: one copy, written by rank 0."""
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    signature = model_signature(model_chunks)
    state = {
        "version": STATE_VERSION,
        "step": step,
        "scheduler": scheduler.state_dict(),
        "layout": parallel_layout(model_chunks, optimizer),
        "model": signature,
        "hf_config_hash": config_hash(hf_config),
        "extra_state": json.loads(extra_json),
    }
    write_file(tmp / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())
    copy_hf_assets(hf_dir, tmp / ASSETS_DIR)
    convert_meta = {
        "format_version": FORMAT_VERSION,
        "arch": hf_config.get("model_type"),
        "config_hash": config_hash(hf_config),
        "source": str(Path(hf_dir).resolve()),
        "tp": state["layout"]["tp"],
        "pp": state["layout"]["pp"],
        "vocab_size": hf_config.get("vocab_size"),
        "padded_vocab_size": signature["padded_vocab_size"],
        "trainer_step": step,
    }
    write_file(tmp / METADATA_FILE, (json.dumps(convert_meta, indent=2) + "\n").encode())


# -- load ----------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Any]:
    for name in (STATE_FILE, "metadata.json", "common.pt", ".metadata"):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} is missing {name}: it is incomplete or damaged; "
                f"load another step (complete steps: {complete_steps(path.parent)})"
            )
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path / STATE_FILE} has version {state.get('version')}, this code reads {STATE_VERSION}"
        )
    return state


def _differences(stored: dict[str, Any], live: dict[str, Any], keys=None) -> list[str]:
    keys = keys or sorted(set(stored) | set(live))
    return [
        f"{k}={stored.get(k)!r} in the checkpoint vs {live.get(k)!r} now"
        for k in keys
        if stored.get(k) != live.get(k)
    ]


def _check_compatible(path: Path, state: dict[str, Any], model_chunks, optimizer, scheduler) -> None:
    """Raise ``CheckpointError`` naming each value that differs between the checkpoint and this run."""
    diffs = _differences(state["layout"], parallel_layout(model_chunks, optimizer))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with a different parallel layout ({'; '.join(diffs)}). "
            "Resume with the checkpoint's layout, or export it (`tools/convert_hf.py to-hf --mcore "
            f"{path} --out DIR`) and start a new run from the HF directory."
        )
    diffs = _differences(state["model"], model_signature(model_chunks))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} holds a different model ({'; '.join(diffs)}). "
            f"Build the model from the checkpoint's config ({path / ASSETS_DIR / 'config.json'}) or use a "
            "new checkpoint directory for this model."
        )
    diffs = _differences(state["scheduler"], scheduler.state_dict(), _schedule_keys(state, scheduler))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} has a different LR schedule ({'; '.join(diffs)}). Resume with the optimizer "
            "settings of the checkpoint's run (lr, min_lr, warmup, decay style, total steps); only a "
            "constant-LR run (optimizer.lr_decay_style=constant) can change trainer.total_steps."
        )


def _schedule_keys(state: dict[str, Any], scheduler) -> tuple[str, ...]:
    """The schedule fields a resume must keep. Under a constant LR the decay length (``total_steps``)
    changes nothing, so a finished run can be extended; a decaying schedule fixes it."""
    constant = (
        state["scheduler"].get("lr_decay_style") == scheduler.state_dict()["lr_decay_style"] == "constant"
    )
    return tuple(k for k in _SCHEDULER_FIXED if not (constant and k == "lr_decay_steps"))


def _check_hf_config(path: Path, state: dict[str, Any], hf_dir: str | Path) -> None:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    if config_hash(config) == state["hf_config_hash"]:
        return
    stored = json.loads((path / ASSETS_DIR / "config.json").read_text())
    # only the fields the hash covers (a single-field hash ignores the others, e.g. transformers_version)
    keys = [
        k
        for k in sorted(set(stored) | set(config))
        if config_hash({k: stored.get(k)}) != config_hash({k: config.get(k)})
    ]
    diffs = _differences(stored, config, keys)
    raise CheckpointError(
        f"checkpoint {path} was saved from a different HF model config than {hf_dir} "
        f"({'; '.join(diffs[:6]) or 'config hash differs'}). Resume with the model the run started from, "
        "or use a new checkpoint directory for this model."
    )


def _agree_on_error(error: CheckpointError | None) -> None:
    """Raise on every rank when any rank found a problem, so none is left waiting in a collective."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        errors = [CheckpointError(m) if m is not None else None for m in messages]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise error if error is not None else first


def load_checkpoint(
    ckpt_root: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    step: int | None = None,
    hf_dir: str | Path | None = None,
    teacher_ema=None,
) -> LoadedCheckpoint | None:
    """Restore model, optimizer, LR schedule and this rank's RNG states from a checkpoint; collective.

    ``step=None`` loads what ``latest`` names; returns None when ``ckpt_root`` holds no checkpoint
    (a fresh run). The model chunks, optimizer and scheduler must be built exactly as for the run
    that saved it (same layout, model and LR schedule; ``CheckpointError`` names what differs, on
    every rank, before any collective read). With ``hf_dir`` its ``config.json`` must also be the
    one the checkpoint was saved with (catches changes that keep every shape, e.g. ``rope_theta``).
    ``teacher_ema`` (``ema_weights.EMAWeights``): restore the EMA teacher's average too; the
    checkpoint must hold one (a run saved with another ``algorithm.teacher`` does not).
    """
    root = Path(ckpt_root)
    if step is None:
        step = latest_step(root)
        if step is None:
            return None
    path = step_dir(root, step)
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint for step {step} in {root} (complete steps: {complete_steps(root)})"
        )
    rng_path = path / RNG_DIR / f"rank_{_rank():05d}.pt"
    error = None
    try:
        error = checkpoint_manifest.verify(path)
        if error is not None:
            raise error
        state = _read_state(path)
        if hf_dir is not None:
            _check_hf_config(path, state, hf_dir)
        _check_compatible(path, state, model_chunks, optimizer, scheduler)
        if not rng_path.is_file():
            raise CheckpointError(
                f"checkpoint {path} is missing {rng_path.relative_to(path)}; it is incomplete or damaged"
            )
        if teacher_ema is not None and not (path / shard_file()[0]).is_file():
            raise CheckpointError(
                f"checkpoint {path} holds no EMA teacher ({shard_file()[0]}): it was saved by a run with "
                "another algorithm.teacher. Resume with that run's algorithm.teacher, or start a new run "
                "(trainer.resume=none) to train with teacher=ema"
            )
    except CheckpointError as err:
        error = err
    _agree_on_error(error)

    from megatron.core import dist_checkpointing

    # no_grad: the distributed optimizer copies fp32 main-param shards into views of the parameters.
    with torch.no_grad():
        allocate_distributed_optimizer_state(optimizer)
        sharded = sharded_state_dict(model_chunks, optimizer, is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(path))
        for i, chunk in enumerate(model_chunks):
            unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer)
    if teacher_ema is not None:
        teacher_ema.load_state_dict(torch.load(path / shard_file()[0], weights_only=True))
    live_schedule = scheduler.state_dict()
    scheduler.load_state_dict({**state["scheduler"], "lr_decay_steps": live_schedule["lr_decay_steps"]})
    set_rng_state(torch.load(rng_path, weights_only=True))
    _barrier()
    logger.info("loaded checkpoint %s (step %d)", path, step)
    return LoadedCheckpoint(step=int(state["step"]), extra_state=state["extra_state"], path=path)
