"""A rank that fails says so in one line on the console; its traceback goes to the rank's log file.

Without this every rank of a job prints its whole traceback (and ``--nproc`` re-prints the first
rank's), burying the one line that says what went wrong. ``sdpg-train`` prints, per failing rank::

    sdpg-train: error: WeightSyncError: weights version 7 did not reach ... (rank 1 on node03; traceback in RUN_DIR/logs/rank_1.log)

and the rank appends its full traceback to ``RUN_DIR/logs/rank_<r>.log``, next to the warnings
and errors it logged while it ran (:func:`rank_log_path`; ``progress.setup_logging`` writes there).
"""

from __future__ import annotations

import socket
import time
import traceback
from pathlib import Path


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    """The log file of ``rank``: its log records and, if it fails, its traceback."""
    return Path(run_dir) / "logs" / f"rank_{rank}.log"


def summary(err: BaseException) -> str:
    """``Type: first line of the message`` (a message may carry a server's log tail after it)."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    more = " [...]" if len(lines) > 1 else ""
    return f"{type(err).__name__}: {first}{more}" if first else type(err).__name__


def record_failure(err: BaseException, run_dir: str | Path, rank: int) -> Path | None:
    """Append ``err``'s traceback to the rank's log file; the file, or None if it cannot be written."""
    path = rank_log_path(run_dir, rank)
    text = "".join(traceback.format_exception(err))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as log:
            log.write(
                f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} failed on {socket.gethostname()}\n"
            )
            log.write(text)
    except OSError:
        return None
    return path


def failure_line(summary_text: str, rank: int, log_path: Path | None, host: str | None = None) -> str:
    """The one console line of a failed rank."""
    where = f"rank {rank} on {host or socket.gethostname()}"
    trace = f"traceback in {log_path}" if log_path is not None else "traceback above"
    return f"{summary_text} ({where}; {trace})"
