"""One real training step (``train.step.run_step``: old/ref log-probs, teacher pass, fused KL head, sdpg
loss, two Megatron optimizer steps) at TP2, PP2, DP2 and TP2xPP2 on gloo ranks equals TP1 (fp32):
metrics and every weight's update within the fp32 reordering bound of ``parity_bounds``; so do the
guarded teachers (``algorithm.teacher=ema | initial``) at TP2 and PP2, the EMA's average included."""

import pytest
import torch
from parity_bounds import assert_metric_close, assert_update_close, initial_weights, parity_adam
from steplib import fixed_responses, step_context

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

COMPARED = ("loss", "pg_loss", "kl_mean", "entropy", "regulariser", "grad_norm", "logprob_mismatch")


def _one_step(rank, world_size, hf_dir, tp, pp, teacher="policy", overlap=False):
    """One step; its metrics and weights (and, under ``teacher=ema``, the average's weights as ``ema.*``).
    ``overlap``: the distributed optimizer's weight all-gather overlaps the next forward."""
    import torch.distributed as dist

    from checkpoints_convert.model_io import iter_hf_tensors
    from sdpg_mcore import algo
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.ema_weights import EMAWeights
    from sdpg_mcore.train.model_setup import build_policy
    from sdpg_mcore.train.step import run_step

    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=tp, pp=pp, cp=1, seed=3)
    optim = parity_adam()
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=2, vocab_size=301, chunk_size=16,
        overlap_param_gather=overlap,
    )  # fmt: skip
    # decay 0.5: the second mini-batch's teacher is half way between the initial and the updated weights
    cfg = algo.SDPGConfig(beta=0.05, alpha=1e-2, teacher=teacher, teacher_ema_decay=0.5)
    ema = EMAWeights(policy, 0.5, "host") if teacher == "ema" else None
    ctx = step_context(policy, hf_dir, layout, cfg, ema=ema)
    metrics = run_step(ctx, 1, fixed_responses())
    policy.finish_param_sync()
    weights = {name: t.clone() for name, t in iter_hf_tensors(policy.chunks, hf_dir)}
    if ema is not None:
        with ema.chunks() as chunks:
            weights.update({f"ema.{name}": t.clone() for name, t in iter_hf_tensors(chunks, hf_dir)})
    keep = layout.tp_rank == 0 and layout.dp_rank == 0
    dist.barrier()
    state.destroy()
    return {k: metrics.get(k) for k in COMPARED}, weights if keep else {}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


@pytest.fixture(scope="module")
def reference(hf_dir):
    return spawn_ranks(_one_step, 1, args=(hf_dir, 1, 1))[0]


@pytest.mark.parametrize(
    "tp, pp, world",
    [
        (2, 1, 2),
        (1, 2, 2),
        (1, 1, 2),
        (2, 2, 4),
    ],  # 4 ranks: ~35 s
    ids=["tp2", "pp2", "dp2", "tp2pp2"],
)
def test_step_matches_tp1(hf_dir, reference, tp, pp, world):
    _assert_matches(hf_dir, reference, spawn_ranks(_one_step, world, args=(hf_dir, tp, pp)))


def _assert_matches(hf_dir, reference, results) -> None:
    ref_metrics, ref_weights = reference
    weights = {}
    for _, w in results:
        weights.update(w)
    assert set(weights) == set(ref_weights)
    metrics = results[0][0]
    for key in COMPARED:
        assert_metric_close(key, metrics[key], ref_metrics[key])
    initial = initial_weights(hf_dir)
    for name, ref in ref_weights.items():
        assert_update_close(name, weights[name], ref, initial[name.removeprefix("ema.")])


@pytest.fixture(scope="module")
def guarded_references() -> dict:
    """TP1 steps by ``algorithm.teacher``, made on first use."""
    return {}


@pytest.mark.parametrize(
    "teacher, tp, pp",
    [
        pytest.param("initial", 2, 1, id="tp2-initial"),
        pytest.param("ema", 1, 2, id="pp2-ema"),
        pytest.param("ema", 2, 1, id="tp2-ema", marks=pytest.mark.slow),
        pytest.param("initial", 1, 2, id="pp2-initial", marks=pytest.mark.slow),
    ],
)
def test_guarded_teacher_step_matches_tp1(hf_dir, guarded_references, teacher, tp, pp):
    """The teacher pass on swapped-in weights, the teacher's own output layer in the fused head and
    (ema) the average's update shard by shard: TP2 and PP2 give TP1's step and TP1's average."""
    if teacher not in guarded_references:
        guarded_references[teacher] = spawn_ranks(_one_step, 1, args=(hf_dir, 1, 1, teacher))[0]
    reference = guarded_references[teacher]
    assert any(name.startswith("ema.") for name in reference[1]) == (teacher == "ema")
    _assert_matches(hf_dir, reference, spawn_ranks(_one_step, 2, args=(hf_dir, tp, pp, teacher)))


def _reference_modes(rank, world_size, hf_dir):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.models import unwrap_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.batch import build_micro_batches
    from sdpg_mcore.train.forward import logprob_pass
    from sdpg_mcore.train.model_setup import ReferenceWeights, build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    optim = OptimizerConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0)
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=2, vocab_size=301, chunk_size=16
    )
    swap = ReferenceWeights(policy, "cpu_swap", hf_dir, layout, torch.float32)
    separate = ReferenceWeights(policy, "separate_model", hf_dir, layout, torch.float32)
    mbs = build_micro_batches(fixed_responses(), list(range(8)), 64, 0, with_teacher=False)
    initial = logprob_pass(policy.chunks, mbs, policy.head, temperature=1.0)
    with torch.no_grad():  # move the live policy away from the reference
        for p in unwrap_model(policy.chunks[0]).parameters():
            p.add_(0.01 * torch.randn_like(p))
    live = [p.clone() for p in unwrap_model(policy.chunks[0]).parameters()]
    moved = logprob_pass(policy.chunks, mbs, policy.head, temperature=1.0)
    with swap.chunks() as chunks:
        by_swap = logprob_pass(chunks, mbs, policy.head, temperature=1.0)
    with separate.chunks() as chunks:
        by_model = logprob_pass(chunks, mbs, policy.head, temperature=1.0)
    restored = all(torch.equal(a, b) for a, b in zip(live, unwrap_model(policy.chunks[0]).parameters()))
    state.destroy()
    return [torch.cat(x) for x in (initial, moved, by_swap, by_model)], restored


def test_reference_weights_cpu_swap_and_separate_model_agree(hf_dir):
    (initial, moved, by_swap, by_model), restored = spawn_ranks(_reference_modes, 1, args=(hf_dir,))[0]
    assert restored  # the swap puts the live weights back bit for bit
    assert not torch.allclose(moved, initial)
    torch.testing.assert_close(by_swap, initial, rtol=0, atol=0)
    torch.testing.assert_close(by_model, initial, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("teacher", ["ema", pytest.param("initial", marks=pytest.mark.slow)])
def test_guarded_teacher_waits_for_the_overlapped_weight_gather(hf_dir, teacher):
    """DP2 with the distributed optimizer's weight all-gather overlapped with the next forward: after
    an optimizer step each rank holds only its own shard of the new weights until that gather ends.
    The teacher pass swaps weights outside a forward and the EMA reads them, so the step completes
    the gather first: the same step, bit for bit, as with the gather done inside the optimizer step."""
    plain = spawn_ranks(_one_step, 2, args=(hf_dir, 1, 1, teacher, False))
    overlapped = spawn_ranks(_one_step, 2, args=(hf_dir, 1, 1, teacher, True))
    assert plain[0][0] == overlapped[0][0]
    weights, reference = overlapped[0][1], plain[0][1]
    assert set(weights) == set(reference) and any(n.startswith("ema.") for n in weights) == (teacher == "ema")
    for name, want in reference.items():
        assert torch.equal(weights[name], want), name
