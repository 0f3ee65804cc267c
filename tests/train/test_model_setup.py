"""train/model_setup.py on one gloo rank: the optimizer section reaches Megatron, and the reference weights."""

import pytest
import torch

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

OPTIM = dict(
    lr=1e-2,
    min_lr=1e-4,
    lr_warmup_steps=2,
    lr_decay_style="linear",
    weight_decay=0.05,
    adam_beta1=0.8,
    adam_beta2=0.95,
    adam_eps=1e-6,
    clip_grad=0.5,
    use_distributed_optimizer=False,
)
UPDATES = 6


def _policy(hf_dir, **optim):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    policy = build_policy(
        hf_dir,
        layout,
        dtype=torch.float32,
        optim=OptimizerConfig(**optim),
        total_updates=UPDATES,
        vocab_size=301,
        chunk_size=16,
    )
    return layout, policy


def _optimizer(rank, world_size, hf_dir):
    from sdpg_mcore.parallel import state

    _, policy = _policy(hf_dir, **OPTIM)
    config = policy.optimizer.config
    seen = {k: getattr(config, k) for k in OPTIM if hasattr(config, k)}
    lrs = []
    for _ in range(UPDATES):
        policy.zero_grad()
        lrs.append(policy.optimizer_step()[1])
    state.destroy()
    return seen, lrs


def _reference(rank, world_size, hf_dir, mode):
    from sdpg_mcore.models import unwrap_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import ReferenceWeights

    layout, policy = _policy(hf_dir)
    params = [p for chunk in policy.chunks for p in unwrap_model(chunk).parameters()]
    initial = [p.detach().clone() for p in params]
    reference = ReferenceWeights(policy, mode, hf_dir, layout, torch.float32)
    with torch.no_grad():  # stands for training
        for p in params:
            p.add_(1.0)
    with reference.chunks() as chunks:
        inside = [p.detach().clone() for c in chunks for p in unwrap_model(c).parameters()]
    after = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="trainer.reference_weights='gpu'.*cpu_swap or separate_model"):
        ReferenceWeights(policy, "gpu", hf_dir, layout, torch.float32)
    state.destroy()
    return (
        all(torch.equal(a, b) for a, b in zip(inside, initial)),
        all(torch.equal(a, b + 1.0) for a, b in zip(after, initial)),
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


def _megatron_lr(n: int) -> float:
    """The documented schedule: linear warm-up from 0 over W updates, then linear decay to min_lr at the end."""
    lr, min_lr, warmup = OPTIM["lr"], OPTIM["min_lr"], OPTIM["lr_warmup_steps"]
    if n <= warmup:
        return lr * n / warmup
    return min_lr + (1 - (n - warmup) / (UPDATES - warmup)) * (lr - min_lr)


def test_every_optimizer_setting_reaches_megatron(hf_dir):
    seen, lrs = spawn_ranks(_optimizer, 1, args=(hf_dir,))[0]
    assert seen == {k: v for k, v in OPTIM.items() if k in seen}
    assert set(seen) >= {"lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"}
    assert lrs == pytest.approx([_megatron_lr(n) for n in range(UPDATES)], rel=1e-12)


@pytest.mark.parametrize("mode", ["cpu_swap", "separate_model"])
def test_reference_weights_are_the_initial_policy_and_leave_the_live_weights(hf_dir, mode):
    initial_inside, live_kept = spawn_ranks(_reference, 1, args=(hf_dir, mode))[0]
    assert initial_inside and live_kept
