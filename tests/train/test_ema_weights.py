"""sdpg's guarded teachers (``algorithm.teacher=ema | initial``) in real steps on gloo ranks (fp32 tiny model).

- ``initial``: after two steps (four optimizer steps) the teacher pass still runs the step-0 model:
  the third step's KL is KL(current student || initial teacher), computed independently by
  transformers in fp64 from the exported weights.
- ``ema``: after each optimizer step the average follows ``ema <- ema + (1 - d) (w - ema)`` of the
  recorded weights (an fp64 recursion; the bound is derived from fp32 rounding), and the third step's
  KL is KL(student || the average's model), again from an fp64 forward.
- ``trainer.ema_weights`` host and device give the same step bit for bit.
- checkpoints: the average is saved per TP shard and restored bit for bit; the resumed run continues
  exactly (TP2); a checkpoint without one is refused, naming the key.
"""

import shutil
from pathlib import Path

import pytest
import torch
from steplib import fixed_responses, hf_log_softmax, step_context

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

T = 0.9  # rollout temperature; the teacher is untempered
DECAY = 0.6  # far from 0 and 1: the average differs clearly from the initial and the current weights
U32 = 2.0**-24
# fp32 trainer vs fp64 transformers: log-probs agree to ~1e-6 on this 2-layer model, KLs are O(0.1).
KL_TOL = dict(rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _export(chunks, hf_dir, out: Path) -> str:
    """The chunks' weights as a Hugging Face directory (``hf_dir``'s config and tokenizer)."""
    from safetensors.torch import save_file

    from checkpoints_convert.model_io import iter_hf_tensors

    tensors = {name: t.clone().contiguous() for name, t in iter_hf_tensors(chunks, hf_dir)}
    shutil.copytree(hf_dir, out)
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def _policy(hf_dir, tp: int = 1):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import build_policy

    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=tp, pp=1, cp=1, seed=3)
    optim = OptimizerConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0)
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=8, vocab_size=301, chunk_size=16
    )
    return policy, layout


def _guarded_context(policy, layout, hf_dir, teacher: str, place: str):
    """``teacher=ema``: the average kept at ``place``; ``initial``: the reference weights, swapped in
    (``place="cpu_swap"``) or a resident model (``"separate_model"``)."""
    from sdpg_mcore import algo
    from sdpg_mcore.train.ema_weights import EMAWeights
    from sdpg_mcore.train.model_setup import ReferenceWeights

    cfg = algo.SDPGConfig(beta=0.05, alpha=1e-2, teacher=teacher, teacher_ema_decay=DECAY)
    ema = EMAWeights(policy, DECAY, place) if teacher == "ema" else None
    ctx = step_context(policy, hf_dir, layout, cfg, temperature=T, total_steps=10, ema=ema)
    if place == "separate_model":
        ctx.reference = ReferenceWeights(policy, place, hf_dir, layout, torch.float32)
    return ctx


def _guarded_run(rank, world_size, hf_dir, teacher, place, out_dir):
    """Two steps of two mini-batches, then a third of one mini-batch; the weights after every optimizer
    step, the average, and the student's and teacher's weights before step 3 as HF directories."""
    from sdpg_mcore.models.builder import unwrap_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.step import run_step

    policy, layout = _policy(hf_dir)
    params = list(unwrap_model(policy.chunks[0]).parameters())
    weights, optimizer_step = [_flat(params)], policy.optimizer_step

    def recording_step():
        out = optimizer_step()
        weights.append(_flat(params))
        return out

    policy.optimizer_step = recording_step
    ctx = _guarded_context(policy, layout, hf_dir, teacher, place)
    responses = fixed_responses()
    steps = [run_step(ctx, s, responses) for s in (1, 2)]
    out = Path(out_dir)
    student = _export(policy.chunks, hf_dir, out / "student")
    teacher_dir, emas = hf_dir, []
    if ctx.ema is not None:
        emas.append(ctx.ema.state_dict())
        with ctx.ema.chunks() as chunks:
            teacher_dir = _export(chunks, hf_dir, out / "teacher")
    ctx.mini_batch_groups = 4  # step 3: one mini-batch, its student the weights after step 2
    steps.append(run_step(ctx, 3, responses))
    if ctx.ema is not None:
        emas.append(ctx.ema.state_dict())
    state.destroy()
    metrics = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in steps]
    return metrics, weights, emas, student, teacher_dir


def _hf_kl_mean(student_dir, teacher_dir) -> float:
    """Token-mean of KL(student at T on the student prompt || teacher untempered on the teacher prompt), fp64."""
    responses = fixed_responses()
    student = hf_log_softmax(student_dir, responses, teacher=False, temperature=T)
    teacher = hf_log_softmax(teacher_dir, responses, teacher=True, temperature=1.0)
    kl = torch.cat([(s.exp() * (s - t)).sum(-1) for s, t in zip(student, teacher)])
    return kl.clamp(max=20.0).mean().item()


@pytest.mark.parametrize("reference_weights", ["cpu_swap", "separate_model"])
def test_initial_teacher_is_the_step0_model_after_two_steps(hf_dir, tmp_path, reference_weights):
    metrics, weights, _, student, teacher = spawn_ranks(
        _guarded_run, 1, args=(hf_dir, "initial", reference_weights, str(tmp_path))
    )[0]
    assert len(weights) == 1 + 4 + 1 and metrics[2]["num_updates"] == 1
    assert (weights[4] - weights[0]).abs().max() > 1e-2  # the policy moved away from the teacher
    assert teacher == hf_dir
    want = _hf_kl_mean(student, hf_dir)
    assert metrics[2]["kl_mean"] == pytest.approx(want, **KL_TOL)
    self_teacher = _hf_kl_mean(student, student)  # what teacher=policy would have distilled toward
    assert abs(self_teacher - want) > 1e3 * KL_TOL["rel"] * want


def _ema_recursion(weights: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The average of ``weights[1:]`` from ``weights[0]`` in fp64, and the fp32 rounding bound of the
    trainer's: each update ``e + w (x - e)`` rounds three times (difference, product, sum), at most
    ``3 u max|.|`` each time, and earlier errors only shrink (by ``1 - w``): ``3 k u max|.|`` after k."""
    ema = weights[0].double()
    for w in weights[1:]:
        ema = DECAY * ema + (1 - DECAY) * w.double()
    scale = max(w.abs().max().item() for w in weights)
    return ema, 3 * (len(weights) - 1) * U32 * scale


@pytest.fixture(scope="module")
def ema_host_run(hf_dir, tmp_path_factory):
    return spawn_ranks(_guarded_run, 1, args=(hf_dir, "ema", "host", str(tmp_path_factory.mktemp("ema"))))[0]


def test_ema_teacher_follows_the_update_rule_and_drives_the_kl(hf_dir, ema_host_run):
    metrics, weights, emas, student, teacher = ema_host_run
    assert [e["updates"] for e in emas] == [4, 5] and emas[0]["decay"] == DECAY
    for k, state in ((4, emas[0]), (5, emas[1])):  # before and after step 3's optimizer step
        want, bound = _ema_recursion(weights[: k + 1])
        got = state["ema"].double()
        assert (got - want).abs().max().item() <= bound, k
        assert (got - weights[0]).abs().max() > 1e3 * bound and (got - weights[k]).abs().max() > 1e3 * bound
    # Step 3's teacher pass ran the average of four updates, exported (exactly, fp32) as `teacher`.
    kl = metrics[2]["kl_mean"]
    assert kl == pytest.approx(_hf_kl_mean(student, teacher), **KL_TOL)
    assert abs(_hf_kl_mean(student, hf_dir) - kl) > 1e3 * KL_TOL["rel"] * kl  # not the initial teacher


def test_ema_on_the_host_and_on_the_device_give_the_same_step(hf_dir, ema_host_run, tmp_path):
    host = ema_host_run
    device = spawn_ranks(_guarded_run, 1, args=(hf_dir, "ema", "device", str(tmp_path)))[0]
    assert host[0] == device[0]
    assert all(torch.equal(a, b) for a, b in zip(host[1], device[1]))
    assert all(torch.equal(a["ema"], b["ema"]) for a, b in zip(host[2], device[2]))


def _checkpoint_run(rank, world_size, hf_dir, root):
    """TP2: a step, a checkpoint, another step; then a fresh policy and average restored from the
    checkpoint take the same second step. Returns what must match, and the refusal of a checkpoint
    that holds no average."""
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train import checkpoint as ckpt
    from sdpg_mcore.train.step import run_step

    policy, layout = _policy(hf_dir, tp=2)
    ctx = _guarded_context(policy, layout, hf_dir, "ema", "host")
    responses = fixed_responses()
    run_step(ctx, 1, responses)
    ckpt.save_checkpoint(
        root, 1, policy.chunks, policy.optimizer, policy.scheduler, hf_dir=hf_dir, teacher_ema=ctx.ema
    )
    saved = ctx.ema.state_dict()
    second = run_step(ctx, 2, responses)
    after = ctx.ema.state_dict()["ema"]
    ckpt.save_checkpoint(
        Path(root) / "plain", 2, policy.chunks, policy.optimizer, policy.scheduler, hf_dir=hf_dir
    )

    fresh = _rebuilt_policy(hf_dir, layout)
    ctx2 = _guarded_context(fresh, layout, hf_dir, "ema", "host")
    before_load = ctx2.ema.state_dict()["ema"]
    ckpt.load_checkpoint(
        root, fresh.chunks, fresh.optimizer, fresh.scheduler, hf_dir=hf_dir, teacher_ema=ctx2.ema
    )
    loaded = ctx2.ema.state_dict()
    resumed = run_step(ctx2, 2, responses)
    refused = None
    try:
        ckpt.load_checkpoint(
            Path(root) / "plain", fresh.chunks, fresh.optimizer, fresh.scheduler, teacher_ema=ctx2.ema
        )
    except ckpt.CheckpointError as err:
        refused = str(err)
    state.destroy()
    drop = ("time/",)
    return dict(
        saved=saved, loaded=loaded, before_load=before_load, after=after,
        after_resumed=ctx2.ema.state_dict()["ema"],
        second={k: v for k, v in second.items() if not k.startswith(drop)},
        resumed={k: v for k, v in resumed.items() if not k.startswith(drop)},
        refused=refused,
    )  # fmt: skip


def _rebuilt_policy(hf_dir, layout):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.train.model_setup import build_policy

    optim = OptimizerConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0)
    return build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=8, vocab_size=301, chunk_size=16
    )


def test_ema_checkpoint_restores_the_average_bit_for_bit_and_resumes_exactly(hf_dir, tmp_path):
    root = tmp_path / "ckpt"
    results = spawn_ranks(_checkpoint_run, 2, args=(hf_dir, str(root)), timeout_s=300)
    shards = sorted(p.name for p in (root / "step_00000001" / "teacher_ema").iterdir())
    assert shards == ["pp000_tp000.pt", "pp000_tp001.pt"]  # one file per TP shard
    for r in results:
        assert torch.equal(r["loaded"]["ema"], r["saved"]["ema"]) and r["loaded"]["updates"] == 2
        assert not torch.equal(r["before_load"], r["saved"]["ema"])  # the load really replaced it
        assert r["resumed"] == r["second"]
        assert torch.equal(r["after_resumed"], r["after"])
        assert r["refused"] is not None and "algorithm.teacher" in r["refused"]
    assert not torch.equal(results[0]["saved"]["ema"], results[1]["saved"]["ema"])  # two different shards
