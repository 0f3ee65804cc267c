"""sdpg-train (cli.py): the config is validated for the launch's world before anything starts (exit 2)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_mcore.cli import launch_world_size, main

RECIPE = """
model: {path: /models/tiny}
data: {train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,
       batch_prompts: 4, mini_batch_prompts: 2}
"""
TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "sdpg.yaml"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_cli_rejects_world_size_mismatch(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "--nproc", "3", "parallel.tp=2"])
    assert err.value.code == 2
    assert (
        "world size 3 is not divisible by parallel.tp x parallel.pp x parallel.cp" in capsys.readouterr().err
    )


def test_cli_rejects_a_bad_teacher_decay_naming_the_key(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "algorithm.teacher=ema", "algorithm.teacher_ema_decay=1.5"])
    assert err.value.code == 2
    assert "config key 'algorithm.teacher_ema_decay': must be in (0, 1)" in capsys.readouterr().err


def test_cli_rejects_unknown_key(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "trainer.totl_steps=3"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown config key 'trainer.totl_steps'; did you mean 'trainer.total_steps'?" in msg


def test_cli_print_config(recipe, capsys):
    assert main(["--config", recipe, "--print-config", "algorithm.name=grpo"]) == 0
    out = capsys.readouterr().out
    assert "name: grpo" in out and "clip_c: 1000.0" in out


SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NODELIST": "node[01-02]"}


def test_world_size_from_slurm_torchrun_or_nproc():
    assert launch_world_size(0, SLURM) == 4
    assert launch_world_size(0, {**SLURM, "RANK": "0", "WORLD_SIZE": "2"}) == 2  # torchrun wins
    assert launch_world_size(3, SLURM) == 3
    assert launch_world_size(0, {}) == 1


def test_cli_validates_the_config_for_the_slurm_world(monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert main(["--config", str(TINY), "--print-config", "parallel.tp=2"]) == 0
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(TINY), "--print-config", "parallel.tp=2"])
    assert exc.value.code == 2 and "world size 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.name=grpo", "algorithm.beta=0.1"],
            "'algorithm.beta' is not an option of algorithm.name=grpo",
        ),
        (["algorithm.kl_clamp=0"], "'algorithm.kl_clamp': must be > 0"),
        (
            ["algorithm.name=opsd", "algorithm.teacher_temperature=-1"],
            "'algorithm.teacher_temperature': must be > 0",
        ),
    ],
)
def test_cli_rejects_bad_algorithm_values_before_any_set_up(recipe, capsys, overrides, message):
    """Exit 2 from the config check alone: no process group is made (``--nproc 2`` would spawn ranks)."""
    import torch.distributed as dist

    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "--nproc", "2", *overrides])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not dist.is_initialized()


def test_cli_rejects_a_bad_head_backend(recipe, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "trainer.logprob_backend=cuda"])
    assert err.value.code == 2
    assert "config key 'trainer.logprob_backend' got 'cuda'; choose one of: auto, torch, triton" in (
        capsys.readouterr().err
    )


def test_cli_rejects_triton_where_it_cannot_run(recipe, capsys, monkeypatch):
    """A machine without the triton package (the optional extra not installed)."""
    from sdpg_mcore.ops import triton_support

    monkeypatch.setattr(triton_support, "triton", None)
    monkeypatch.setattr(triton_support, "IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(SystemExit) as err:
        main(["--config", recipe, "trainer.logprob_backend=triton"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "config key 'trainer.logprob_backend': triton cannot run here" in msg
    assert "pip install 'sdpg_mcore[triton]'" in msg and "set trainer.logprob_backend=auto" in msg


@pytest.mark.parametrize("nproc", [0, 2], ids=["one-process", "nproc-2"])
def test_a_failed_rank_is_one_line_and_its_traceback_is_in_its_log(tmp_path, nproc):
    """Rank 0 cannot reach the external server (rank 1, with ``--nproc 2``, fails on the stand-in
    model): each failing rank gets one console line naming it and its host, no traceback there; the
    traceback is in RUN_DIR/logs/rank_<r>.log."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(TINY), f"model.path={model}"]
    cmd += [f"trainer.run_dir={run_dir}", "rollout.backend=external", "rollout.urls=[http://127.0.0.1:1]"]
    cmd += ["--nproc", str(nproc)] if nproc else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("sdpg-train: error:")]
    assert lines and lines[0].startswith(
        "sdpg-train: error: RolloutUnreachableError: rollout server http://127.0.0.1:1 is unreachable"
    ), done.stderr[-3000:]
    for line in lines:
        rank = int(line.split("(rank ")[1].split()[0])
        log = run_dir / "logs" / f"rank_{rank}.log"
        assert line.endswith(f"(rank {rank} on {socket.gethostname()}; traceback in {log})"), line
        assert "Traceback (most recent call last)" in log.read_text()
