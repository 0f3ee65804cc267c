"""The atomic step-directory protocol of trainer checkpoints: ``CKPT_ROOT/step_{k:08d}`` + ``latest``.

A checkpoint is written into ``CKPT_ROOT/.tmp-step_{k:08d}``; :func:`commit` renames it into place
and :func:`write_latest` replaces the ``latest`` pointer file (a temporary file, fsync, then
``os.replace``). A crash at any point leaves ``latest`` naming a complete checkpoint; a ``step_*``
directory only ever appears by rename, so every one that exists is complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from checkpoints_convert.hf_io import CheckpointError

LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d{8,})")


def step_dir(ckpt_root: str | Path, step: int) -> Path:
    """``CKPT_ROOT/step_{step:08d}``: the directory of the checkpoint of ``step``."""
    return Path(ckpt_root) / f"step_{step:08d}"


def complete_steps(ckpt_root: str | Path) -> list[int]:
    """Steps with a complete checkpoint directory, ascending (a ``step_*`` dir only appears by rename)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
    )


def latest_step(ckpt_root: str | Path) -> int | None:
    """The step ``latest`` names (without a pointer: the newest complete step); None when there is none.

    Raises ``CheckpointError`` when ``latest`` is unreadable or names a directory that does not exist.
    """
    root = Path(ckpt_root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        steps = complete_steps(root)
        return steps[-1] if steps else None
    text = pointer.read_text().strip()
    match = _STEP_DIR.fullmatch(text)
    if match is None:
        raise CheckpointError(
            f"{pointer} holds {text!r}, not a checkpoint name like 'step_00000010'; write the name of an "
            f"existing step directory into it (complete steps: {complete_steps(root)}) or delete it to "
            "use the newest"
        )
    if not (root / text).is_dir():
        replaced = root / f"{TMP_PREFIX}replaced-{text}"
        if replaced.is_dir():
            raise CheckpointError(
                f"{pointer} names {text}, whose replacement by a newer save of the same step was "
                f"interrupted; rename {replaced} back to {root / text}"
            )
        raise CheckpointError(
            f"{pointer} names {text} but {root / text} does not exist (deleted or moved?); restore that "
            f"directory, point {pointer} at an existing step (complete steps: {complete_steps(root)}), "
            "or pass step=N"
        )
    return int(match.group(1))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(tmp: Path, final: Path, root: Path) -> None:
    """Rename the finished temporary directory into place (replacing an older copy of the same step).

    Every rank has fsynced its files; the directory entries are synced here. When an older copy of
    the step is replaced while ``latest`` names it, ``latest`` first moves to the newest other
    complete step, so no crash between the two renames leaves it naming a missing directory (when
    there is no other step, ``latest_step``'s error names the ``.tmp-replaced-*`` copy to rename back).
    """
    for path in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [tmp]:
        fsync_dir(path)
    replaced = None
    if final.exists():
        pointer = root / LATEST_FILE
        if pointer.is_file() and pointer.read_text().strip() == final.name:
            others = [s for s in complete_steps(root) if step_dir(root, s) != final]
            if others:
                write_latest(root, step_dir(root, others[-1]).name)
        replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(root)
    if replaced is not None:
        remove(replaced)


def write_latest(root: Path, name: str) -> None:
    """Point ``latest`` at ``name``: a temporary file, fsync, then an atomic ``os.replace``."""
    tmp = root / f"{TMP_PREFIX}{LATEST_FILE}"
    write_file(tmp, (name + "\n").encode())
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


def prune(root: Path, step: int, keep_last: int) -> None:
    older = [s for s in complete_steps(root) if s <= step]
    for old in older[:-keep_last]:
        remove(step_dir(root, old))
