"""Device audit: one full SDPG step with the model on a fake GPU, on this CPU-only machine.

Runs ``train.step.run_step`` — rollout results in, old and reference log-prob passes (the
reference weights swapped in and out), teacher hidden-state pass, train pass with the fused head
and the SDPG loss, the head's backward, the mini-batch all-reduces — with every model parameter a
fake ``cuda:0`` tensor (``sdpg_mcore.audit.fake_cuda.FakeCuda``). It reports:

- violations: a host tensor meeting a device tensor, a collective handed a host tensor (NCCL needs
  device tensors), a data-dependent shape on the device (boolean-mask gather, ``nonzero``);
- host syncs: every device value read on the host and every blocking copy, with the line that
  asked. The allowed ones (``ALLOWED_SYNCS``) are those the step documents as needed, and none of
  them may happen per micro-batch.

Before the step, the model is also built the trainer's way with the fake GPU "available"
(:func:`construction_check`): every parameter and buffer must land on it, as on a real GPU.

Exit 0 only when there is no violation and no other host sync.

    python tools/device_audit.py                 # ~30 s on 2 cores
    python tools/device_audit.py --json audit.json
    python tools/device_audit.py --teacher-states host   # trainer.teacher_states=host: via pinned host memory

What is faked, and only here: autograd through fake CUDA tensors aborts this torch build, so the
passes run under ``no_grad``, Megatron's ``backward_step`` only checks devices, and the fused head's
backward formula is called directly after each forward; the optimizer step (Megatron's own
code, which needs real values) is replaced by a no-op; collectives check their tensors' device and
do nothing (one rank). Megatron's forward code runs as is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from types import MethodType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ALLOWED_SYNCS = {
    # (module path, function): why the host needs the value
    (
        "sdpg_mcore/algo/aggregation.py",
        "normalisers_from_counts",
    ): "the loss normalisers, once per mini-batch",
    ("sdpg_mcore/algo/metrics.py", "reduce"): "the step's logged metrics, once per step",
    ("sdpg_mcore/train/step.py", "_host_token_values"): "a KL penalty in the reward (GRPO), once per step",
}
COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
)


def _responses(vocab: int, prompts: int, n: int):
    from sdpg_mcore.train.batch import Response

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(prompts * n):
        prompt = torch.randint(5, vocab, (12,), generator=g).tolist()
        response = torch.randint(5, vocab, (10 + 3 * (i % 4),), generator=g).tolist()
        out.append(
            Response(
                group=i // n,
                prompt_ids=prompt,
                teacher_prompt_ids=prompt + [7, 8, 9],
                response_ids=response,
                rollout_logprobs=[-1.0] * len(response),
                reward=float(i % 3 == 0),
            )
        )
    return out


def _fake_model(audit, chunks) -> None:
    """Every parameter and buffer of the model chunks becomes a fake ``cuda:0`` tensor (no grad)."""
    from sdpg_mcore.models.builder import unwrap_model

    for chunk in chunks:
        for module in unwrap_model(chunk).modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        audit.to_fake_cuda(param), requires_grad=False
                    )
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = audit.to_fake_cuda(buf)
            for name, value in list(vars(module).items()):  # plain tensor attributes (rotary inv_freq)
                if isinstance(value, torch.Tensor) and not name.startswith("_"):
                    setattr(module, name, audit.to_fake_cuda(value))


def _checked_collective(audit, name: str):
    def collective(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
        from sdpg_mcore.audit.fake_cuda import is_fake_cuda

        host = [tuple(t.shape) for t in tensors if not is_fake_cuda(t)]
        if host:
            audit.violation(f"dist.{name} on host tensors {host}: NCCL needs device tensors")

    return collective


def _head_with_backward(audit):
    """``fused_kl_head`` that also runs its backward formula (autograd is off on fake CUDA)."""
    import importlib
    from types import SimpleNamespace

    head_module = importlib.import_module("sdpg_mcore.ops.fused_kl_head")
    _FusedKLHead = head_module._FusedKLHead

    real = head_module.fused_kl_head

    def apply(student, teacher, weight, targets, plan, tp_group, path):
        ctx = SimpleNamespace(set_materialize_grads=lambda _: None, needs_input_grad=(True, False, True))
        ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
        outs = _FusedKLHead.forward(ctx, student, teacher, weight, targets, plan, tp_group, path)
        _FusedKLHead.backward(ctx, *(torch.ones_like(o) for o in outs))
        return outs

    def head(*args, **kwargs):
        with _patched(_FusedKLHead, "apply", staticmethod(apply)):
            return real(*args, **kwargs)

    return head


def _kernel_launch_checks(audit) -> list:
    """Patches for the fused head's Triton launches (when Triton imports, ``auto`` picks them on the
    fake GPU): every tensor argument must be on the GPU; the kernels themselves do not run (fake
    tensors hold no data)."""
    from sdpg_mcore.ops.triton_support import triton

    if triton is None:
        return []
    from sdpg_mcore.audit.fake_cuda import is_fake_cuda
    from sdpg_mcore.ops import kl_head_kernels

    def checked(name):
        def launch(*args):
            audit.triton_launches = getattr(audit, "triton_launches", 0) + 1
            host = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor) and not is_fake_cuda(t)]
            if host:
                audit.violation(f"Triton {name} on host tensors {host}")

        return launch

    return [(kl_head_kernels, name, checked(name)) for name in ("launch_block_state", "launch_block_grad")]


@contextlib.contextmanager
def _patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _backward_step_check(audit):
    def backward_step(input_tensor, output_tensor, output_tensor_grad, model_type, config):
        from sdpg_mcore.audit.fake_cuda import is_fake_cuda

        for t in [output_tensor] if isinstance(output_tensor, torch.Tensor) else output_tensor:
            if not is_fake_cuda(t):
                audit.violation(f"backward of a host tensor {tuple(t.shape)}")
        return None

    return backward_step


def _policy_for_audit(policy, audit):
    """The policy with its weights on the fake GPU; zero_grad / optimizer_step as no-ops."""
    from dataclasses import replace

    from sdpg_mcore.models.builder import unwrap_model

    gpt = unwrap_model(policy.chunks[0])
    _fake_model(audit, [gpt])
    gpt.config.finalize_model_grads_func = None  # DDP's grad reduction: no gradients here
    fake = replace(policy, chunks=[gpt])
    fake.zero_grad = MethodType(lambda self: None, fake)
    fake.optimizer_step = MethodType(lambda self: (0.0, 1e-6), fake)
    return fake


def run_audit(
    algorithm_name: str = "sdpg", teacher_states: str = "device", head_backend: str = "auto"
) -> dict:
    """One step under the fake GPU; returns ``{"violations": [...], "host_syncs": [...], ...}``.

    ``teacher_states``: the step's ``trainer.teacher_states`` (host: the teacher states go to pinned
    host memory and come back per micro-batch; the audit checks both copies are pinned and non-blocking).
    """
    from megatron.core.pipeline_parallel import schedules

    from sdpg_mcore import algo, ops
    from sdpg_mcore.audit.fake_cuda import CUDA, AuditViolation, FakeCuda, Finding, where_raised
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.parallel import state
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.train.model_setup import ReferenceWeights, build_policy
    from sdpg_mcore.train.step import StepContext, run_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1")
    state.initialize_distributed()
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    vocab = 512
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_hf_model(
            Path(tmp) / "m", "qwen3", hidden_size=64, num_hidden_layers=2, vocab_size=vocab,
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
            vocab_size=vocab,
            head_backend=head_backend,
        )
    algorithm = algo.get_algorithm(algorithm_name)
    audit = FakeCuda()
    result: dict = {
        "algorithm": algorithm_name,
        "teacher_states": teacher_states,
        "head_backend": head_backend,
    }
    patches = [(schedules, "backward_step", _backward_step_check(audit))]
    patches += [(torch.distributed, name, _checked_collective(audit, name)) for name in COLLECTIVES]
    patches += [(ops, "fused_kl_head", _head_with_backward(audit))] + _kernel_launch_checks(audit)
    patches += [(torch.cuda, "current_device", lambda: CUDA)]  # Megatron allocates there: the fake GPU
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(_patched(owner, name, value))
        stack.enter_context(audit)
        stack.enter_context(torch.no_grad())
        try:
            fake_policy = _policy_for_audit(policy, audit)
            reference = ReferenceWeights(fake_policy, "cpu_swap", None, layout, torch.bfloat16)
            setup = audit.report()
            audit.log.findings.clear()
            ctx = StepContext(
                policy=fake_policy, reference=reference, algorithm=algorithm, loss_cfg=algorithm.config_cls(),
                layout=layout, temperature=1.0, token_budget=96, mini_batch_groups=2, total_steps=2, pad_id=0,
                teacher_states=teacher_states,
            )  # fmt: skip
            batch = _responses(vocab, prompts=4, n=2)
            run_step(ctx, 1, batch)
            result["micro_batches_per_pass"] = "several (token_budget=96)"
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
    state.destroy(process_group=True)
    report = audit.report()
    result["setup_host_syncs"] = setup["host_syncs"] if "setup" in locals() else []
    result["violations"] = report["violations"]
    result["host_syncs"] = dict(Counter(report["host_syncs"]))
    result["unexpected_host_syncs"] = {s: n for s, n in result["host_syncs"].items() if not _allowed(s)}
    result["construction"] = construction
    result["violations"] = construction["violations"] + result["violations"]
    result["clean"] = not result["violations"] and not result["unexpected_host_syncs"]
    return result


def _module_cuda(audit):
    """``Module.cuda`` for fake tensors: each host parameter and buffer becomes a fake ``cuda:0`` one.

    Why: ``Module._apply`` swaps tensor subclasses with ``swap_tensors``, which a ``FakeTensor`` refuses.
    """

    def cuda(module, device=None):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.device.type != "cuda":
                    sub._parameters[name] = torch.nn.Parameter(audit.to_fake_cuda(param), param.requires_grad)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device.type != "cuda":
                    sub._buffers[name] = audit.to_fake_cuda(buf)
        return module

    return cuda


def construction_check(model_dir, layout) -> dict:
    """Build this rank's stage the trainer's way (``model_setup.build_model``: ``build_gpt_model`` +
    the HF weights) with a GPU "available": every parameter, buffer and tensor attribute must land
    on that one device, as Megatron's layers allocate on ``torch.cuda.current_device()``.

    Why here and not only in the step audit: the step audit moves a CPU-built model to the fake GPU
    itself, so a builder that leaves modules on the host (torch norms of the local spec) passes it.
    """
    from sdpg_mcore.audit.fake_cuda import CUDA, FakeCuda, is_fake_cuda
    from sdpg_mcore.models.builder import unwrap_model
    from sdpg_mcore.train.model_setup import build_model

    audit = FakeCuda()
    patches = [(torch.cuda, "is_available", lambda: True), (torch.cuda, "current_device", lambda: CUDA)]
    patches += [(torch.nn.Module, "cuda", _module_cuda(audit))]
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(_patched(owner, name, value))
        stack.enter_context(audit)
        stack.enter_context(torch.no_grad())
        model = build_model(model_dir, layout, dtype=torch.bfloat16)
    tensors = {}
    for prefix, module in unwrap_model(model).named_modules():
        named = [*module._parameters.items(), *module._buffers.items()]
        named += [
            (k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("_")
        ]
        tensors.update({f"{prefix}.{k}".lstrip("."): v for k, v in named if v is not None})
    off = sorted(f"{name} on {t.device}" for name, t in tensors.items() if not is_fake_cuda(t))
    return {
        "tensors": len(tensors),
        "off_device": off,
        "violations": [f"built model: {len(off)} of {len(tensors)} tensors not on {CUDA}: {off[:4]}"]
        if off
        else [],
    }


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _allowed(sync: str) -> bool:
    where = sync.rsplit(" at ", 1)[-1]
    path, _, function = where.partition(" ")
    return (path.rsplit(":", 1)[0], function) in ALLOWED_SYNCS


def print_report(result: dict) -> None:
    out = sys.stdout
    out.write(
        f"device audit of one {result['algorithm']} step on a fake GPU "
        f"(teacher states on the {result['teacher_states']})\n"
    )
    if "stopped_at" in result:
        out.write(f"STOPPED: {result['stopped_at']}\n")
    built = result.get("construction", {})
    out.write(
        f"model construction: {len(built.get('off_device', []))} of {built.get('tensors')} tensors off the GPU\n"
    )
    out.write(f"violations: {len(result['violations'])}\n")
    for v in result["violations"]:
        out.write(f"  {v}\n")
    out.write("host syncs (count, what, where):\n")
    for sync, count in sorted(result["host_syncs"].items(), key=lambda kv: -kv[1]):
        mark = "  " if _allowed(sync) else "! "
        out.write(f"  {mark}{count:3d}  {sync}\n")
    if result["setup_host_syncs"]:
        out.write(f"(setup, not per step: {len(result['setup_host_syncs'])} host syncs)\n")
    out.write("CLEAN\n" if result["clean"] else "NOT CLEAN ('!' = a host sync the step does not need)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="sdpg", help="algorithm whose step is audited (default sdpg)")
    parser.add_argument(
        "--teacher-states",
        choices=("device", "host"),
        default="device",
        help="trainer.teacher_states of the audited step (default device)",
    )
    parser.add_argument(
        "--head-backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="trainer.logprob_backend of the audited step (default auto: triton when it imports)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    result = run_audit(args.algorithm, args.teacher_states, args.head_backend)
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
