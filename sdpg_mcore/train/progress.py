"""The rich progress display of a run (rank 0 only): a bar with ETA and one summary line per step.

The summary line shows the headline metrics and the step time by phase, so a person watching the
run sees where time goes without opening TensorBoard. On other ranks, or with ``enabled=False``,
every method is a no-op. Also installs a ``RichHandler`` so log records and the bar do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Metrics shown on the per-step line, with their short labels.
HEADLINE = (
    ("reward_mean", "reward"),
    ("acc", "acc"),
    ("kl_mean", "kl"),
    ("entropy", "ent"),
    ("response_len_mean", "len"),
    ("pg_loss", "pg"),
    ("grad_norm", "gnorm"),
)


def format_step_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``step 3/20 reward 0.25 acc 0.31 ... | rollout 1.2s update 3.4s`` (values that are present)."""
    parts = [f"step {step}/{total}"]
    for key, label in HEADLINE:
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{label} {value:.4g}")
    phases = [(k[5:], v) for k, v in metrics.items() if k.startswith("time/") and v is not None]
    if phases:
        parts.append("|")
        parts.extend(f"{name} {seconds:.1f}s" for name, seconds in phases)
    return " ".join(parts)


class StepProgress:
    """A rich progress bar over training steps, with ETA, plus a line per finished step."""

    def __init__(
        self, total_steps: int, start_step: int = 0, *, enabled: bool = True, title: str = "sdpg"
    ) -> None:
        self.total = total_steps
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task = self._progress.add_task(title, total=total_steps, completed=start_step)
        self._progress.start()

    def step_done(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._progress is None:
            return
        self._progress.console.log(format_step_line(step, self.total, metrics), highlight=False)
        self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def setup_logging(level: str = "INFO", *, rank: int = 0, log_file: str | Path | None = None) -> None:
    """Root logging for a trainer process: rich on rank 0, plain warnings-only on the others; the same
    records also go to ``log_file`` (the rank's log, where a failure's traceback is written too)."""
    if rank == 0:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handlers = [handler]
    else:
        level = "WARNING"
        handlers = [logging.StreamHandler()]
        handlers[0].setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO dumps whole configs
