"""Session-wide local Slurm cluster (see local_slurm.py); skipped, with the reason, only where it cannot start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_slurm import LocalSlurm, SlurmUnavailable  # noqa: E402


@pytest.fixture(scope="session")
def local_slurm():
    try:
        cluster = LocalSlurm.start()
    except SlurmUnavailable as err:
        reason = f"local Slurm cannot start here: {err}"
        sys.stderr.write(f"\n[tests/slurm] SKIP: {reason}\n")
        pytest.skip(reason)
    yield cluster
    cluster.stop()
