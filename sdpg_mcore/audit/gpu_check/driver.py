"""Run the GPU check's stages, each in its own process group with its own time limit, into one log
and one summary.

A stage's stderr (its progress and phase lines, with timestamps) goes straight into the log as it
happens, so a kill of the whole check still leaves where each stage stopped. A few seconds before
its limit a stage writes every thread's Python stack to the log (``faulthandler``); on the timeout
its whole process group is killed (a stage's own children, e.g. a parity subprocess, must not keep
the GPU busy under the next stage) and its result names the phase that never ended, with its last
log lines and what the stage saved so far (``common.save_partial``). Each stage's result goes to
``OUT_DIR/<stage>.json`` as it finishes, and the summary to ``OUT_DIR/gpu_check.json``. The command
that runs one stage in a child process is the caller's (``tools/gpu_check.py --stage NAME``), which
calls :func:`run_stage` there.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdpg_mcore.audit.gpu_check import common

StageCommand = Callable[[str], list[str]]
"""The command line that runs one stage (by name) in a child process."""


def run_stage(name: str, cpu: bool) -> int:
    """Child process: run one stage, print its JSON as the last stdout line."""
    common.progress(f"{name}: start")
    common.arm_stack_dump()
    result = importlib.import_module(f"sdpg_mcore.audit.gpu_check.{name}").run(cpu)
    common.progress(f"{name}: done")
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")
    return 0


def _timed_out(name: str, proc, limit_s: float, log, start_offset: int, began: float) -> dict:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, _ = proc.communicate()
    log.flush()
    tail = _log_tail(log.name, start_offset)
    phase = common.open_phase(_stage_lines(log.name, start_offset))
    log.write(f"\n===== {name}: TIMEOUT after {limit_s:.0f}s in phase {phase!r}\n{stdout or ''}\n")
    log.flush()
    return {
        "ok": False,
        "error": f"timeout after {limit_s:.0f}s in phase {phase!r}; last progress: {tail}",
        "phase": phase,
        "wall_s": time.perf_counter() - began,
    }


def spawn_stage(name: str, command: list[str], limit_s: float, log, out_dir: Path | None = None) -> dict:
    """Run one stage (``command``) in its own process group, its stderr into ``log``; its result, also
    written to ``out_dir/<name>.json``."""
    result = _run_stage_process(name, command, limit_s, log, out_dir)
    if out_dir is not None:
        partial = out_dir / f"{name}.partial.json"
        if partial.exists():  # kept in the result of a stage that did not finish well
            if not result.get("ok"):
                result["partial"] = json.loads(partial.read_text())
            partial.unlink()
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _run_stage_process(name: str, command: list[str], limit_s: float, log, out_dir: Path | None) -> dict:
    log.write(f"===== {name} (limit {limit_s:.0f}s)\n")
    log.flush()
    start_offset = log.tell()
    began = time.perf_counter()
    env = {**os.environ, common.STAGE_ENV: name, common.DUMP_AFTER_ENV: str(max(1.0, limit_s - 5))}
    if out_dir is not None:
        env["OUT"] = str(out_dir)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=common.REPO,
        start_new_session=True,
        env=env,
    )
    try:
        stdout, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        return _timed_out(name, proc, limit_s, log, start_offset, began)
    log.write(f"\n----- {name} stdout (rc {proc.returncode})\n{stdout}\n")
    log.flush()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        error = stdout[-1500:] + "\n" + _log_tail(log.name, start_offset, lines=40)
        return {"ok": False, "error": error[-3000:], "wall_s": time.perf_counter() - began}
    result = json.loads(lines[-1])
    result.setdefault("ok", True)
    result["wall_s"] = time.perf_counter() - began
    return result


def _stage_lines(path: str, offset: int) -> list[str]:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read().splitlines()


def _log_tail(path: str, offset: int, lines: int = 8) -> str:
    """The last progress lines (``[..Z +..s]``) a stage wrote, else its last lines of any kind."""
    text = _stage_lines(path, offset)
    marked = [line for line in text if line.startswith("[") and "Z +" in line[:24]]
    return " | ".join((marked or text)[-lines:])[-2500:]


def run_check(
    stage_command: StageCommand, *, cpu: bool, only: list[str] | None, budget_s: float, log_path: Path,
    out_dir: Path | None,
) -> dict:  # fmt: skip
    """Every stage (or ``only`` these) in order within ``budget_s``; the summary, also written to
    ``OUT_DIR/gpu_check.json`` after each stage (partial results survive a kill of the whole check)."""
    began = time.perf_counter()
    summary: dict = {"mode": "cpu" if cpu else "gpu", "stages": {}}
    log_path.write_text("")
    with open(log_path, "a") as log:  # append: the stages' own stderr writes share this file
        for name in common.STAGE_LIMITS:
            if only and name not in only:
                continue
            left = budget_s - (time.perf_counter() - began)
            if left < 20:
                summary["stages"][name] = {"ok": False, "error": "skipped: out of time"}
                continue
            limit = min(common.stage_limit(name, cpu), left - 5)
            stage = summary["stages"][name] = spawn_stage(name, stage_command(name), limit, log, out_dir)
            common.progress(f"[gpu_check] {name}: ok={stage.get('ok')} in {stage.get('wall_s', 0):.0f}s")
            if out_dir is not None:
                (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["ok"] = all(s.get("ok") for s in summary["stages"].values())
    summary["wall_s"] = time.perf_counter() - began
    if out_dir is not None:
        (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def compact(summary: dict) -> dict:
    """The summary line: long texts (tables, tracebacks) cut to their last 400 characters."""
    stages = {
        name: {
            k: (v[-400:] if isinstance(v, str) and len(v) > 400 else v)
            for k, v in stage.items()
            if k != "table"
        }
        for name, stage in summary["stages"].items()
    }
    return summary | {"stages": stages}
