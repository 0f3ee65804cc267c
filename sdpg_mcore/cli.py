"""``sdpg-train``: train with SDPG (or grpo / dapo / opsd / rlsd) from a YAML recipe plus overrides.

    sdpg-train --config examples/tiny/sdpg.yaml trainer.total_steps=20 algorithm.name=grpo
    torchrun --nproc-per-node 8 -m sdpg_mcore.cli --config examples/qwen3_4b/sdpg.yaml
    srun --ntasks 8 python -m sdpg_mcore.cli --config examples/qwen3_4b/sdpg.yaml   # Slurm ranks
    sdpg-train --config examples/tiny/sdpg.yaml --nproc 2 parallel.tp=2      # local CPU ranks, no torchrun

The config is validated once, here, before any process group or model exists: a wrong key or
value fails in a second with a message that names it and lists the valid choices. So does what
the node must offer (:func:`check_node`): Transformer-Engine for ``model.transformer_impl=te``, and
GPUs of their own for launched SGLang servers unless ``rollout.colocated``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from sdpg_mcore.config import ConfigError, load_config, resolve_world

#: Known-harmless warnings from Megatron/torch on CPU that would bury the progress display.
QUIET = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*is deprecated. Please use `torch.distributed.*",
    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*",
)


def quiet_warnings() -> None:
    """Hide ``QUIET`` in this process (rollout servers log to files under RUN_DIR)."""
    import warnings

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def launch_world_size(nproc: int = 0, environ: Mapping[str, str] | None = None) -> int:
    """Ranks of this launch: ``--nproc``, else torchrun's, else Slurm's (``srun`` without torchrun), else 1.

    Reads the same variables as ``parallel.state.initialize_distributed`` (``resolve_launch_env``),
    so the config is validated for the world the ranks will then build.
    """
    from sdpg_mcore.parallel.state import resolve_launch_env

    return nproc or resolve_launch_env(environ).world_size


def _launch_local_world_size() -> int:
    """The trainer's ranks on this node, from torchrun's or Slurm's variables (1 without a launcher)."""
    from sdpg_mcore.parallel.state import resolve_launch_env

    return resolve_launch_env().local_world_size


def check_model_dir(path: str) -> None:
    """``model.path`` must be a local Hugging Face model directory (the trainer never downloads one);
    without this check transformers answers with a misleading Hub repo-id error."""
    from pathlib import Path

    from sdpg_mcore.config import ConfigError

    model = Path(path)
    if not model.is_dir():
        raise ConfigError(
            f"config key 'model.path': {path!r} is not a directory; give a local Hugging Face model "
            "directory (config.json, weights, tokenizer), e.g. download it first with "
            "`huggingface-cli download ORG/NAME --local-dir DIR`"
        )
    if not (model / "config.json").is_file():
        raise ConfigError(
            f"config key 'model.path': {path!r} has no config.json; it is not a Hugging Face model"
        )


def check_head_backend(name: str) -> None:
    """``trainer.logprob_backend=triton`` must be able to run on this machine's training device (a
    GPU, or CPU under Triton's interpreter); else a ConfigError before anything starts."""
    if name != "triton":
        return
    import torch

    from sdpg_mcore.config import ConfigError
    from sdpg_mcore.ops.triton_support import unavailable_reason

    reason = unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if reason:
        raise ConfigError(
            f"config key 'trainer.logprob_backend': triton cannot run here: {reason}; "
            "set trainer.logprob_backend=auto (triton where it can run, else torch) or torch"
        )


def check_node(cfg, local_world_size: int, gpu_count: int | None = None) -> None:
    """Refuse a run this node cannot host, before start-up (``ConfigError`` naming the keys).

    ``model.transformer_impl=te`` needs Transformer-Engine to import on a GPU; ``rollout.backend=sglang``
    servers must not land on a GPU one of the trainer's ``local_world_size`` ranks on this node uses,
    unless ``rollout.colocated`` (``rollout/placement.py``). ``gpu_count``: the node's GPUs (default:
    what CUDA shows).
    """
    from sdpg_mcore.models.spec import TransformerImplError, resolve_transformer_impl
    from sdpg_mcore.rollout.placement import PlacementError
    from sdpg_mcore.train.rollout_io import server_placement

    try:
        server_placement(cfg.rollout, local_world_size, gpu_count)
        if cfg.model.transformer_impl == "te":
            resolve_transformer_impl("te")
    except (TransformerImplError, PlacementError) as err:
        raise ConfigError(str(err)) from None


def _rank_main(rank: int, world_size: int, config_path: str, overrides: list[str]) -> dict:
    """One ``--nproc`` rank: its traceback goes to its log file; the parent prints the one line."""
    quiet_warnings()
    from sdpg_mcore.train.failure import record_failure
    from sdpg_mcore.train.trainer import train

    cfg = load_config(config_path, overrides)
    try:
        return train(cfg)
    except Exception as err:
        record_failure(err, cfg.trainer.run_dir, rank)
        raise


def _spawned(nproc: int, config: str, overrides: list[str], run_dir: str) -> int:
    """``--nproc`` local ranks (without torchrun); one line per failing rank, exit code 1."""
    from sdpg_mcore.parallel.lifetime import kill_children_with_parent
    from sdpg_mcore.parallel.spawn import RanksFailed, spawn_ranks
    from sdpg_mcore.train.failure import failure_line, rank_log_path

    kill_children_with_parent()  # the ranks die with this process, even by kill -9
    try:
        spawn_ranks(_rank_main, nproc, args=(config, overrides), timeout_s=7 * 24 * 3600)
    except RanksFailed as failed:
        for rank, (summary, _) in sorted(failed.errors.items()):
            line = failure_line(summary.splitlines()[0], rank, rank_log_path(run_dir, rank))
            sys.stderr.write(f"sdpg-train: error: {line}\n")
        return 1
    return 0


def _single(cfg) -> int:
    """This process is one rank (alone, or one of torchrun's / srun's); one line if it fails."""
    from checkpoints_convert.hf_io import CheckpointError
    from sdpg_mcore.parallel.state import resolve_launch_env
    from sdpg_mcore.train.failure import failure_line, record_failure, summary
    from sdpg_mcore.train.health import NonFiniteError
    from sdpg_mcore.train.trainer import train

    try:
        train(cfg)
    except Exception as err:
        rank = resolve_launch_env().rank
        if isinstance(err, (CheckpointError, NonFiniteError, ConfigError)):  # the message is the whole story
            line = f"{type(err).__name__}: {err}"
        else:
            line = failure_line(summary(err), rank, record_failure(err, cfg.trainer.run_dir, rank))
        sys.stderr.write(f"sdpg-train: error: {line}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdpg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe (e.g. examples/tiny/sdpg.yaml)")
    parser.add_argument(
        "--nproc", type=int, default=0, help="spawn this many local gloo ranks (without torchrun)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, applied in order")
    args = parser.parse_args(argv)
    quiet_warnings()
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_world(cfg, launch_world_size(args.nproc))
        if not args.print_config:
            check_head_backend(cfg.trainer.logprob_backend)
            check_model_dir(cfg.model.path)
            check_node(cfg, args.nproc or _launch_local_world_size())
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"sdpg-train: error: {err}\n")
    if args.print_config:
        import yaml

        from sdpg_mcore.config import config_to_dict

        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    if args.nproc > 1:
        return _spawned(args.nproc, args.config, args.overrides, cfg.trainer.run_dir)
    return _single(cfg)


if __name__ == "__main__":
    sys.exit(main())
