"""Where step metrics go: ``RUN_DIR/metrics.jsonl``, TensorBoard, wandb, and a rich progress display.

Only rank 0 writes; other ranks build a disabled logger so call sites need no rank checks.
wandb is optional and imported in exactly one place (:func:`_open_wandb`); without an API key an
``online`` request falls back to ``offline`` (runs sync later with ``wandb sync``). Keys are never
logged or printed. Library code reports through ``logging``; rich draws only the progress bar.

    log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=True, wandb_mode="offline")
    with timer.phase("rollout"): ...
    log.log(step, {**metrics, **timer.pop()})
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> float | None:
    """A JSON-safe float (None for NaN/inf, which strict JSON cannot hold)."""
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (``time/rollout``, ``time/update``...)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The phases timed since the last pop, as ``time/<phase>`` metrics; resets the timer."""
        out = {f"time/{k}": v for k, v in self._seconds.items()}
        self._seconds = {}
        return out


def has_wandb_key() -> bool:
    """Whether wandb could authenticate (env var or ~/.netrc entry); the key itself is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _open_wandb(mode: str, project: str, name: str, run_dir: Path, config: Mapping[str, Any]):
    """Start a wandb run (the only wandb import of the package); None when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        logger.warning(
            "logging.wandb=%s but wandb is not installed (pip install wandb); skipping wandb", mode
        )
        return None
    if mode == "online" and not has_wandb_key():
        logger.warning(
            "no wandb API key configured: logging to wandb offline (upload later with `wandb sync`)"
        )
        mode = "offline"
    return wandb.init(
        project=project, name=name, dir=str(run_dir), mode=mode, config=dict(config), reinit="finish_previous"
    )


class MetricsLogger:
    """Appends one JSON object per step and mirrors scalars to TensorBoard and wandb (rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        jsonl: bool = True,
        tensorboard: bool = False,
        wandb_mode: str = "disabled",
        project: str = "sdpg_mcore",
        run_name: str = "",
        config: Mapping[str, Any] | None = None,
        resume_step: int = 0,
    ) -> None:
        """``resume_step``: steps after it in an existing metrics.jsonl (written after the checkpoint
        that is being resumed) are dropped so the file reads as one uninterrupted run."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.run_dir / METRICS_FILE
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step else []
            with path.open("w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
            self._jsonl = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb_mode != "disabled":
            name = run_name or self.run_dir.name
            self._wandb = _open_wandb(wandb_mode, project, name, self.run_dir, config or {})

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """Record ``metrics`` for ``step``; returns the JSON-safe record (also on disabled ranks)."""
        record: dict[str, Any] = {"step": int(step)}
        record.update({k: _to_float(v) for k, v in metrics.items() if k != "step"})
        if not self.enabled:
            return record
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return record

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a run directory or the file); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a malformed line in %s", path)
    return records
