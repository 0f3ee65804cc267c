"""Trainer checkpoints on real gloo ranks with a real Megatron model, optimizer and dist_checkpointing.

- resume: save at step k, train n more; fresh processes load step k and train the same n steps
  -> bit-identical parameters and RNG draws (TP2 with the plain optimizer, DP2 with the
  distributed optimizer);
- a process killed at three points of a save leaves the previous checkpoint loadable, and the
  next save clears the leftovers;
- ``tools/convert_hf.py to-hf`` of a trainer checkpoint gives the live weights;
- user mistakes (other layout, other model, missing files, dangling ``latest``) name the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpg_mcore.models import unwrap_model
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import find_free_port, spawn_ranks
from sdpg_mcore.train import checkpoint as ckpt
from sdpg_mcore.train import checkpoint_dir

REPO = Path(__file__).resolve().parents[2]
SAVE_STEP, MORE_STEPS = 2, 2
EXTRA = {"sampler": {"epoch": 0, "position": 8}, "config_hash": "abc"}


def _tiny(tmp_path: Path, name: str = "hf", **overrides) -> Path:
    return save_tiny_hf_model(tmp_path / name, "qwen3", num_hidden_layers=2, **overrides)


def _build(hf_dir, tp: int, distributed: bool, pp: int = 1):
    """Model + Megatron DDP + optimizer + LR schedule, built as the trainer builds them."""
    import random

    import numpy as np
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from sdpg_mcore.models.builder import build_gpt_model
    from sdpg_mcore.parallel.state import initialize_model_parallel

    layout = initialize_model_parallel(tp=tp, pp=pp, seed=1234)
    # The trainer seeds these too; TP ranks must agree (same shapes), DP ranks may differ.
    random.seed(7 + layout.dp_rank)
    np.random.seed(7 + layout.dp_rank)
    model = build_gpt_model(hf_dir)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0,
        params_dtype=torch.float32, use_distributed_optimizer=distributed,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2, lr_decay_steps=20,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20, wd_incr_style="constant",
    )  # fmt: skip
    return [ddp], optimizer, scheduler


def _train_step(chunks, optimizer, scheduler) -> None:
    """One update through Megatron's schedule (1F1B under PP) whose data depends on every RNG a
    checkpoint restores (python, numpy, torch, Megatron's tracker)."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from sdpg_mcore.models.builder import causal_attention_mask

    seq = random.randint(4, 8)
    scale = float(np.random.uniform(0.5, 1.5))
    tokens_BS = (torch.randint(0, 301, (2, seq)) + ps.get_data_parallel_rank()) % 301
    with get_cuda_rng_tracker().fork():
        scale *= 1.0 + float(torch.rand(()))
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    positions_BS = torch.arange(seq).expand(2, seq)

    def forward_step(data_iterator, model):
        output = model(tokens_BS, positions_BS, causal_attention_mask(seq), labels=tokens_BS)

        def loss_func(loss_BS):
            loss = loss_BS.float().mean() * scale
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=chunks, num_microbatches=1,
        seq_length=seq, micro_batch_size=2, forward_only=False,
    )  # fmt: skip
    finalize_model_grads(chunks)
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)


def _draws() -> list[float]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(2).tolist()
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist(), *tracker]


def _params(chunks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap_model(chunks[0]).named_parameters()}


#: (tp, pp, distributed optimizer) on 2 ranks: TP2 with the plain optimizer, DP2 with the distributed one.
LAYOUTS = ((2, 1, False), (1, 1, True))


def _root(tmp: Path, tp: int, pp: int) -> Path:
    return tmp / f"tp{tp}pp{pp}"


def _original_run(rank, world_size, hf_dir, tmp, layouts):
    """Per layout: train SAVE_STEP steps, save, record the live HF tensors and RNG draws, train
    MORE_STEPS, save again."""
    from megatron.core import parallel_state as ps

    from checkpoints_convert.model_io import iter_hf_tensors

    results = []
    for tp, pp, distributed in layouts:
        root = _root(tmp, tp, pp)
        chunks, optimizer, scheduler = _build(hf_dir, tp, distributed, pp)
        for _ in range(SAVE_STEP):
            _train_step(chunks, optimizer, scheduler)
        ckpt.save_checkpoint(root, SAVE_STEP, chunks, optimizer, scheduler, hf_dir=hf_dir, extra_state=EXTRA)
        hf_tensors = {k: v.clone() for k, v in iter_hf_tensors(chunks, hf_dir)}
        draws = _draws()
        for _ in range(MORE_STEPS):
            _train_step(chunks, optimizer, scheduler)
        ckpt.save_checkpoint(root, SAVE_STEP + MORE_STEPS, chunks, optimizer, scheduler, hf_dir=hf_dir)
        keep = ps.get_tensor_model_parallel_rank() == 0
        results.append(
            {
                "draws": draws,
                "params": _params(chunks),
                "lr": optimizer.param_groups[0]["lr"],
                "hf": hf_tensors if keep else None,
            }
        )
    return results


def _resumed_run(rank, world_size, hf_dir, tmp, layouts):
    """Per layout: fresh model, load step SAVE_STEP, draw, train MORE_STEPS; plus a wrong-layout load."""
    results = []
    for tp, pp, distributed in layouts:
        chunks, optimizer, scheduler = _build(hf_dir, tp, distributed, pp)
        foreign_error = None
        if (tp, pp) == (1, 1) and _root(tmp, 2, 1).is_dir():  # the TP2 checkpoint at TP1 x DP2
            with pytest.raises(ckpt.CheckpointError) as err:
                ckpt.load_checkpoint(_root(tmp, 2, 1), chunks, optimizer, scheduler)
            foreign_error = str(err.value)
        root = _root(tmp, tp, pp)
        one_rank_error = None
        if (tp, pp) == (1, 1):  # a file only rank 1 reads is missing: both ranks raise, neither hangs
            broken = tmp / "broken"
            if rank == 0:
                shutil.copytree(root, broken)
                (ckpt.step_dir(broken, SAVE_STEP) / ckpt.RNG_DIR / "rank_00001.pt").unlink()
            torch.distributed.barrier()
            with pytest.raises(ckpt.CheckpointError) as err:
                ckpt.load_checkpoint(broken, chunks, optimizer, scheduler, step=SAVE_STEP)
            one_rank_error = str(err.value)
        loaded = ckpt.load_checkpoint(root, chunks, optimizer, scheduler, step=SAVE_STEP, hf_dir=hf_dir)
        draws = _draws()
        for _ in range(MORE_STEPS):
            _train_step(chunks, optimizer, scheduler)
        results.append(
            {
                "step": loaded.step,
                "extra": loaded.extra_state,
                "draws": draws,
                "params": _params(chunks),
                "lr": optimizer.param_groups[0]["lr"],
                "foreign_error": foreign_error,
                "one_rank_error": one_rank_error,
            }
        )
    return results


def _assert_resume_exact(original, resumed) -> None:
    for orig, res in zip(original, resumed):
        assert res["step"] == SAVE_STEP
        assert res["extra"] == EXTRA
        assert res["draws"] == orig["draws"]
        assert res["lr"] == orig["lr"]
        assert orig["params"].keys() == res["params"].keys()
        for name, value in orig["params"].items():
            assert torch.equal(value, res["params"][name]), name


def _export_matches_live(root: Path, out: Path, live: dict[str, torch.Tensor]) -> None:
    """``tools/convert_hf.py to-hf`` (its ``main``, in this process) on a trainer checkpoint."""
    spec = importlib.util.spec_from_file_location("convert_hf_cli", REPO / "tools" / "convert_hf.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["to-hf", "--mcore", str(ckpt.step_dir(root, SAVE_STEP)), "--out", str(out)]) == 0
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(live)
    for name, value in live.items():
        assert torch.equal(exported[name], value), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def _resume_and_export(tmp_path: Path, layouts) -> tuple[list, list]:
    """Run, resume and export each layout on 2 ranks; return (original, resumed) results by rank."""
    hf_dir = _tiny(tmp_path)
    original = spawn_ranks(_original_run, 2, args=(hf_dir, tmp_path, layouts))
    for tp, pp, _ in layouts:
        root = _root(tmp_path, tp, pp)
        assert ckpt.latest_step(root) == SAVE_STEP + MORE_STEPS
        assert ckpt.complete_steps(root) == [SAVE_STEP, SAVE_STEP + MORE_STEPS]
    resumed = spawn_ranks(_resumed_run, 2, args=(hf_dir, tmp_path, layouts))
    for i, (tp, pp, _) in enumerate(layouts):
        _assert_resume_exact([r[i] for r in original], [r[i] for r in resumed])
        live = {k: v for r in original if r[i]["hf"] is not None for k, v in r[i]["hf"].items()}
        # the weights moved after the save, so matching them is not a comparison of untouched weights
        assert not torch.equal(
            original[-1][i]["params"]["decoder.final_layernorm.weight"], live["model.norm.weight"]
        )
        _export_matches_live(_root(tmp_path, tp, pp), tmp_path / f"export_tp{tp}pp{pp}", live)
    return original, resumed


def test_resume_is_exact_tp2_and_dp2_distributed_optimizer_and_exports_to_hf(tmp_path):
    original, resumed = _resume_and_export(tmp_path, LAYOUTS)
    # DP ranks saw different data but hold the same replicated weights
    key = "decoder.final_layernorm.weight"
    assert torch.equal(original[0][1]["params"][key], original[1][1]["params"][key])
    message = resumed[0][1]["foreign_error"]
    assert "different parallel layout" in message and "tp=2 in the checkpoint vs 1 now" in message
    assert "convert_hf.py to-hf" in message
    for rank_result in resumed:
        assert "is missing rng/rank_00001.pt" in rank_result[1]["one_rank_error"]


@pytest.mark.slow
def test_resume_is_exact_pp2_distributed_optimizer_and_exports_to_hf(tmp_path):
    _resume_and_export(tmp_path, ((1, 2, True),))


# -- crashes and user errors (one rank) ----------------------------------------------------------


def _die() -> None:
    """Exit now, with no cleanup, as a killed trainer would (its children die with its process group)."""
    import multiprocessing

    for child in multiprocessing.active_children():  # dist_checkpointing's writer-queue manager
        child.kill()
    os._exit(17)


def _crash_main(mode: str, hf_dir, root, port: int) -> None:
    """Save step 2 and die (``os._exit``, no cleanup) at the point ``mode`` names (``mid_write``
    saves a complete step 1 first)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    chunks, optimizer, scheduler = _build(hf_dir, 1, False)
    _train_step(chunks, optimizer, scheduler)
    if mode == "mid_write":  # first a complete checkpoint of step 1 (its weights kept for the check)
        ckpt.save_checkpoint(root, 1, chunks, optimizer, scheduler, hf_dir=hf_dir, extra_state={"n": 1})
        torch.save(_params(chunks), Path(root).parent / "step1_params.pt")
        shutil.copytree(root, Path(root).parent / "copy")  # for the other-model check
        _train_step(chunks, optimizer, scheduler)
        # the DCP files are written, the RNG / trainer-state files are not

        def write_file(path, data):
            Path(path).write_bytes(data[: len(data) // 2])
            _die()

        ckpt.write_file = write_file
    else:  # "before_pointer": step_2 renamed into place, the new pointer written but not swapped in

        def write_latest(root_dir, name):
            (Path(root_dir) / f"{ckpt.TMP_PREFIX}{ckpt.LATEST_FILE}").write_text(name + "\n")
            _die()

        ckpt.write_latest = write_latest
    ckpt.save_checkpoint(root, 2, chunks, optimizer, scheduler, hf_dir=hf_dir)
    os._exit(3)  # the hook did not fire


def _crash(mode: str, hf_dir, root) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_crash_main, args=(mode, hf_dir, root, find_free_port()))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 17, f"crash child ({mode}) exited with {proc.exitcode}"


def _after_crash(rank, world_size, hf_dir, other_hf_dir, root):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks, optimizer, scheduler = _build(hf_dir, 1, False)
    loaded = ckpt.load_checkpoint(root, chunks, optimizer, scheduler)
    params = _params(chunks)
    errors = {}
    other = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2, lr_decay_steps=30,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20, wd_incr_style="constant",
    )  # fmt: skip
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(root, chunks, optimizer, other)
    errors["schedule"] = str(err.value)
    # the next save clears the crash leftovers, replaces the orphaned step_2 and prunes step_1
    ckpt.save_checkpoint(root, 2, chunks, optimizer, scheduler, hf_dir=hf_dir, keep_last=1)
    (root / "step_00000002" / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(root, chunks, optimizer, scheduler)
    errors["rng"] = str(err.value)
    (root / "step_00000002" / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(root, chunks, optimizer, scheduler, step=2)
    errors["state"] = str(err.value)
    chunks, optimizer, scheduler = _build(other_hf_dir, 1, False)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(root.parent / "copy", chunks, optimizer, scheduler)
    errors["model"] = str(err.value)
    return loaded.step, loaded.extra_state, params, errors


def test_crash_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    hf_dir, other_hf_dir = _tiny(tmp_path), _tiny(tmp_path, "other", intermediate_size=64)
    root = tmp_path / "ckpt"
    _crash("mid_write", hf_dir, root)
    saved = torch.load(tmp_path / "step1_params.pt", weights_only=True)
    assert ckpt.latest_step(root) == 1 and ckpt.complete_steps(root) == [1]
    assert (root / ".tmp-step_00000002" / ".metadata").is_file()

    _crash("before_pointer", hf_dir, root)
    assert ckpt.latest_step(root) == 1 and ckpt.complete_steps(root) == [1, 2]
    assert (root / ".tmp-latest").read_text() == "step_00000002\n"

    ((step, extra, params, errors),) = spawn_ranks(_after_crash, 1, args=(hf_dir, other_hf_dir, root))
    assert step == 1 and extra == {"n": 1}
    for name, value in saved.items():
        assert torch.equal(value, params[name]), name
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text() == "step_00000002\n"
    assert (
        "different LR schedule" in errors["schedule"]
        and "lr_decay_steps=20 in the checkpoint vs 30" in errors["schedule"]
    )
    assert "missing rng/rank_00000.pt" in errors["rng"]
    assert "is missing rng/rank_00000.pt, trainer_state.json" in errors["state"]  # both, from checksums.json
    assert (
        "different model" in errors["model"]
        and "ffn_hidden_size=96 in the checkpoint vs 64 now" in errors["model"]
    )
    assert "hf_assets/config.json" in errors["model"]
    with pytest.raises(
        ckpt.CheckpointError, match="different HF model config .*intermediate_size=96 in the checkpoint vs 64"
    ):
        ckpt.load_checkpoint(tmp_path / "copy", [], None, None, hf_dir=other_hf_dir)


def test_latest_pointer_errors_and_empty_root(tmp_path):
    assert ckpt.latest_step(tmp_path / "nothing") is None
    assert ckpt.load_checkpoint(tmp_path / "nothing", [], None, None) is None
    (tmp_path / "step_00000003").mkdir()
    assert ckpt.latest_step(tmp_path) == 3  # no pointer: the newest complete step
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(
        ckpt.CheckpointError, match=r"names step_00000007 but .* does not exist.*complete steps: \[3\]"
    ):
        ckpt.latest_step(tmp_path)
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint name"):
        ckpt.latest_step(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint for step 5 .*complete steps: \[3\]"):
        ckpt.load_checkpoint(tmp_path, [], None, None, step=5)


def _dir_with(path: Path, text: str) -> Path:
    for sub in ("", ckpt.RNG_DIR, "hf_assets"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "marker").write_text(text)
    return path


def _crash_between_renames(monkeypatch, root: Path) -> None:
    """``checkpoint_dir.commit`` of step 2 over an existing step 2, killed between its two renames."""
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(ckpt.TMP_PREFIX + "step"):
            raise KeyboardInterrupt("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_dir.commit(_dir_with(root / ".tmp-step_00000002", "new"), ckpt.step_dir(root, 2), root)
    monkeypatch.setattr(os, "rename", real_rename)


def test_replacing_the_latest_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    root = tmp_path / "a"
    _dir_with(ckpt.step_dir(root, 1), "one")
    _dir_with(ckpt.step_dir(root, 2), "old")
    checkpoint_dir.write_latest(root, "step_00000002")
    _crash_between_renames(monkeypatch, root)
    assert ckpt.latest_step(root) == 1  # moved to the other complete step before the old 2 left
    # the only checkpoint replaced: the error says how to get it back
    root = tmp_path / "b"
    _dir_with(ckpt.step_dir(root, 2), "old")
    checkpoint_dir.write_latest(root, "step_00000002")
    _crash_between_renames(monkeypatch, root)
    with pytest.raises(
        ckpt.CheckpointError, match=r"interrupted; rename .*\.tmp-replaced-step_00000002 back"
    ):
        ckpt.latest_step(root)
