"""train/colocate.py on real gloo ranks and a real dev server: the trainer's memory is freed and comes
back bit for bit, and the turns with the engines happen in the order that keeps the two apart."""

import pytest
import torch

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen3 with a tokenizer (the dev server loads it too)."""
    from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer

    path = save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    save_tiny_tokenizer(path, style="qwen")
    return str(path)


def _policy(hf_dir, layout, dtype, distributed_optimizer):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.train.model_setup import build_policy

    optim = OptimizerConfig(lr=1e-2, lr_warmup_steps=0, use_distributed_optimizer=distributed_optimizer)
    return build_policy(
        hf_dir, layout, dtype=dtype, optim=optim, total_updates=4, vocab_size=301, chunk_size=16
    )


def _step(policy, hf_dir, layout, step):
    from steplib import fixed_responses, step_context

    from sdpg_mcore.algo import SDPGConfig
    from sdpg_mcore.train.step import run_step

    ctx = step_context(policy, hf_dir, layout, SDPGConfig())
    return run_step(ctx, step, fixed_responses())


def _state(offload):
    """Every trainer tensor's bytes by group (fresh copies)."""
    from sdpg_mcore.train.colocate import trainer_tensors

    tensors = trainer_tensors(offload.chunks, offload.optimizer)
    return {g: [t.detach().clone() for t in ts if t is not None] for g, ts in tensors.items()}


def _offload_rank(rank, world_size, hf_dir, dtype_name, distributed_optimizer):
    from sdpg_mcore.models import unwrap_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.colocate import TrainerOffload, trainer_tensors
    from sdpg_mcore.train.ema_weights import EMAWeights

    dtype = getattr(torch, dtype_name)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    moved, kept = (_policy(hf_dir, layout, dtype, distributed_optimizer) for _ in range(2))
    for policy in (moved, kept):
        _step(policy, hf_dir, layout, 1)
    ema = EMAWeights(moved, 0.9, "device")  # an EMA teacher's average goes with the optimizer states
    (average,) = ema.device_buffers()
    ema_before = average.clone()
    offload = TrainerOffload(moved.chunks, moved.optimizer, moved.device, extra_states=ema.device_buffers())
    before = _state(offload)
    out = {"grads_nonzero_before": any(bool(g.abs().sum() > 0) for g in before["grads"])}
    out["partial_freed"] = offload.offload(["grads", "optimizer"])
    out["ema_freed"] = average.untyped_storage().nbytes() == 0
    params = [p for c in moved.chunks for p in unwrap_model(c).parameters()]
    out["params_resident"] = all(p.untyped_storage().nbytes() > 0 for p in params)
    out["freed"] = out["partial_freed"] + offload.offload(["params"])
    groups = trainer_tensors(moved.chunks, moved.optimizer)
    out["empty"] = {
        g: all(t.untyped_storage().nbytes() == 0 for t in ts if t is not None) for g, ts in groups.items()
    }
    out["restored"] = offload.reload()
    after = _state(offload)
    out["params_exact"] = all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    out["optimizer_exact"] = all(torch.equal(a, b) for a, b in zip(before["optimizer"], after["optimizer"]))
    out["optimizer_tensors"] = len(before["optimizer"])
    out["ema_exact"] = torch.equal(average, ema_before)
    out["grads_zero"] = all(bool((g == 0).all()) for g in after["grads"])
    second = [_step(policy, hf_dir, layout, 2) for policy in (moved, kept)]
    out["same_metrics"] = {k: (second[0][k], second[1][k]) for k in ("loss", "grad_norm", "kl_mean")}
    out["same_weights"] = all(
        torch.equal(a, b)
        for a, b in zip(
            (p for c in moved.chunks for p in unwrap_model(c).parameters()),
            (p for c in kept.chunks for p in unwrap_model(c).parameters()),
        )
    )
    state.destroy()
    return out


@pytest.mark.parametrize(
    "dtype,distributed_optimizer",
    [("bfloat16", True), ("float32", False)],
    ids=["bf16-distributed-optimizer", "fp32-plain-optimizer"],
)
def test_offload_frees_every_storage_and_restores_it_bit_for_bit(hf_dir, dtype, distributed_optimizer):
    """Two data-parallel ranks, two identical policies each: one is offloaded and reloaded between
    steps 1 and 2, the other not; step 2 then gives the same loss and the same weights, bit for bit."""
    for out in spawn_ranks(_offload_rank, 2, args=(hf_dir, dtype, distributed_optimizer)):
        assert out["grads_nonzero_before"]  # the step left gradients: zeroing them is a real change
        assert out["params_resident"]  # grads + optimizer only: the push still reads the weights
        assert out["partial_freed"] > 0 and out["freed"] == out["restored"] > out["partial_freed"]
        assert out["empty"] == {"params": True, "grads": True, "optimizer": True}
        assert out["optimizer_tensors"] > 0  # Adam's moments existed after step 1
        assert out["params_exact"] and out["optimizer_exact"] and out["grads_zero"]
        assert out["ema_freed"] and out["ema_exact"]
        for name, (moved, kept) in out["same_metrics"].items():
            assert moved == kept, name
        assert out["same_weights"]


def _order_rank(rank, world_size, hf_dir, url, key):
    from sdpg_mcore.parallel import state
    from sdpg_mcore.rollout.http import http_json
    from sdpg_mcore.rollout.servers import MemoryOccupation
    from sdpg_mcore.train.colocate import Colocation, TrainerOffload, release_before_start

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    policy = _policy(hf_dir, layout, torch.bfloat16, True)  # fp32 main weights of their own
    _step(policy, hf_dir, layout, 1)
    offload = TrainerOffload(policy.chunks, policy.optimizer, policy.device)
    engines = MemoryOccupation([url], api_key=key) if rank == 0 else None
    colocation = Colocation(offload, engines)

    def server_released():
        return http_json(f"{url}/server_info", api_key=key)[1]["released_tags"]

    def resident():
        return {group: nbytes > 0 for group, nbytes in offload.resident_bytes().items()}

    seen = {}
    release_before_start(engines)  # external engines, started first, release before the trainer's turn
    seen["after_release_before_start"] = (server_released(), resident())

    def push():  # what the weight push sees: the engines' weights back, the trainer's weights still there
        seen["during_push"] = (server_released(), resident())

    colocation.sync(push)
    seen["after_sync"] = (server_released(), resident(), colocation.state)
    colocation.to_training()
    seen["after_to_training"] = (server_released(), resident(), colocation.state)
    colocation.before_generation(push)  # after a checkpoint: generating again, with a push
    seen["events"] = list(colocation.events)
    state.destroy()
    return seen


def test_turns_with_a_real_dev_server_never_overlap(hf_dir, tmp_path):
    """The order of release/resume against the dev server, as seen from both sides on two ranks."""
    from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig

    config = ServerConfig(
        model_path=hf_dir,
        log_dir=str(tmp_path / "logs"),
        router=False,
        env={"OMP_NUM_THREADS": "1"},
        extra_args=["--num-threads", "1"],
    )
    with RolloutServers(config) as servers:
        results = spawn_ranks(_order_rank, 2, args=(hf_dir, servers.worker_urls[0], servers.api_key))
    everything = ["cuda_graph", "kv_cache", "weights"]
    for seen in results:
        assert seen["after_release_before_start"] == (
            everything,
            {"params": True, "grads": True, "optimizer": True},
        )
        assert seen["during_push"] == (
            ["cuda_graph", "kv_cache"],
            {"params": True, "grads": False, "optimizer": False},
        )
        assert seen["after_sync"] == ([], {"params": False, "grads": False, "optimizer": False}, "generating")
        assert seen["after_to_training"] == (
            everything,
            {"params": True, "grads": True, "optimizer": True},
            "training",
        )
        assert seen["events"] == [
            "trainer_offload:grads,optimizer",
            "engines_resume:weights",
            "pushed",
            "trainer_offload:params",
            "engines_resume:all",
            "engines_release:all",
            "trainer_reload",
            "trainer_offload:grads,optimizer",
            "engines_resume:weights",
            "pushed",
            "trainer_offload:params",
            "engines_resume:all",
        ]
