"""A real one-node Slurm cluster for tests: Debian's slurmctld + slurmd + munge, private config.

Everything lives in a fresh temp directory (config, state, spool, logs, PID files, a private munged
with its own key and socket), so nothing under /etc is touched and two instances can run side by
side on their own ports. Every client command and every job needs ``SLURM_CONF``; ``env()`` has it.

    slurm = LocalSlurm.start()          # installs the Debian packages if missing (root only)
    job = slurm.submit("job.sh", env={"DRY_RUN": "1"})
    info = slurm.wait(job, timeout_s=300)   # JobInfo(state="COMPLETED", exit_code=0, ...)
    slurm.stop()                        # cancels jobs, then stops daemons by their PID files

``python tests/slurm/local_slurm.py`` starts a cluster, prints its ``SLURM_CONF`` and waits for
Ctrl-C (handy for trying ``slurm/*.sh`` by hand).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")
NODE_NAME = socket.gethostname().split(".")[0]  # slurmctld checks it runs on the SlurmctldHost
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, packages cannot be installed, daemons do not start)."""


def ci_requires_slurm(environ=os.environ) -> bool:
    """Whether the Slurm tests must run rather than skip: under CI (``CI`` = true, 1 or yes; ``.ci/run``
    sets it), so that a CI machine where Slurm cannot start fails them instead of passing by skipping."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class JobInfo:
    """What ``scontrol show job`` says about a finished (or still running) job."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    fields: dict[str, str]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_installed() -> None:
    """Install the Debian packages when a binary is missing (``apt-get update`` once, then install)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise SlurmUnavailable(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )


def _node_hardware() -> dict[str, int]:
    """CPUs/sockets/cores/threads/memory as ``slurmd -C`` reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", out))
    keys = ("CPUs", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if not all(k in fields for k in keys):
        raise SlurmUnavailable(f"cannot read the node's hardware from `slurmd -C`: {out!r}")
    return {k: int(fields[k]) for k in keys}


class LocalSlurm:
    """One running single-node cluster; use ``start()`` to make one."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"

    # ---- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, timeout_s: float = 60.0) -> LocalSlurm:
        """Install if needed, write the private config, start munged, slurmctld, slurmd; wait for idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm runs its daemons as root (SlurmUser=root); not root here")
        ensure_installed()
        slurm = cls(Path(tempfile.mkdtemp(prefix="sdpg-slurm-")))
        try:
            slurm._write_config()
            slurm._start_munge()
            slurm._run_daemon(["slurmctld", "-f", str(slurm.conf)], slurm.root / "slurmctld.pid")
            slurm._run_daemon(["slurmd", "-f", str(slurm.conf), "-N", NODE_NAME], slurm.root / "slurmd.pid")
            slurm._wait_idle(timeout_s)
        except BaseException:
            slurm.stop(keep_dir=True)
            raise
        return slurm

    def stop(self, keep_dir: bool = False) -> None:
        """Cancel all jobs, wait for them to leave, then stop slurmd, slurmctld and munged by PID file."""
        if (self.root / "slurmctld.pid").exists():
            subprocess.run(
                ["scancel", "--full", "--partition=debug"], env=self.env(), capture_output=True, timeout=30
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.queue():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            self._stop_pid(self.root / f"{name}.pid")
        if not keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- client side -------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment every client command and job needs (``SLURM_CONF`` points at our config)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, *cmd: str, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit(
        self, script: str | Path, *sbatch_args: str, env: dict[str, str] | None = None, cwd=None
    ) -> str:
        """``sbatch --parsable`` the script (extra ``sbatch_args`` go before it); return the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script)]
        proc = subprocess.run(cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def queue(self) -> list[str]:
        """Job ids still in the queue."""
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return out.split()

    def job(self, job_id: str) -> JobInfo:
        """Parse ``scontrol show job -o ID`` (kept by slurmctld for MinJobAge after the end)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(re.findall(r"(\S+?)=(\S*)", out))
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), int(code), int(sig or 0), fields)

    def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> JobInfo:
        """Poll ``squeue -h -j ID`` until the job leaves the queue; raise TimeoutError (after scancel)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
            state = proc.stdout.strip()
            if proc.returncode == 0 and (not state or state in TERMINAL_STATES):
                info = self.job(job_id)
                if info.state in TERMINAL_STATES:
                    return info
            time.sleep(poll_s)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(
            f"job {job_id} still in the queue after {timeout_s:.0f}s: {self.job(job_id).state}"
        )

    # ---- internals ----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        hw = _node_hardware()
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir()
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)  # munged refuses a socket dir others may write
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        memory = max(256, int(hw["RealMemory"] * 0.9))  # a bit below: too high drains the node
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=sdpgtest",
                    "MailProg=/bin/true",
                    f"SlurmctldHost={NODE_NAME}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r}/munge/munge.socket",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.pid",
                    f"SlurmctldLogFile={r}/slurmctld.log",
                    f"SlurmdLogFile={r}/slurmd.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "EnforcePartLimits=ALL",
                    "SchedulerParameters=batch_sched_delay=0",
                    "JobCompType=jobcomp/none",
                    "MinJobAge=300",
                    "KillWait=5",
                    f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} Boards=1 "
                    f"SocketsPerBoard={hw['SocketsPerBoard']} CoresPerSocket={hw['CoresPerSocket']} "
                    f"ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={memory} State=UNKNOWN",
                    f"PartitionName=debug Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _start_munge(self) -> None:
        m = self.root / "munge"
        cmd = [
            "munged",
            f"--socket={m}/munge.socket",
            f"--key-file={m}/munge.key",
            f"--pid-file={self.root}/munged.pid",
            f"--log-file={m}/munged.log",
            f"--seed-file={m}/munged.seed",
            "--force",  # tolerate /tmp's sticky world-writable parent
        ]
        self._run_daemon(cmd, self.root / "munged.pid")

    def _run_daemon(self, cmd: list[str], pid_file: Path, timeout_s: float = 20.0) -> None:
        """Start a self-daemonising program and wait for its PID file."""
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
            raise SlurmUnavailable(
                f"{cmd[0]} did not start ({proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                return
            time.sleep(0.1)
        raise SlurmUnavailable(
            f"{cmd[0]} wrote no PID file {pid_file} within {timeout_s:.0f}s; logs in {self.root}"
        )

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-n", NODE_NAME, "-o", "%t", check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        log = (
            (self.root / "slurmctld.log").read_text()[-800:] if (self.root / "slurmctld.log").exists() else ""
        )
        raise SlurmUnavailable(f"node {NODE_NAME} not idle after {timeout_s:.0f}s (state {state!r}); {log}")

    @staticmethod
    def _stop_pid(pid_file: Path, timeout_s: float = 15.0) -> None:
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip())
        except ValueError:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    cluster = LocalSlurm.start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")  # noqa: T201
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
