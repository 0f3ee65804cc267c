"""Session-wide local Slurm cluster (see local_slurm.py). Where it cannot start the Slurm tests skip,
with the reason, except under CI (``local_slurm.ci_requires_slurm``): there they fail."""

from __future__ import annotations

import os
import sys

import pytest
from local_slurm import LocalSlurm, SlurmUnavailable, ci_requires_slurm


@pytest.fixture(scope="session")
def local_slurm():
    try:
        cluster = LocalSlurm.start()
    except SlurmUnavailable as err:
        reason = f"local Slurm cannot start here: {err}"
        if ci_requires_slurm():
            pytest.fail(f"{reason} (CI={os.environ['CI']}: the Slurm tests must run in CI)", pytrace=False)
        sys.stderr.write(f"\n[tests/slurm] SKIP: {reason}\n")
        pytest.skip(reason)
    yield cluster
    cluster.stop()
