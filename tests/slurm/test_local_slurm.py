"""The local Slurm harness itself: a batch job with an ``srun -n2`` step, exit codes, size limits."""

from __future__ import annotations

import textwrap

from local_slurm import ci_requires_slurm


def test_sbatch_srun_two_tasks_and_exit_code(local_slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            #SBATCH --ntasks=2
            #SBATCH --job-name=harness
            srun -n2 bash -c 'echo "task $SLURM_PROCID/$SLURM_NTASKS on $(scontrol show hostnames "$SLURM_JOB_NODELIST")"'
            exit 3
            """
        )
    )
    out = tmp_path / "out.txt"
    job_id = local_slurm.submit(script, f"--output={out}", cwd=tmp_path)
    info = local_slurm.wait(job_id, timeout_s=120)
    assert info.state == "FAILED" and info.exit_code == 3, info
    lines = sorted(out.read_text().split("\n"))
    assert [line.split(" on ")[0] for line in lines if line] == ["task 0/2", "task 1/2"]

    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/bash\necho fine\n")
    info = local_slurm.wait(local_slurm.submit(ok, f"--output={tmp_path}/ok.txt"), timeout_s=120)
    assert (info.state, info.exit_code) == ("COMPLETED", 0)
    assert (tmp_path / "ok.txt").read_text() == "fine\n"


def test_oversized_request_fails_at_submit(local_slurm, tmp_path):
    """EnforcePartLimits=ALL: asking for more nodes than exist fails fast instead of pending forever."""
    script = tmp_path / "big.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    try:
        local_slurm.submit(script, "--nodes=2")
    except RuntimeError as err:
        assert "node" in str(err).lower()
    else:
        raise AssertionError("sbatch --nodes=2 on a one-node cluster should be refused")


def test_ci_requires_slurm_rather_than_a_skip():
    """``.ci/run`` sets CI=true: there the fixture fails when Slurm cannot start; elsewhere it skips."""
    assert (
        ci_requires_slurm({"CI": "true"})
        and ci_requires_slurm({"CI": "1"})
        and ci_requires_slurm({"CI": "YES"})
    )
    assert (
        not ci_requires_slurm({})
        and not ci_requires_slurm({"CI": "false"})
        and not ci_requires_slurm({"CI": ""})
    )
