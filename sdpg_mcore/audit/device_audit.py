"""Device audit: one full training step with the model on a fake GPU, on a CPU-only machine.

Runs ``train.step.run_step`` — rollout results in, old and reference log-prob passes (the
reference weights swapped in and out), teacher hidden-state pass, train pass with the fused head
and the algorithm's loss, the head's backward, the mini-batch all-reduces — with every model
parameter a fake ``cuda:0`` tensor (``sdpg_mcore.audit.fake_cuda.FakeCuda``; what else is swapped
in, and why: ``sdpg_mcore.audit.fake_step``). The report holds:

- violations: a host tensor meeting a device tensor, a collective handed a host tensor (NCCL needs
  device tensors), a data-dependent shape on the device (boolean-mask gather, ``nonzero``);
- host syncs: every device value read on the host and every blocking copy, with the line that
  asked. The allowed ones (:data:`ALLOWED_SYNCS`) are those the step documents as needed, and none
  of them may happen per micro-batch.

Before the step, the model is also built the trainer's way with the fake GPU "available"
(``sdpg_mcore.audit.construction``): every parameter and buffer must land on it, as on a real GPU.
After it, the colocated turn (``sdpg_mcore.audit.colocated``): ``train/colocate.py`` offloads the
trainer's device state to pinned host memory and brings it back; every storage must be freed and come
back on the GPU, through pinned non-blocking copies (any other copy is a host sync).
Clean means no violation and no other host sync. The audit owns the process group and patches
Megatron while it runs: one audit per process.

    result = run_audit("sdpg", teacher_states="host")     # tools/device_audit.py prints it
    result = run_audit("sdpg", teacher="ema", ema_weights="host")   # the guarded teacher's swaps
    result["clean"], result["violations"], result["host_syncs"]
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import torch

from sdpg_mcore.audit.fake_cuda import AuditViolation, FakeCuda, Finding, where_raised
from sdpg_mcore.audit.fake_step import patched, policy_on_fake_gpu, step_patches

ALLOWED_SYNCS = {
    # (module path, function): why the host needs the value
    (
        "sdpg_mcore/algo/aggregation.py",
        "normalisers_from_counts",
    ): "the loss normalisers, once per mini-batch",
    ("sdpg_mcore/algo/metrics.py", "reduce"): "the step's logged metrics, once per step",
    ("sdpg_mcore/train/step.py", "_host_token_values"): "a KL penalty in the reward (GRPO), once per step",
}
VOCAB = 512
"""The audited model's vocabulary (a 2-layer Qwen3, hidden 64)."""


def is_allowed_sync(sync: str) -> bool:
    """Whether a reported host sync (``"what at path:line function"``) is one the step needs."""
    where = sync.rsplit(" at ", 1)[-1]
    path, _, function = where.partition(" ")
    return (path.rsplit(":", 1)[0], function) in ALLOWED_SYNCS


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _audited_policy(layout, head_backend: str) -> tuple[object, dict]:
    """The tiny model's bf16 policy (built on the host) with the fused head's ``head_backend``, and the
    construction check of its stage."""
    from sdpg_mcore.audit.construction import construction_check
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.train.model_setup import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_hf_model(
            Path(tmp) / "m", "qwen3", hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        )  # fmt: skip
        construction = construction_check(model_dir, layout)
        optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.0, use_distributed_optimizer=False)
        policy = build_policy(
            model_dir,
            layout,
            dtype=torch.bfloat16,
            optim=optim,
            total_updates=2,
            chunk_size=8,
            vocab_size=VOCAB,
            head_backend=head_backend,
        )
    return policy, construction


def _loss_config(algorithm_name: str, teacher: str):
    """The algorithm's default loss config; sdpg's with ``teacher`` (the others have no such key)."""
    from sdpg_mcore import algo

    config_cls = algo.get_algorithm(algorithm_name).config_cls
    return config_cls(teacher=teacher) if algorithm_name == "sdpg" else config_cls()


def _fake_gpu_step(audit: FakeCuda, policy, layout, options: dict, result: dict):
    """One step with the policy on the fake GPU (several micro-batches: 96 tokens each), as ``options``
    (``run_audit``'s arguments) say; fills ``result`` and returns the host syncs of the set-up (None if
    it stopped there)."""
    from sdpg_mcore.audit.colocated import colocated_check
    from sdpg_mcore.audit.synthetic import synthetic_responses, synthetic_step_context
    from sdpg_mcore.train.ema_weights import ema_teacher
    from sdpg_mcore.train.step import run_step

    setup = None
    with contextlib.ExitStack() as stack:
        for owner, name, value in step_patches(audit):
            stack.enter_context(patched(owner, name, value))
        stack.enter_context(audit)
        stack.enter_context(torch.no_grad())
        try:
            fake_policy = policy_on_fake_gpu(policy, audit)
            loss_cfg = _loss_config(options["algorithm"], options["teacher"])
            ema = ema_teacher(fake_policy, loss_cfg.needs(), options["ema_weights"])
            ctx = synthetic_step_context(
                fake_policy, layout, loss_cfg, reference_dir=None, token_budget=96, mini_batch_groups=2,
                total_steps=2, teacher_states=options["teacher_states"], ema=ema,
            )  # fmt: skip
            setup = audit.report()["host_syncs"]
            audit.log.findings.clear()
            batch = synthetic_responses(
                4, 2, vocab_size=VOCAB, prompt_len=12, context_len=3, response_len=(10, 13, 16, 19)
            )
            run_step(ctx, 1, batch)
            result["micro_batches_per_pass"] = "several (token_budget=96)"
            result["colocated"] = colocated_check(fake_policy, audit)
            result["host_teacher_state_bytes"] = 0 if ctx.host_states is None else ctx.host_states.nbytes
            result["triton_launches"] = getattr(audit, "triton_launches", 0)
        except AuditViolation as err:
            result["stopped_at"] = str(err)
        except Exception as err:  # a device error the fake GPU raised, as the real one would
            if os.environ.get("SDPG_AUDIT_TRACEBACK"):
                traceback.print_exc()
            where = where_raised(err)
            audit.log.findings.append(
                Finding("violation", f"{type(err).__name__}: {_first_line(err)}", where)
            )
            result["stopped_at"] = f"{type(err).__name__} at {where}"
    return setup


def run_audit(
    algorithm_name: str = "sdpg",
    teacher_states: str = "device",
    head_backend: str = "auto",
    teacher: str = "policy",
    ema_weights: str = "host",
) -> dict:
    """One step under the fake GPU; returns ``{"violations": [...], "host_syncs": {...}, "clean": ...}``.

    ``teacher_states``: the step's ``trainer.teacher_states`` (host: the teacher states go to pinned
    host memory and come back per micro-batch; the audit checks both copies are pinned and non-blocking).
    ``head_backend``: the step's ``trainer.logprob_backend`` (auto: the Triton kernels when Triton
    imports; their launches are checked for host tensors).
    ``teacher`` (sdpg's ``algorithm.teacher``): ``ema`` swaps the EMA average in for every teacher
    pass and updates it after every optimizer step (``ema_weights``: its place,
    ``trainer.ema_weights``), ``initial`` swaps the frozen reference weights in for every teacher pass.
    """
    from sdpg_mcore.parallel import state
    from sdpg_mcore.parallel.spawn import find_free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1")
    state.initialize_distributed()
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    policy, construction = _audited_policy(layout, head_backend)
    audit = FakeCuda()
    result: dict = {
        "algorithm": algorithm_name,
        "teacher_states": teacher_states,
        "head_backend": head_backend,
        "teacher": teacher,
        "ema_weights": ema_weights if teacher == "ema" else None,
    }
    options = dict(
        algorithm=algorithm_name, teacher_states=teacher_states, teacher=teacher, ema_weights=ema_weights
    )
    setup = _fake_gpu_step(audit, policy, layout, options, result)
    state.destroy(process_group=True)
    report = audit.report()
    result["setup_host_syncs"] = setup or []
    result["violations"] = report["violations"]
    result["host_syncs"] = dict(Counter(report["host_syncs"]))
    result["unexpected_host_syncs"] = {
        s: n for s, n in result["host_syncs"].items() if not is_allowed_sync(s)
    }
    result["construction"] = construction
    result["violations"] = construction["violations"] + report["violations"]
    result["clean"] = not result["violations"] and not result["unexpected_host_syncs"]
    return result
