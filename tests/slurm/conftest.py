"""Session-wide local Slurm cluster (see local_slurm.py); skipped, with the reason, only where it cannot start."""

from __future__ import annotations

import sys

import pytest
from local_slurm import LocalSlurm, SlurmUnavailable


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
