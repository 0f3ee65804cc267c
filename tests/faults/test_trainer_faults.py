"""Fault injection against the real trainer, servers and checkpoints (issue 13): each fault ends in the
promised behaviour, never in a hang, a silent wrong result or a leftover process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_testlib import make_assets

from sdpg_mcore.parallel.spawn import spawn_ranks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"), sft_steps=3, num_train=64)


def _cli(assets, run_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "sdpg_mcore.cli", "--config", str(REPO / "examples/tiny/sdpg.yaml"),
        f"model.path={assets / 'model'}", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"trainer.run_dir={run_dir}", "data.batch_prompts=4", "data.mini_batch_prompts=2", "rollout.n=2",
        "logging.progress=false", "logging.tensorboard=false", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- checkpoint bytes ----------------------------------------------------------------------------


def _save_and_damage(rank, world_size, hf_dir, root):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train import checkpoint as ckpt
    from sdpg_mcore.train.checkpoint_state import allocate_distributed_optimizer_state
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    optim = OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.0)
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=4, vocab_size=301, chunk_size=16
    )
    allocate_distributed_optimizer_state(policy.optimizer)  # Adam state to save, as after a step
    path = ckpt.save_checkpoint(root, 1, policy.chunks, policy.optimizer, policy.scheduler, hf_dir=hf_dir)
    pristine = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    biggest = max((p for p in pristine if p.suffix == ".distcp"), key=lambda p: len(pristine[p]))
    errors = {}
    for name, damage in {
        "overwrite_4k": lambda f: f.write_bytes(f.read_bytes()[:8192] + b"\xff" * 4096 + f.read_bytes()[12288:]),
        "one_byte": lambda f: f.write_bytes(f.read_bytes()[:100] + bytes([f.read_bytes()[100] ^ 1]) + f.read_bytes()[101:]),
        "truncated": lambda f: f.write_bytes(f.read_bytes()[:1000]),
    }.items():  # fmt: skip
        damage(biggest)
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load_checkpoint(root, policy.chunks, policy.optimizer, policy.scheduler)
        errors[name] = str(err.value)
        biggest.write_bytes(pristine[biggest])
    loaded = ckpt.load_checkpoint(root, policy.chunks, policy.optimizer, policy.scheduler)  # intact again
    # total_steps 4 -> 8 updates: a constant LR does not depend on it, a decaying one does
    longer = _schedule(policy.optimizer, "constant", 8)
    ckpt.load_checkpoint(root, policy.chunks, policy.optimizer, longer)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(root, policy.chunks, policy.optimizer, _schedule(policy.optimizer, "cosine", 8))
    errors["cosine"] = str(err.value)
    state.destroy()
    return errors, loaded.step, biggest.name, (longer.lr_decay_steps, longer.num_steps, longer.get_lr({}))


def _schedule(optimizer, style: str, decay_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=1e-3, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=decay_steps,
        lr_decay_style=style, start_wd=0.0, end_wd=0.0, wd_incr_steps=decay_steps, wd_incr_style="constant",
    )  # fmt: skip


@pytest.mark.slow  # Megatron model + checkpoint, 40 s-3 min; the fast test below checks the same manifest
def test_damaged_checkpoint_is_refused_and_a_constant_lr_run_can_be_extended(tmp_path):
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    hf_dir = str(save_tiny_hf_model(tmp_path / "hf", "qwen3", num_hidden_layers=2, seed=1))
    errors, step, name, extended = spawn_ranks(_save_and_damage, 1, args=(hf_dir, tmp_path / "ckpt"))[0]
    assert step == 1
    assert extended == (8, 0, 1e-3)  # the longer run's schedule, at the saved position, same LR
    assert "lr_decay_style='constant' in the checkpoint vs 'cosine' now" in errors["cosine"]
    assert "only a constant-LR run (optimizer.lr_decay_style=constant) can change" in errors["cosine"]
    for kind in ("overwrite_4k", "one_byte"):
        assert name in errors[kind] and "does not match its saved SHA-256" in errors[kind], errors[kind]
    assert name in errors["truncated"] and "has 1000 bytes" in errors["truncated"], errors["truncated"]


def test_manifest_names_the_overwritten_truncated_or_missing_file(tmp_path):
    from sdpg_mcore.train import checkpoint_manifest as manifest

    ckpt = tmp_path / "step_00000001"
    (ckpt / "rng").mkdir(parents=True)
    files = {"__0_0.distcp": bytes(range(256)) * 64, "rng/rank_00000.pt": b"rng", "trainer_state.json": b"{}"}
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    (ckpt / manifest.MANIFEST_FILE).write_bytes(manifest.manifest_bytes(manifest.manifest(ckpt)))
    assert manifest.verify(ckpt) is None
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(files["__0_0.distcp"][:8192] + b"\xff" * 4096 + files["__0_0.distcp"][12288:])
    assert "__0_0.distcp does not match its saved SHA-256" in str(manifest.verify(ckpt))
    shard.write_bytes(files["__0_0.distcp"][:1000])
    assert "__0_0.distcp has 1000 bytes, 16384 were saved" in str(manifest.verify(ckpt))
    shard.write_bytes(files["__0_0.distcp"])
    (ckpt / "rng/rank_00000.pt").unlink()
    assert "is missing rng/rank_00000.pt" in str(manifest.verify(ckpt))
    (ckpt / manifest.MANIFEST_FILE).unlink()
    assert f"has no {manifest.MANIFEST_FILE}" in str(manifest.verify(ckpt))


# -- trainer processes ---------------------------------------------------------------------------


@pytest.mark.slow  # a trainer run, ~30 s
def test_nan_loss_stops_the_run_with_an_error_and_no_checkpoint(assets, tmp_path):
    run = subprocess.run(
        _cli(assets, tmp_path / "run", "optimizer.lr=inf", "trainer.total_steps=3", "trainer.save_interval=1"),
        capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert "sdpg-train: error: NonFiniteError: step 1:" in run.stderr
    assert "optimizer.lr" in run.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing non-finite was saved
    assert not list((tmp_path / "run").glob("weights/weights-*"))  # nor pushed to the servers


@pytest.mark.slow  # two trainer runs, ~1-2 min
def test_kill9_mid_save_leaves_no_process_and_the_run_restarts_at_once(assets, tmp_path):
    run_dir = tmp_path / "run"
    args = _cli(
        assets, run_dir, "trainer.total_steps=4", "trainer.save_interval=1", "trainer.keep_checkpoints=0"
    )
    trainer = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts, children = run_dir / "checkpoints", set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and trainer.poll() is None:
        children |= _descendants(trainer.pid)
        if ckpts.is_dir() and any(p.name.startswith(".tmp-step_") for p in ckpts.iterdir()):
            break  # a save is under way
        time.sleep(0.005)
    assert trainer.poll() is None, "the run ended before a save could be interrupted"
    children |= _descendants(trainer.pid)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    assert children, "the trainer should have started servers"
    give_up = time.monotonic() + 15
    while time.monotonic() < give_up and any(_alive(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if _alive(p)], "children outlived the killed trainer"

    again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4


def test_two_single_process_runs_need_no_shared_port(tmp_path):
    """Each single-process trainer rendezvouses in-process: no fixed port (29500) to collide on."""
    code = (
        "import sys\n"
        "from sdpg_mcore.parallel import state\n"
        "state.initialize_distributed(); import torch.distributed as dist\n"
        "print(dist.get_world_size(), flush=True); sys.stdin.read()\n"
    )
    first, second = (
        subprocess.Popen([sys.executable, "-c", code], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    )  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "1", first.stderr.read()
        assert second.stdout.readline().strip() == "1", second.stderr.read()
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("model: {path: x\n", [], "is not valid YAML at line 4, column 1"),
        (
            "trainer: {keep_checkpoints: 1}\n",
            ["trainer.keep_checkpoints=-1"],
            "'trainer.keep_checkpoints': must be >= 0",
        ),
        ("trainer: {nonfinite_patience: -2}\n", [], "'trainer.nonfinite_patience': must be >= 0"),
        ("model: {path: /does/not/exist}\n", [], "'model.path': '/does/not/exist' is not a directory"),
    ],
    ids=["yaml_syntax", "keep_checkpoints", "patience", "model_path"],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, text, override, message):
    from sdpg_mcore.cli import main

    recipe = tmp_path / "r.yaml"
    base = "data: {train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,\n"
    base += "       batch_prompts: 4, mini_batch_prompts: 2}\n"
    recipe.write_text(base + (f"model: {{path: {tmp_path}}}\n" if "model" not in text else "") + text)
    with pytest.raises(SystemExit) as err:
        main(["--config", str(recipe), *override])
    assert err.value.code == 2
    out = capsys.readouterr().err
    assert message in out and "Traceback" not in out, out


def test_aborted_samples_are_never_trained_on():
    from sdpg_mcore.rollout.client import RolloutError, Sample
    from sdpg_mcore.train.rollout_io import _without_aborted

    def scored(prompt, reason):  # (prompt, sample, reward, acc), as RolloutSession scores them
        return (prompt, Sample(0, 0, [1], [2, 3], [-0.1, -0.2], "x", reason, "1"), 1.0, 1.0)

    groups = [
        [scored("p0", "stop"), scored("p0", "abort")],
        [scored("p1", "abort")],
        [scored("p2", "length")],
    ]
    cleaned, dropped = _without_aborted(groups, step=3)
    assert dropped == 2
    assert [[(p, s.finish_reason) for p, s, _, _ in g] for g in cleaned] == [
        [("p0", "stop")],
        [("p2", "length")],
    ]
    with pytest.raises(RolloutError, match="step 3: every response was aborted"):
        _without_aborted([[scored("p1", "abort")]], step=3)
