#!/usr/bin/env python
"""Plan a run before queueing it: exact parameter count, per-GPU memory by component, TP/PP/CP/DP,
and (``--time``) the predicted step time by phase, (``--search``) the fitting layouts fastest first.

    python tools/plan.py --config examples/llama3_70b/config.json --nodes 4 --gpus-per-node 8 \\
        --gpu-mem-gb 80 --max-prompt-len 2048 --max-response-len 8192 --json plan.json
    python tools/plan.py --config examples/llama3_70b/recipe.yaml --nodes 8 --time --search --json plan.json
    python tools/plan.py --config examples/llama3_70b/recipe.yaml --nodes 8 --scale 64,128,256,512,1024
    python tools/plan.py --validate                  # the model against published runs
    python tools/plan.py --against-bench step.json   # ... and against tools/bench_step.py on this CPU

Give ``--tp/--pp/--cp`` to validate a layout (missing ones default to 1); leave them out to get
the smallest model-parallel layout that fits. Exit status: 0 fits, 1 does not fit, 2 bad input.
The JSON holds ``num_parameters`` (the HF count), ``num_parameters_megatron`` (vocabulary padded
to 128*TP), ``fits``, ``layout``, ``per_gpu_bytes`` by component and ``advice`` (what would make a
layout that does not fit fit, e.g. ``trainer.teacher_states=host``); with ``--time`` also ``time``
(``total_s``, ``phases``, ``tokens_per_s_per_gpu``, ``details``, ``assumed``), with ``--search``
``search`` (every fitting layout, fastest first) and ``why``, with ``--scale`` ``scaling``.
--nodes counts the trainer's nodes; a dedicated rollout adds ``--rollout-nodes`` more.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sdpg_mcore.plan import (
    GIB,
    Layout,
    ModelShape,
    TrainingShape,
    evaluate,
    padded_vocab_size,
    propose_layout,
)  # noqa: E402
from sdpg_mcore.plan.hardware import HARDWARE, hardware  # noqa: E402
from sdpg_mcore.plan.recipe_time import Assumptions  # noqa: E402
from sdpg_mcore.plan.time_report import TimeRequest, time_report  # noqa: E402

NOTES = {
    "parameters": "bf16 weights, busiest pipeline stage, /TP",
    "gradients": "fp32 main_grad buffer (Megatron DDP)",
    "optimizer_states": "fp32 master + Adam m, v, /(DP*CP)",
    "activations": "student fwd saved for bwd, 1F1B in flight",
    "kl_head": "hidden states + logits work (fused: per chunk)",
    "teacher": "forward-only teacher pass: one layer's working set (+ live weights parked, ema on device)",
    "teacher_states": "teacher response states kept for the train pass (last stage; host: one micro-batch's)",
    "reference_model": "resident reference copy (separate_model)",
    "teacher_weights": "teacher=ema/initial: fp32 EMA (ema_weights=device) + teacher output-layer copy",
    "rollout_weights": "colocated SGLang weights (generation and weight-push phases)",
    "rollout_kv_cache": "colocated SGLang KV cache (generation phase)",
    "overhead": "CUDA context, NCCL, fragmentation",
}

#: Pinned host memory lines of the table: (per-GPU bytes key, what, whose node).
HOST_LINES = (
    ("teacher_states_host", "teacher states (teacher_states=host)", "last-stage node"),
    ("teacher_weights_host", "EMA teacher (ema_weights=host) + parked weights", "node"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        help="HF config.json, a model directory holding one, or a YAML recipe (its model.path's config.json, "
        "else the config.json next to it; the recipe also gives lengths, layout and recompute)",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--max-prompt-len", type=int, help="default: the recipe's, else 2048")
    p.add_argument("--max-response-len", type=int, help="default: the recipe's, else 4096")
    p.add_argument("--tp", type=int, help="tensor parallel size (validate this layout)")
    p.add_argument("--pp", type=int, help="pipeline parallel size")
    p.add_argument("--cp", type=int, help="context parallel size")
    p.add_argument(
        "--micro-batch-tokens", type=int, help="tokens per micro-batch per DP rank (default: prompt+response)"
    )
    p.add_argument(
        "--teacher-tokens", type=int, help="tokens of the teacher micro-batch (default: micro-batch tokens)"
    )
    p.add_argument("--num-microbatches", type=int, help="micro-batches per step per DP rank (default: >= pp)")
    p.add_argument(
        "--mini-batch-responses",
        type=int,
        help="responses per mini-batch, all DP ranks (default: the recipe's mini_batch_prompts x rollout.n; "
        "unset: one micro-batch of teacher states)",
    )
    p.add_argument(
        "--recompute", choices=("none", "selective", "full"), help="default: the recipe's, else none"
    )
    p.add_argument("--kl-head", choices=("fused", "materialised"), default="fused")
    p.add_argument(
        "--kernels",
        choices=("fused", "local"),
        help="fused: Transformer Engine + flash attention; local: Megatron's local spec (no TE, unfused ops); "
        "default: local for a recipe's model.transformer_impl=local, else fused",
    )
    p.add_argument(
        "--kl-chunk-tokens",
        type=int,
        help="default: the recipe's logprob_chunk_size, else the head's 256 MiB budget",
    )
    _placement_args(p.add_argument_group("where the state and the engines live"))
    p.add_argument("--overhead-gb", type=float, default=3.0, help="CUDA context + NCCL + fragmentation, GiB")
    p.add_argument("--json", dest="json_out", help="write the plan as JSON here")
    _time_args(p.add_argument_group("step time (sdpg_mcore/plan/step_time.py)"))
    args = p.parse_args(argv)
    args.cli_layout = {a for a in ("tp", "pp", "cp") if getattr(args, a) is not None}  # before the recipe's
    return args


def _placement_args(g) -> None:
    g.add_argument(
        "--rollout",
        choices=("dedicated", "colocated"),
        help="servers on their own GPUs or sharing the trainer's (default: the recipe's rollout.colocated, "
        "else dedicated)",
    )
    g.add_argument(
        "--reference-weights",
        choices=("cpu_swap", "separate_model"),
        help="where the reference policy lives (default: the recipe's trainer.reference_weights, else cpu_swap)",
    )
    g.add_argument(
        "--teacher-states",
        choices=("device", "host"),
        help="where the teacher states wait for the train pass (default: the recipe's trainer.teacher_states, "
        "else device)",
    )
    g.add_argument(
        "--teacher",
        choices=("policy", "ema", "initial"),
        help="weights of the sdpg teacher pass (default: the recipe's algorithm.teacher, else policy)",
    )
    g.add_argument(
        "--ema-weights",
        choices=("device", "host"),
        help="teacher=ema: where the fp32 average lives (default: the recipe's trainer.ema_weights, else host)",
    )
    g.add_argument(
        "--rollout-kv-seqs",
        type=int,
        default=16,
        help="concurrent sequences a colocated SGLang engine caches",
    )


def _time_args(g) -> None:
    g.add_argument(
        "--time", action="store_true", help="predict the planned layout's step time, phase by phase"
    )
    g.add_argument("--search", action="store_true", help="rank every fitting layout by predicted step time")
    g.add_argument(
        "--scale", help="what-if: comma-separated total GPU counts (trainer + rollout), e.g. 64,128"
    )
    g.add_argument("--hardware", default="h100", choices=sorted(HARDWARE), help="device model (default h100)")
    g.add_argument(
        "--rollout-nodes",
        type=int,
        default=2,
        help="dedicated rollout nodes (default 2, as slurm/sdpg_70b.sh)",
    )
    g.add_argument("--rollout-tp", type=int, default=8, help="GPUs per rollout engine (default 8)")
    g.add_argument("--mean-prompt-len", type=float, help="assumed mean prompt tokens (default: max / 8)")
    g.add_argument("--mean-response-len", type=float, help="assumed mean response tokens (default: max / 3)")
    g.add_argument(
        "--teacher-extra-len", type=float, default=64.0, help="assumed SDPG teacher context tokens"
    )
    g.add_argument("--truncated", type=float, default=0.02, help="assumed share of responses hitting the cap")
    g.add_argument(
        "--logprob-backend",
        choices=("auto", "torch", "triton"),
        help="the fused head's kernels (default: the recipe's trainer.logprob_backend, else auto: triton on a GPU)",
    )
    g.add_argument(
        "--head-bytes",
        type=float,
        help="train head's elementwise bytes per (token, vocab) pair, student + teacher (default: the "
        "recipe's trainer.logprob_backend on a GPU: auto/triton 38, torch 130)",
    )
    g.add_argument(
        "--validate", action="store_true", help="predict the published runs and compare; then exit"
    )
    g.add_argument("--calibrate-cpu", action="store_true", help="measure this CPU's rates; then exit")
    g.add_argument(
        "--against-bench", help="tools/bench_step.py JSON: predicted vs measured ratios on this CPU"
    )


def apply_recipe(args: argparse.Namespace) -> Path:
    """Fill unset options from a YAML recipe (command line wins); return the HF config path to read."""
    path = Path(args.config)
    if path.suffix not in (".yaml", ".yml"):
        return path
    import yaml

    if not path.is_file():
        raise ValueError(f"--config {path} does not exist")
    recipe = yaml.safe_load(path.read_text()) or {}
    section = lambda name: recipe.get(name) or {}  # noqa: E731
    model, data, par, trainer = section("model"), section("data"), section("parallel"), section("trainer")
    defaults = {
        "max_prompt_len": data.get("max_prompt_length"),
        "max_response_len": data.get("max_response_length"),
        "micro_batch_tokens": data.get("micro_batch_tokens"),
        "recompute": "full" if model.get("recompute_activations") else None,
        "kl_chunk_tokens": trainer.get("logprob_chunk_size"),
        "reference_weights": trainer.get("reference_weights"),
        "teacher_states": trainer.get("teacher_states"),
        "teacher": section("algorithm").get("teacher"),
        "ema_weights": trainer.get("ema_weights"),
        "mini_batch_responses": _product(data.get("mini_batch_prompts"), section("rollout").get("n")),
        "kernels": "local" if model.get("transformer_impl") == "local" else None,
        "rollout": "colocated" if section("rollout").get("colocated") else None,
    }
    if all(getattr(args, k) is None for k in ("tp", "pp", "cp")):
        defaults.update(tp=par.get("tp"), pp=par.get("pp"), cp=par.get("cp"))
    for key, value in defaults.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    candidates = [Path(model["path"]) / "config.json"] if model.get("path") else []
    candidates.append(path.parent / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"recipe {path}: no HF config found at {' or '.join(map(str, candidates))}; pass the model's config.json"
    )


def _product(a, b):
    return a * b if a is not None and b is not None else None


def build_training_shape(args: argparse.Namespace) -> TrainingShape:
    args.max_prompt_len = args.max_prompt_len or 2048
    args.max_response_len = args.max_response_len or 4096
    args.recompute = args.recompute or "none"
    seq_len = args.max_prompt_len + args.max_response_len
    micro = args.micro_batch_tokens or seq_len
    if micro < seq_len:
        raise ValueError(
            f"--micro-batch-tokens={micro} is below one sequence (prompt {args.max_prompt_len} + response "
            f"{args.max_response_len} = {seq_len}); raise it or use --cp to split sequences"
        )
    return TrainingShape(
        micro_batch_tokens=micro,
        teacher_tokens=args.teacher_tokens or micro,
        rollout_seq_len=seq_len,
        recompute=args.recompute,
        kl_head=args.kl_head,
        kernels=args.kernels or "fused",
        kl_chunk_tokens=args.kl_chunk_tokens,
        num_microbatches=args.num_microbatches,
        rollout=args.rollout or "dedicated",
        reference_weights=args.reference_weights or "cpu_swap",
        mini_batch_responses=args.mini_batch_responses,
        response_len=args.max_response_len,
        teacher_states=args.teacher_states or "device",
        teacher=args.teacher or "policy",
        ema_weights=args.ema_weights or "host",
        rollout_kv_seqs=args.rollout_kv_seqs,
        overhead_bytes=int(args.overhead_gb * GIB),
    )


def _plan(args: argparse.Namespace, shape: ModelShape, train: TrainingShape):
    """The given layout's plan (``--tp/--pp/--cp``), else the proposed one; and whether it was proposed."""
    world = args.nodes * args.gpus_per_node
    gpu_mem = int(args.gpu_mem_gb * GIB)
    if any(v is not None for v in (args.tp, args.pp, args.cp)):
        tp, pp, cp = args.tp or 1, args.pp or 1, args.cp or 1
        mp = tp * pp * cp
        if world % mp:
            raise ValueError(f"tp*pp*cp = {mp} does not divide the {world} GPUs (--nodes x --gpus-per-node)")
        return evaluate(
            shape, Layout(tp, pp, cp, world // mp), train, args.gpus_per_node, world, gpu_mem
        ), False
    return propose_layout(shape, train, args.gpus_per_node, world, gpu_mem), True


def advice(args: argparse.Namespace, shape: ModelShape, train: TrainingShape, plan) -> list[str]:
    """What would make a plan that does not fit fit: the EMA teacher's average, else the teacher
    states, in pinned host memory."""
    if plan.fits or plan.problems:
        return []
    if train.teacher == "ema" and train.ema_weights == "device":
        host, _ = _plan(args, shape, replace(train, ema_weights="host"))
        if host.fits:
            lay, per_gpu = host.layout, host.estimate.teacher_weights_host / GIB
            return [
                f"trainer.ema_weights=host fits: TP{lay.tp} PP{lay.pp} CP{lay.cp} DP{lay.dp} at "
                f"{host.estimate.total / GIB:.2f} GiB per GPU (the EMA teacher's fp32 average and the parked "
                f"weights in pinned host memory: {per_gpu:.2f} GiB per GPU, "
                f"{per_gpu * args.gpus_per_node:.1f} GiB per node of {args.gpus_per_node} GPUs)"
            ]
    if train.teacher_states != "device":
        return []
    host, _ = _plan(args, shape, replace(train, teacher_states="host"))
    if not host.fits:
        return []
    lay, est = host.layout, host.estimate
    per_gpu = est.teacher_states_host / GIB
    return [
        f"trainer.teacher_states=host fits: TP{lay.tp} PP{lay.pp} CP{lay.cp} DP{lay.dp} at "
        f"{est.total / GIB:.2f} GiB per GPU (teacher states of one micro-batch on the GPU; the "
        f"mini-batch's in pinned host memory: {per_gpu:.2f} GiB per GPU, "
        f"{per_gpu * args.gpus_per_node:.1f} GiB per last-stage node of {args.gpus_per_node} GPUs)"
    ]


def _time_request(args: argparse.Namespace) -> TimeRequest:
    assume = Assumptions(
        mean_prompt_len=args.mean_prompt_len,
        mean_response_len=args.mean_response_len,
        teacher_extra_len=args.teacher_extra_len,
        truncated=args.truncated,
        head_bytes=args.head_bytes,
    )
    scale = tuple(int(g) for g in args.scale.split(",")) if args.scale else ()
    return TimeRequest(
        hardware=hardware(args.hardware),
        gpus_per_node=args.gpus_per_node,
        rollout_nodes=args.rollout_nodes,
        rollout_tp=args.rollout_tp,
        colocated=args.rollout == "colocated",
        assume=assume,
        search=args.search,
        scale=scale,
        scale_model_parallel=_given_model_parallel(args),
    )


def _given_model_parallel(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """(tp, pp, cp) given on the command line (not from a recipe): --scale then keeps it."""
    return (args.tp or 1, args.pp or 1, args.cp or 1) if args.cli_layout else None


def _recipe(args: argparse.Namespace) -> dict:
    """The recipe (empty for an HF config) with ``--logprob-backend`` over its ``trainer.logprob_backend``."""
    recipe = {}
    if Path(args.config).suffix in (".yaml", ".yml"):
        import yaml

        recipe = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.logprob_backend:
        recipe["trainer"] = {**(recipe.get("trainer") or {}), "logprob_backend": args.logprob_backend}
    return recipe


def make_plan(args: argparse.Namespace) -> dict:
    """The JSON-ready plan for parsed arguments (raises ValueError on bad input)."""
    if not args.config:
        raise ValueError("--config is required (an HF config.json, a model directory or a recipe)")
    shape = ModelShape.from_path(apply_recipe(args))
    train = build_training_shape(args)
    plan, proposed = _plan(args, shape, train)
    timing = {}
    if args.time or args.search or args.scale:
        timing = time_report(shape, train, plan, _recipe(args), _time_request(args))
    gpu_mem = plan.gpu_mem_bytes
    layout = plan.layout
    return {
        **timing,
        "config": str(args.config),
        "model_type": shape.model_type,
        "num_parameters": shape.num_hf_parameters(),
        "num_parameters_megatron": shape.num_megatron_parameters(layout.tp),
        "padded_vocab_size": padded_vocab_size(shape.vocab_size, layout.tp),
        "fits": plan.fits,
        "proposed": proposed,
        "problems": plan.problems,
        "advice": advice(args, shape, train, plan),
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp},
        "per_gpu_bytes": plan.estimate.as_dict() if plan.estimate else {},
        "gpu_mem_bytes": gpu_mem,
        "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node},
        "training": {
            "micro_batch_tokens": train.micro_batch_tokens,
            "teacher_tokens": train.teacher_tokens,
            "recompute": train.recompute,
            "kl_head": train.kl_head,
            "kernels": train.kernels,
            "reference_weights": train.reference_weights,
            "teacher_states": train.teacher_states,
            "teacher": train.teacher,
            "ema_weights": train.ema_weights,
            "rollout": train.rollout,
        },
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lay = result["layout"]
    title = (
        f"{result['model_type']}: {result['num_parameters']:,} parameters (HF), "
        f"{result['num_parameters_megatron']:,} Megatron (vocab {result['padded_vocab_size']:,}) | "
        f"{'proposed' if result['proposed'] else 'given'} layout TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']}"
    )
    table = Table(title=title)
    table.add_column("component")
    table.add_column("GiB / GPU", justify="right")
    table.add_column("what")
    per_gpu = result["per_gpu_bytes"]
    for name, note in NOTES.items():
        if name in per_gpu:
            table.add_row(name, f"{per_gpu[name] / GIB:.2f}", note)
    if per_gpu:
        table.add_row(
            "[bold]peak[/bold]",
            f"[bold]{per_gpu['total'] / GIB:.2f}[/bold]",
            f"of {result['gpu_mem_bytes'] / GIB:.0f} GiB: {'[green]fits' if result['fits'] else '[red]does not fit'}",
        )
    gpus_per_node = result["cluster"]["gpus_per_node"]
    for phase, peak in (per_gpu.get("phase_peaks") or {}).items():
        table.add_row(f"  {phase} phase", f"{peak / GIB:.2f}", "colocated: trainer and engines take turns")
    for key, what, node in HOST_LINES:
        host = per_gpu.get(key, 0)
        if host:
            per_node = f"{host * gpus_per_node / GIB:.1f} GiB per {node}"
            table.add_row("host RAM, pinned", f"{host / GIB:.2f}", f"{what}, not GPU: {per_node}")
    console.print(table)
    for problem in result["problems"]:
        console.print(f"[red]invalid layout:[/red] {problem}")
    for line in result["advice"]:
        console.print(f"[yellow]advice:[/yellow] {line}")


def _phase_table(title: str, step: dict):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in step["phases"].items():
        table.add_row(name, f"{seconds:.2f}", f"{seconds / step['total_s']:.0%}")
    table.add_row("[bold]step[/bold]", f"[bold]{step['total_s']:.2f}[/bold]", "")
    table.add_row("tokens/s/GPU", f"{step['tokens_per_s_per_gpu']:.0f}", f"{step['gpus']} GPUs")
    for name, seconds in step["details"].items():
        table.add_row(f"  ({name})", f"{seconds:.2f}", "")
    gen = step.get("generation")
    if gen:
        table.add_row(
            "  (decode)",
            f"{gen['decode_s']:.2f}",
            f"{gen['sequences_per_engine']:.0f} seqs/engine{' (KV-bound)' if gen['kv_limited'] else ''}, "
            f"longest {gen['longest_response_tokens']:.0f} tokens",
        )
    return table


def _layout_label(entry: dict) -> str:
    lay = entry["layout"]
    return f"TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']}"


def print_time(result: dict) -> None:
    """The phase table (--time), the ranking (--search) and the scaling what-if (--scale)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    if "time" in result:
        t = result["time"]
        console.print(_phase_table(f"predicted step on {t['hardware']}", t))
        console.print(f"assumed: {json.dumps({k: v for k, v in t['assumed'].items() if k != 'rollout'})}")
    if "search" in result:
        table = Table(title="fitting layouts, fastest first")
        for column in ("layout", "step s", "GiB/GPU", "phases (s)"):
            table.add_column(column)
        for entry in result["search"]:
            phases = " ".join(f"{k}={v:.1f}" for k, v in entry["phases"].items())
            table.add_row(_layout_label(entry), f"{entry['total_s']:.1f}", f"{entry['peak_gib']:.1f}", phases)
        console.print(table)
        for line in result["why"]:
            console.print(f"why: {line}")
    if "scaling" in result:
        table = Table(title="scaling what-if (fastest split and layout per size)")
        for column in (
            "GPUs",
            "trainer+rollout nodes",
            "layout",
            "step s",
            "speed-up",
            "generation",
            "train",
            "bubble",
            "dp comm",
            "sync",
        ):
            table.add_column(column, justify="right")
        base = result["scaling"][0]
        for e in result["scaling"]:
            d, ph = e["details"], e["phases"]
            table.add_row(
                str(e["gpus"]),
                f"{e['trainer_nodes']}+{e['rollout_nodes']}",
                _layout_label(e),
                f"{e['total_s']:.1f}",
                f"{base['total_s'] / e['total_s']:.2f}x",
                f"{ph.get('generation', 0):.1f}",
                f"{ph.get('train', 0):.1f}",
                f"{d['pipeline_bubble']:.1f}",
                f"{d['dp_comm']:.1f}",
                f"{ph.get('weight_sync', 0):.1f}",
            )
        console.print(table)


def side_command(args: argparse.Namespace) -> int:
    """--validate, --calibrate-cpu, --against-bench: the model's checks, no memory plan."""
    from sdpg_mcore.plan.bench_agreement import Agreement, agreement
    from sdpg_mcore.plan.calibrate import calibrate_cpu
    from sdpg_mcore.plan.published import validate

    out: dict = {}
    if args.validate:
        out["validation"] = [
            {
                "run": c.run_id,
                "checked": c.checked,
                "total_s": [c.predicted.total, c.published["total_s"]],
                "total_error": c.total_error,
                "phases": {k: [p, q, p / q - 1] for k, (p, q) in c.phases.items()},
                "predicted_phases": c.predicted.phases,
            }
            for c in validate()
        ]
        for v in out["validation"]:
            phases = ", ".join(f"{k} {p:.1f}/{q:.0f} ({e:+.0%})" for k, (p, q, e) in v["phases"].items())
            sys.stdout.write(
                f"{v['run']}: {v['total_s'][0]:.1f} s predicted / {v['total_s'][1]:.1f} published "
                f"({v['total_error']:+.1%}){'' if v['checked'] else ' [not asserted]'}  {phases}\n"
            )
    if args.calibrate_cpu or args.against_bench:
        cpu = calibrate_cpu()
        out["cpu"] = {
            k: getattr(cpu, k) for k in ("peak_flops", "memory_bytes_per_s", "pageable_copy_bytes_per_s")
        }
        sys.stdout.write(f"cpu: {json.dumps(out['cpu'])}\n")
    if args.against_bench:
        agree = agreement(json.loads(Path(args.against_bench).read_text()), cpu)
        for name in ("teacher_over_train", "sdpg_over_grpo"):
            pred, meas = getattr(agree, name)
            out[name] = {"predicted": pred, "measured": meas, "error": Agreement.error((pred, meas))}
            sys.stdout.write(
                f"{name}: predicted {pred:.3f}, measured {meas:.3f} ({Agreement.error((pred, meas)):+.1%})\n"
            )
        out["phases"] = {"predicted": agree.predicted, "measured": agree.measured}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.validate or args.calibrate_cpu or args.against_bench:
            return side_command(args)
        result = make_plan(args)
    except ValueError as err:
        sys.stderr.write(f"plan.py: {err}\n")
        return 2
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print_time(result)
    if result["problems"]:
        return 2
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
