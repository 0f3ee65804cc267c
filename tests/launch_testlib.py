"""Helpers for tests that launch the trainer as a real process: tiny assets, overrides, env, waits.

Shared by the test directories (train, faults, rollout, tools): pytest puts ``tests/`` on the import
path (``pythonpath`` in pyproject.toml), so every test imports it by name."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdpg_mcore.parallel.spawn import find_free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "tiny" / "sdpg.yaml"


def make_assets(root: Path, *, sft_steps: int = 0, num_train: int = 32) -> Path:
    """A tiny model (random init, plus ``sft_steps`` warm-start steps: seconds) and a small arithmetic
    data set of ``num_train`` prompts under ``root``."""
    from sdpg_mcore.train.warm_start import warm_start_tiny_model

    warm_start_tiny_model(root / "model", seed=0, sft_steps=sft_steps, batch_size=4, eval_prompts=2)
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--synthetic", "arithmetic"]
        + [
            "--out",
            str(root / "data"),
            "--format",
            "jsonl",
            "--num-train",
            str(num_train),
            "--num-test",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    return root


def launch_overrides(assets, run_dir, *extra):
    return [
        f"model.path={assets / 'model'}",
        f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        "data.batch_prompts=2",
        "data.mini_batch_prompts=2",
        "data.max_response_length=8",
        "rollout.n=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "rollout.weight_sync=disk",
        *extra,
    ]


def train_rank(rank, world_size, overrides):
    """A ``spawn_ranks`` function: the trainer on the tiny recipe with ``overrides``.

    It lives here, not in a test module: a spawned rank unpickles it by importing its module, and a
    test module's own ``from conftest import ...`` picks whichever ``conftest.py`` comes first on
    the inherited ``sys.path`` (tests/slurm's in a full run), so the rank died before reporting."""
    from sdpg_mcore.config import load_config
    from sdpg_mcore.train.trainer import train

    return train(load_config(RECIPE, overrides))


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDPG_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    # A free rendezvous port: the default 29500 is shared with every other test on this machine.
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port())
    )
    return env


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def require_real_sglang() -> None:
    """Fail (or skip, when asked to) unless real SGLang can be launched here."""
    from sdpg_mcore.rollout.sglang_launch import SGLangServerError, sglang_python

    try:
        sglang_python()
    except SGLangServerError as err:
        if os.environ.get("SDPG_SKIP_REAL_SGLANG") == "1":
            pytest.skip("SDPG_SKIP_REAL_SGLANG=1: real SGLang tests skipped on purpose")
        pytest.fail(f"{err} (or set SDPG_SKIP_REAL_SGLANG=1 to skip real-SGLang tests)")
