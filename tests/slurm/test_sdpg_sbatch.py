"""slurm/sdpg_70b.sh submitted to the real local Slurm: failure paths, checkpoint-and-requeue, DRY_RUN.

The job runs with the DRY_RUN header overrides a CPU machine needs (one node, 2 task slots, no GPUs)
and SDPG_FAKE_NODES=2, so the dedicated-rollout node logic (trainer node + rollout node) is exercised.
"""

from __future__ import annotations

import json
import random
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdpg_mcore.parallel.spawn import find_free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "sdpg_70b.sh"
CPU_HEADER = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=20")

# A stand-in server that answers /health at once (for tests of the trainer-side launch logic).
HEALTH_SERVER = (
    '"$PYTHON" -c "import http.server as h, os\n'
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self): self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
    "h.HTTPServer(('0.0.0.0', int(os.environ['SDPG_SERVER_PORT'])), H).serve_forever()\""
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Dry-run model and data, made once (the script reuses them through DRY_RUN_ASSETS)."""
    return tmp_path_factory.mktemp("dryrun_assets")


def _free_port_block(size: int) -> int:
    """First port of ``size`` consecutive ports that are free now, below Linux's ephemeral range (32768+).

    Every job gets fresh ports: a fixed port per test session collided with the previous test's router still
    shutting down, or with an outgoing connection that the kernel had given an ephemeral port in the range.
    """
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - size)
        socks = []
        try:
            for port in range(first, first + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("0.0.0.0", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {size} consecutive free ports in 20000-32000")


def _submit(slurm, tmp_path: Path, assets: Path, script: Path = SCRIPT, **env: str) -> tuple[str, Path]:
    out = tmp_path / "job.out"
    ports = _free_port_block(8)  # servers at ports[0:4], router and its Prometheus exporter at +4, +5
    base = {
        "DRY_RUN": "1",
        "PYTHON": sys.executable,
        "RUN_DIR": str(tmp_path / "run"),
        "DRY_RUN_ASSETS": str(assets),
        "SERVER_BASE_PORT": str(ports),
        "ROUTER_PORT": str(ports + 4),
        "ROUTER_METRICS_PORT": str(ports + 5),
        "MASTER_PORT": str(find_free_port()),  # job ids restart at 1 on every fresh test cluster
    }
    job = slurm.submit(script, *CPU_HEADER, f"--output={out}", env={**base, **env}, cwd=REPO)
    return job, out


def _release_requeued(slurm, job: str, timeout_s: float = 150.0) -> None:
    """Slurm holds a requeued job for ~2 minutes (BeginTime); start it once the first run has ended.

    Released while the node still completes the first run, the new run could be marked FAILED by the
    first run's late completion message (seen once in ~10 runs), so wait for the node to be idle. And
    slurmd refuses a launch whose credential was made in the same second as the first run's kill
    ("Job credential revoked" / "Job N already killed, do not launch batch job": it compares whole
    seconds; 2 of 8 runs on this machine), so release it only 2 s after the requeue was first seen.
    """
    deadline = time.monotonic() + timeout_s
    requeued_at = None
    while time.monotonic() < deadline:
        info = slurm.job(job)
        node_state = slurm.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if info.fields.get("Restarts") == "1" and info.state == "PENDING":
            requeued_at = requeued_at or time.monotonic()
            if node_state == "idle" and time.monotonic() - requeued_at >= 2.0:
                slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        elif info.fields.get("Restarts") == "1" and info.state != "PENDING":
            return
        time.sleep(0.5)


def test_server_that_never_comes_up_ends_job(local_slurm, tmp_path, assets):
    start = time.monotonic()
    job, out = _submit(local_slurm, tmp_path, assets, SERVER_CMD="exec sleep 600", DRY_RUN_HEALTH_TIMEOUT="5")
    info = local_slurm.wait(job, timeout_s=240)
    text = out.read_text()
    assert (info.state, info.exit_code) == ("FAILED", 3), text
    assert "ERROR: rollout server 0 (http://" in text and "did not become healthy within 5s" in text
    assert "cleanup done (exit 3)" in text
    assert time.monotonic() - start < 200
    assert not local_slurm.queue()


def test_server_that_crashes_ends_job_at_once(local_slurm, tmp_path, assets):
    job, out = _submit(local_slurm, tmp_path, assets, SERVER_CMD="echo no GPU here >&2; exit 7")
    info = local_slurm.wait(job, timeout_s=240)
    text = out.read_text()
    assert (info.state, info.exit_code) == ("FAILED", 3), text
    assert "exited with code 7 before becoming healthy" in text
    assert "no GPU here" in text  # the server log's tail is in the job output


def test_usr1_checkpoints_and_requeues(local_slurm, tmp_path, assets):
    """Time-limit signal: the trainer is told (SIGUSR1 + save file), saves, exits; the job requeues."""
    trainer = tmp_path / "trainer.sh"
    trainer.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            # Stand-in trainer: records how it was launched, saves on SIGUSR1 or the save file.
            marks={tmp_path}/marks
            echo "rank=$SLURM_PROCID restart=${{SLURM_RESTART_COUNT:-0}} args=$*" >> "$marks"
            [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] && {{ echo "resumed $SLURM_PROCID" >> "$marks"; exit 0; }}
            trap 'echo "usr1 $SLURM_PROCID" >> "$marks"' USR1
            for i in $(seq 600); do
              [ -f "$SDPG_SAVE_FILE" ] && {{ sleep 0.5; echo "saved $SLURM_PROCID" >> "$marks"; exit 0; }}
              sleep 0.2
            done
            exit 9
            """
        )
    )
    trainer.chmod(0o755)
    job, out = _submit(
        local_slurm, tmp_path, assets, SERVER_CMD=HEALTH_SERVER, USE_ROUTER="0", TRAINER_CMD=str(trainer)
    )
    marks = tmp_path / "marks"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (marks.exists() and marks.read_text().count("restart=0") == 2):
        time.sleep(0.5)
    assert marks.exists(), out.read_text() if out.exists() else "no job output"
    local_slurm.run("scancel", "--batch", "--signal=USR1", job)
    _release_requeued(local_slurm, job)
    info = local_slurm.wait(job, timeout_s=240)
    events = [line.split()[0] for line in marks.read_text().splitlines()]
    assert (info.state, info.exit_code) == ("COMPLETED", 0), out.read_text()
    assert info.fields.get("Restarts") == "1", info.fields
    assert (
        sorted(events)
        == ["rank=0", "rank=0", "rank=1", "rank=1"] + ["resumed"] * 2 + ["saved"] * 2 + ["usr1"] * 2
    )
    text = marks.read_text()
    assert "rollout.backend=external" in text and "rollout.urls=[http://" in text
    assert "requeueing job" in out.read_text()


def test_dry_run_end_to_end(local_slurm, tmp_path, assets):
    """DRY_RUN=1: tiny model, dev server behind the real router, 2-rank trainer; checkpoint + metrics."""
    # USE_ROUTER=0: with rollout.backend=external the trainer pushes weights to every URL it is given,
    # and the router does not serve /update_weights_from_disk (HTTP 404); the router itself is
    # covered by test_dry_run_dev_server_behind_router.
    job, out = _submit(local_slurm, tmp_path, assets, USE_ROUTER="0")
    info = local_slurm.wait(job, timeout_s=900)
    text = out.read_text()
    logs = sorted((tmp_path / "run" / "logs").glob("job_*/*.log"))
    detail = text + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), detail
    names = {p.name for p in logs}
    assert {"server_0.log", "trainer_0.log", "trainer_1.log"} <= names, names
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [1, 2], metrics
    assert all(m["num_responses"] == 4 for m in metrics)  # 2 prompts x n=2 through the dev server
    assert {"step_00000001", "step_00000002"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert_key_only_in_its_file(run, out)


def assert_key_only_in_its_file(run_dir: Path, job_output: Path) -> None:
    """The job's key (0600, in a 0700 directory) is in no log, config or output of the run, nor in
    the job's Slurm output file."""
    (key_file,) = (run_dir / "secrets").glob("rollout_api_key_job_*")
    assert (
        stat.S_IMODE(key_file.stat().st_mode) == 0o600
        and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    )
    key = key_file.read_text().strip()
    assert len(key) == 64
    searched = [str(run_dir), str(job_output)]
    found = subprocess.run(["grep", "-rl", key, *searched], capture_output=True, text=True).stdout.split()
    assert job_output.is_file() and found == [str(key_file)], found


@pytest.mark.slow
def test_dry_run_colocated_end_to_end(local_slurm, tmp_path, assets):
    """sdpg_qwen3_4b.sh's default colocated mode with the real trainer: the servers, started before
    it, release their memory while it builds its model (rollout.colocated=true from the script),
    get it back with the weights before each rollout, and the run completes with checkpoints."""
    job, out = _submit(local_slurm, tmp_path, assets, REPO / "slurm" / "sdpg_qwen3_4b.sh", USE_ROUTER="0")
    info = local_slurm.wait(job, timeout_s=900)
    logs = sorted((tmp_path / "run" / "logs").glob("job_*/*.log"))
    detail = out.read_text() + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), detail
    assert "rollout: colocated" in out.read_text() and "servers share the trainer's GPUs" in out.read_text()
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [1, 2], metrics
    # Step 2 sampled the weights pushed after step 1 (disk, as the script sets for colocated servers).
    assert metrics[1]["logprob_mismatch"] < 1e-4 and metrics[1]["rollout/weight_version"] == 1.0
    config = (run / "config.yaml").read_text()
    assert "colocated: true" in config and "weight_sync: disk" in config
    assert_key_only_in_its_file(run, out)


@pytest.mark.parametrize("script", ["sdpg_70b.sh", pytest.param("sdpg_qwen3_4b.sh", marks=pytest.mark.slow)])
def test_dry_run_dev_server_behind_router(local_slurm, tmp_path, assets, script):
    """DRY_RUN's servers (built-in dev server) behind the real sglang_router, queried by a stand-in trainer.

    sdpg_70b.sh: dedicated rollout node (two pretend nodes); sdpg_qwen3_4b.sh: colocated on one node.
    """
    trainer = tmp_path / "trainer.sh"
    trainer.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            # Stand-in trainer: one /generate through the router URL the script passes as rollout.urls,
            # with the key from rollout.api_key_file, and one without it (refused).
            url=$(printf '%s\\n' "$@" | sed -n 's/^rollout.urls=\\[\\(.*\\)\\]$/\\1/p')
            key_file=$(printf '%s\\n' "$@" | sed -n 's/^rollout.api_key_file=//p')
            [ "$SLURM_PROCID" = 0 ] || exit 0
            body='{{"input_ids": [1, 2, 3], "sampling_params": {{"max_new_tokens": 4, "temperature": 1.0}}, "return_logprob": true}}'
            curl -s -o /dev/null -w '%{{http_code}}' -m 60 "$url/generate" -H 'Content-Type: application/json' \\
              -d "$body" > {tmp_path}/without_key.status
            curl -sf -m 120 "$url/generate" -H 'Content-Type: application/json' \\
              -H "Authorization: Bearer $(cat "$key_file")" -d "$body" > {tmp_path}/generate.json
            """
        )
    )
    trainer.chmod(0o755)
    job, out = _submit(local_slurm, tmp_path, assets, REPO / "slurm" / script, TRAINER_CMD=str(trainer))
    info = local_slurm.wait(job, timeout_s=600)
    logs = sorted((tmp_path / "run" / "logs").glob("job_*/*.log"))
    detail = out.read_text() + "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), detail
    assert "router is healthy" in out.read_text()
    mode = "dedicated" if script == "sdpg_70b.sh" else "colocated"
    assert f"rollout: {mode}" in out.read_text()
    reply = json.loads((tmp_path / "generate.json").read_text())
    assert reply["meta_info"]["completion_tokens"] == len(reply["output_ids"]) <= 4, reply
    assert (tmp_path / "without_key.status").read_text() == "401"
    assert "servers listen on: 127.0.0.1" in out.read_text()  # one host: loopback only
    assert_key_only_in_its_file(tmp_path / "run", out)
    assert len(reply["meta_info"]["output_token_logprobs"]) == len(reply["output_ids"])


@pytest.mark.slow
def test_dry_run_time_limit_requeues_and_resumes(local_slurm, tmp_path, assets):
    """The real trainer: SIGUSR1 after the first checkpoint, requeue, resume to the last step."""
    job, out = _submit(local_slurm, tmp_path, assets, USE_ROUTER="0", DRY_RUN_STEPS="4")
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (checkpoints / "step_00000001").exists():
        time.sleep(0.5)
    assert (checkpoints / "step_00000001").exists(), out.read_text()
    local_slurm.run("scancel", "--batch", "--signal=USR1", job)
    _release_requeued(local_slurm, job)
    info = local_slurm.wait(job, timeout_s=900)
    text = out.read_text()
    assert (info.state, info.exit_code) == ("COMPLETED", 0), text
    assert info.fields.get("Restarts") == "1" and "requeueing job" in text
    run = tmp_path / "run"
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    assert steps[-1] == 4 and sorted(set(steps)) == [1, 2, 3, 4], steps
    assert (checkpoints / "step_00000004").exists()
