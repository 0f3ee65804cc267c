"""Checksums of every file of a trainer checkpoint, written at save and verified before any load.

Why: Megatron's ``torch_dist`` reader loads a ``.distcp`` file with 4 KB overwritten without a
complaint (the bytes are raw tensor storage), and a truncated one fails deep inside
``torch.distributed.checkpoint``. ``MANIFEST_FILE`` lists each file's size and SHA-256; a
checkpoint whose files do not match is refused with a ``CheckpointError`` naming the file.

The hashing is spread over the ranks (file ``i`` of the sorted list is hashed by rank
``i % world``), so a large checkpoint costs each rank its share of one read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from checkpoints_convert.hf_io import CheckpointError

MANIFEST_FILE = "checksums.json"
MANIFEST_VERSION = 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return names[rank::world]


def _gather(local: dict) -> dict:
    rank, world = _world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def manifest(directory: Path) -> dict:
    """``{relative path: [size, sha256]}`` of every file under ``directory``; collective (every rank
    must see the same files, e.g. after a barrier on a shared filesystem)."""
    names = _files(directory)
    local = {n: [(directory / n).stat().st_size, _digest(directory / n)] for n in _my_share(names)}
    return _gather(local)


def manifest_bytes(entries: dict) -> bytes:
    return (
        json.dumps({"version": MANIFEST_VERSION, "files": entries}, indent=1, sort_keys=True) + "\n"
    ).encode()


def verify(directory: Path) -> CheckpointError | None:
    """This rank's share of the checks of ``directory`` against its manifest; the error, or None.

    Not collective: the caller agrees on the outcome across ranks (``checkpoint._agree_on_error``).
    """
    path = directory / MANIFEST_FILE
    fix = f"resume from another step (trainer.resume=RUN_DIR/checkpoints/step_N) or delete {directory}"
    try:
        stored = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return CheckpointError(f"checkpoint {directory} has no {MANIFEST_FILE}: it is incomplete or was "
                               f"written by an older version without checksums; {fix}")  # fmt: skip
    except (ValueError, KeyError, TypeError) as err:
        return CheckpointError(f"{path} is damaged ({err}); {fix}")
    present = set(_files(directory))
    missing = sorted(set(stored) - present)
    if missing:
        return CheckpointError(f"checkpoint {directory} is missing {', '.join(missing[:5])}; {fix}")
    for name in _my_share(sorted(stored)):
        size, digest = stored[name]
        actual = (directory / name).stat().st_size
        if actual != size:
            return CheckpointError(
                f"checkpoint file {directory / name} has {actual} bytes, {size} were saved (truncated or "
                f"overwritten); {fix}"
            )
        if _digest(directory / name) != digest:
            return CheckpointError(
                f"checkpoint file {directory / name} does not match its saved SHA-256 (the data was "
                f"changed on disk after the save); {fix}"
            )
    return None
