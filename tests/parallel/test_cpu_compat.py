"""The CPU compatibility layer lets Megatron-Core train and checkpoint on gloo ranks.

One 4-rank run (TP2 x PP2) exercises every patch: model init under the RNG tracker, the 1F1B
schedule, Megatron DDP with the distributed optimizer (CUDA type checks, CUDA scalars),
activation recompute (RNG state save/restore) and dist_checkpointing save/load (synchronize).
"""

import os

import pytest
import torch
import torch.distributed as dist

from sdpg_mcore.parallel import cpu_compat, state
from sdpg_mcore.parallel.spawn import spawn_ranks

SEQ, BATCH, VOCAB = 16, 2, 128


def _apply_twice(rank, world_size):
    first = cpu_compat.apply_cpu_compat()
    patched = torch.cuda.current_device
    second = cpu_compat.apply_cpu_compat()
    torch.cuda.synchronize()
    return dict(
        applied=(first, second),
        same_patch=torch.cuda.current_device is patched,
        device=torch.zeros(2, device="cuda").device.type,
        moved=torch.ones(1).cuda().device.type,
        pinned=torch.tensor([1], device="cpu", pin_memory=True).cuda(non_blocking=True).device.type,
        type_name=torch.ones(1).type(),
        half_type_name=torch.ones(1, dtype=torch.bfloat16).type(),
        explicit_type=torch.ones(1).type(torch.float64).dtype,
    )


def test_apply_is_idempotent_and_maps_cuda_allocations():
    # in a fresh process: the patches are process-wide and must not leak into pytest's own
    (out,) = spawn_ranks(_apply_twice, 1)
    assert out["applied"] == (True, True) and out["same_patch"]
    assert out["device"] == "cpu" and out["moved"] == "cpu" and out["pinned"] == "cpu"
    assert out["type_name"] == "torch.cuda.FloatTensor"
    assert out["half_type_name"] == "torch.cuda.BFloat16Tensor"
    assert out["explicit_type"] == torch.float64


def _build(recompute: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.1, attention_dropout=0.1,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=torch.float32, pipeline_dtype=torch.float32, **(extra if recompute else {}),
    )  # fmt: skip
    return config, GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )  # fmt: skip


def _train_step(model, config, recompute_seed: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)

    def forward_step(data_iterator, model):
        loss_BS = model(tokens, position_ids, mask, labels=tokens)
        return loss_BS, lambda loss_BS: (loss_BS.mean(), {"loss": loss_BS.mean().detach()})

    torch.manual_seed(recompute_seed)  # dropout masks: identical in both runs, replayed by recompute
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=None, model=[model], num_microbatches=2,
        seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )  # fmt: skip


def _train_and_checkpoint(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    out = {}
    grads = {}
    from megatron.core import tensor_parallel

    def reseed():  # same init for every model below (cheaper than re-creating the groups)
        torch.manual_seed(11)
        tensor_parallel.model_parallel_cuda_manual_seed(11, force_reset_rng=True)

    state.initialize_model_parallel(tp=2, pp=2, seed=11)
    for recompute in (False, True):
        reseed()
        config, model = _build(recompute)
        losses = _train_step(model, config, recompute_seed=5)
        out[f"loss_{recompute}"] = [float(x["loss"]) for x in losses]
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["recompute_max_grad_diff"] = max(
        (grads[True][n] - g).abs().max().item() for n, g in grads[False].items()
    )

    reseed()
    config, model = _build(False)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
    )
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    _train_step(ddp, config, recompute_seed=5)
    ok, grad_norm, _ = optimizer.step()
    out["step_ok"], out["grad_norm"] = ok, grad_norm
    out["moved"] = all(not torch.equal(before[n], p) for n, p in model.named_parameters())

    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    out["restored"] = all(torch.equal(trained[n], p) for n, p in model.named_parameters())
    dist.barrier()
    state.destroy()
    return out


@pytest.mark.slow  # TP2 x PP2 steps are in the default suite (test_step_parity's tp2pp2, test_checkpoint)
def test_tp2_pp2_train_step_recompute_and_checkpoint(tmp_path):
    results = spawn_ranks(_train_and_checkpoint, 4, args=(str(tmp_path / "ckpt"),))
    last_stage = results[2]
    assert len(last_stage["loss_False"]) == 2 and all(0 < x < 10 for x in last_stage["loss_False"])
    assert last_stage["loss_False"] == last_stage["loss_True"]
    for out in results:
        assert out["recompute_max_grad_diff"] < 1e-6
        assert out["step_ok"] and 0 < out["grad_norm"] < 1e3
        assert out["grad_norm"] == results[0]["grad_norm"]
        assert out["moved"] and out["restored"]
