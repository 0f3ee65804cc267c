"""Stage ``sdpg_step``: two full SDPG steps of a Qwen3-shaped random model at bf16 on the GPU, held to
fixed limits (``step_checks``), then the colocated turn on the trained state and one more step after it.

Old/ref log-probs, teacher pass, fused head, loss, backward and optimizer, under the trainer's own
process-group setup (``initialize_distributed``: NCCL with ``set_device`` on a GPU, gloo on CPU) with
world size 1, the 70B recipe's communication settings, and the reference weights swapped through
pinned memory. The last token of every response lies past the tokenizer (``len(tokenizer) < config.vocab_size``, as
Qwen's), so the head must normalise over every row of the config's vocabulary. Its rollout
log-probs are ``transformers``' in fp64 on the same bf16 weights: step 1's ``logprob_mismatch`` is
the trainer's distance from an independent implementation (``step_checks.judge_logprobs``). Then
``train/colocate.py`` offloads the trained state and brings it back (``judge_offload``), and the
step's peak is held against ``sdpg_mcore.plan`` (``judge_peak``).

Every phase of the step is logged as it starts and ends (the trainer's own phase names: ``old``,
``ref``, ``teacher``, ``update``), and the first step's ``torch.compile`` time is reported (Megatron's
fused kernels compile on first use under the Transformer-Engine spec): a stall names its phase.
:func:`run_shape` is shared with the ``llama70b_layer`` stage.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sdpg_mcore.audit.gpu_check import common, step_checks

QWEN3_WIDTH = dict(
    hidden_size=2560, num_hidden_layers=2, vocab_size=151936, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, intermediate_size=9728, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip
"""Qwen3-4B's attention and vocabulary (GQA 32/8 heads of 128, qk-norm, tied 151,936 rows), 2 layers."""
CPU_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=192, max_position_embeddings=4096, tie_word_embeddings=True,
    initializer_range=0.125,
)  # fmt: skip
"""The same plumbing on CPU; weights drawn 0.125 wide so that logits spread as at the GPU width
(0.02 x sqrt(2560) ~ 0.125 x sqrt(64) = 1): log-prob checks then see position and weight errors."""


def step_responses(vocab: int, lengths: tuple[int, int, int]) -> list:
    """4 groups of 4 synthetic responses (``sdpg_mcore.audit.synthetic``) of prompt, context and
    response ``lengths``: prompts below a tokenizer 300 ids shorter than ``vocab``, each response's last
    id the config's last row (the head must normalise over every row of the config)."""
    from sdpg_mcore.audit.synthetic import synthetic_responses

    prompt_len, context_len, response_len = lengths
    batch = synthetic_responses(
        4, 4, vocab_size=vocab, prompt_vocab_size=vocab - 300, prompt_len=prompt_len,
        context_len=context_len, response_len=response_len,
    )  # fmt: skip
    for response in batch:
        response.response_ids[-1] = vocab - 1
    return batch


def reference_logprobs(model_dir: str, responses: list, device: str) -> list[list[float]]:
    """Each response token's log-prob under ``transformers`` in fp64 (the checkpoint's bf16 values,
    exactly), given its student prompt: the independent reference of the trainer's old log-probs."""
    import torch
    from transformers import AutoModelForCausalLM

    # bf16 on the host (the checkpoint's values), fp64 on the device: no fp64 copy in host memory.
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    model = model.to(device).double().eval()
    out = []
    with torch.no_grad():
        for r in responses:
            ids = torch.tensor([r.prompt_ids + r.response_ids], device=device)
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1]
            targets = torch.tensor(r.response_ids, device=device)[:, None]
            out.append(torch.log_softmax(logits, -1).gather(1, targets)[:, 0].tolist())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def logged_phases() -> None:
    """Log every phase of the trainer's step as it starts and ends (``PhaseTimer.phase``)."""
    import contextlib

    from sdpg_mcore.train.metrics_log import PhaseTimer

    inner = PhaseTimer.phase

    @contextlib.contextmanager
    def phase(self, name: str):
        with common.phase(f"step phase {name}"), inner(self, name):
            yield

    PhaseTimer.phase = phase


def _policy_and_context(model_dir: str, cpu: bool, use_te: bool, token_budget: int):
    """The process group, the policy (the 70B recipe's communication settings, the trainer's default
    chunk) and the trainer's SDPG step context with the reference weights in pinned host memory."""
    import torch

    from sdpg_mcore import algo
    from sdpg_mcore.audit.synthetic import synthetic_step_context
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.train.model_setup import build_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    with common.phase("process group"):  # a collective stalled past 60 s raises instead of hanging
        env = state.initialize_distributed(timeout_minutes=1)
        layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    common.progress(f"process group up ({common.dist_backend()}, world {env.world_size})")
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.1, use_distributed_optimizer=True)
    with common.phase("build policy"):
        policy = build_policy(
            model_dir, layout, dtype=torch.bfloat16, optim=optim, total_updates=10, chunk_size=1024,
            overlap_grad_reduce=True, overlap_param_gather=True, gradient_accumulation_fusion=True,
            use_te=use_te,
        )  # fmt: skip
    with common.phase("reference weights to pinned host memory"):
        ctx = synthetic_step_context(  # the trainer's rule: SDPG reads the frozen reference (cpu_swap)
            policy, layout, algo.SDPGConfig(), reference_dir=model_dir, token_budget=token_budget,
            mini_batch_groups=2, total_steps=10,
        )  # fmt: skip
        common.sync(cpu)
    return policy, ctx


def _one_step(policy, ctx, step: int, batch: list, cpu: bool) -> dict:
    import torch

    from sdpg_mcore.train.step import run_step

    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    with common.phase(f"step {step}"):
        metrics = run_step(ctx, step, batch)
        policy.finish_param_sync()  # as the trainer's weight-sync phase does
        common.sync(cpu)
    keep = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    keep["wall_s"] = time.perf_counter() - began
    if not cpu:
        keep["peak_bytes"] = torch.cuda.max_memory_allocated()
    return keep


def _colocated_turn(policy, cpu: bool) -> dict:
    """``train/colocate.py``'s offload of the trained state and its reload: bytes moved, what the
    allocator saw freed, and whether every tensor came back bit for bit."""
    import torch

    from sdpg_mcore.train.colocate import GROUPS, TrainerOffload, trainer_tensors

    with common.phase("colocated offload and reload"):
        before = {g: [t.detach().cpu() for t in ts if t is not None] for g, ts in
                  trainer_tensors(policy.chunks, policy.optimizer).items() if g != "grads"}  # fmt: skip
        offload = TrainerOffload(policy.chunks, policy.optimizer, policy.device)
        allocated = torch.cuda.memory_allocated() if not cpu else None
        moved = offload.offload(GROUPS)
        drop = allocated - torch.cuda.memory_allocated() if not cpu else None
        offload.reload()
        after = trainer_tensors(policy.chunks, policy.optimizer)
        exact = all(
            torch.equal(a, b.detach().cpu())
            for g, tensors in before.items()
            for a, b in zip(tensors, (t for t in after[g] if t is not None))
        )
    return {"offloaded_bytes": moved, "allocator_freed_bytes": drop, "exact": exact}


def _planned_peak(model_dir: str, batch: list, token_budget: int, use_te: bool) -> int:
    """``sdpg_mcore.plan``'s training-phase peak for this stage's model and batch (one GPU)."""
    from sdpg_mcore.plan import Layout, ModelShape, TrainingShape, estimate_memory

    student = max(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    teacher = max(len(r.teacher_prompt_ids) + len(r.response_ids) for r in batch)
    per_mini_batch = len(batch) // 2  # two mini-batches (mini_batch_groups=2 of the 4 groups)
    train = TrainingShape(
        micro_batch_tokens=min(token_budget, student * per_mini_batch),
        teacher_tokens=min(token_budget, teacher * per_mini_batch),
        rollout_seq_len=teacher, kl_chunk_tokens=1024, mini_batch_responses=per_mini_batch,
        response_len=max(len(r.response_ids) for r in batch), kernels="fused" if use_te else "local",
        overhead_bytes=0, num_microbatches=1,
    )  # fmt: skip
    return estimate_memory(ModelShape.from_path(model_dir), Layout(), train).total


def run_shape(
    arch: str, shape: dict, cpu: bool, *, lengths: tuple[int, int, int], steps: int, colocated: bool = True
) -> dict:
    """``steps`` SDPG steps of a random ``arch`` model of ``shape`` on this device, judged
    (``step_checks``); the stage result. Shared by ``sdpg_step`` and ``llama70b_layer``."""
    import torch

    from sdpg_mcore.models.spec import te_status
    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.parallel import state

    logged_phases()
    use_te, found = te_status()
    token_budget = 2048 if cpu else 8192
    out: dict = {
        "shape": shape,
        "spec": "transformer_engine" if use_te else "local",
        "te": found,
        "steps": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        with common.phase("draw and save the random bf16 checkpoint"):
            model_dir = str(save_tiny_hf_model(Path(tmp) / "m", arch, dtype=torch.bfloat16,
                                               device=common.device(cpu), **shape))  # fmt: skip
            if not cpu:
                torch.cuda.empty_cache()
        batch = step_responses(shape["vocab_size"], lengths)
        with common.phase("fp64 transformers reference log-probs"):
            reference = reference_logprobs(model_dir, batch, common.device(cpu))
        batch = [replace(r, rollout_logprobs=lp) for r, lp in zip(batch, reference)]
        policy, ctx = _policy_and_context(model_dir, cpu, use_te, token_budget)
        out["planned_peak_bytes"] = _planned_peak(model_dir, batch, token_budget, use_te)
        compiled = common.compile_seconds()
        for step in range(1, steps + 1):
            out["steps"].append(_one_step(policy, ctx, step, batch, cpu))
            common.save_partial(out)  # a stall in a later phase keeps what finished
        out["torch_compile_s"] = common.compile_seconds() - compiled
        if (
            colocated
        ):  # the turn, then one more step on the reloaded state (views, fused wgrad into main_grad)
            out["colocated"] = _colocated_turn(policy, cpu)
            out["steps"].append(_one_step(policy, ctx, steps + 1, batch, cpu))
    state.destroy(process_group=True)
    return _judged(out)


def _judged(out: dict) -> dict:
    first = out["steps"][0]
    problems = step_checks.judge_finite(out["steps"])
    problems += step_checks.judge_logprobs(first.get("logprob_mismatch", float("nan")))
    problems += step_checks.judge_peak(first.get("peak_bytes"), out["planned_peak_bytes"])
    turn = out.get("colocated")
    if turn is not None:
        problems += step_checks.judge_offload(
            turn["offloaded_bytes"], turn["allocator_freed_bytes"], turn["exact"]
        )
    return out | {"problems": problems, "ok": not problems}


def run(cpu: bool) -> dict:
    lengths = (16, 8, 24) if cpu else (128, 64, 512)
    return run_shape("qwen3", CPU_SHAPE if cpu else QWEN3_WIDTH, cpu, lengths=lengths, steps=2)
