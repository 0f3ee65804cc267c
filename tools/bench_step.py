"""Time and peak memory of one SDPG training step vs one GRPO step on the same batch, side by side.

    python tools/bench_step.py                                 # CPU default, ~2 min
    python tools/bench_step.py --hidden 256 --layers 4 --vocab 32000 --response-len 256 --json step.json
    python tools/bench_step.py --model /models/Qwen3-4B ...    # a real checkpoint (GPU)

Both algorithms are built in one process and run the real trainer step (``train.step.run_step``:
old/ref log-probs, the teacher pass for SDPG, mini-batch updates through Megatron's schedule and
optimizer) on a fixed synthetic batch, without rollout or weight sync. One warm-up step each, then
``--repeats`` rounds of one timed step each, interleaved (median). Peak memory: the peak of live tensor
bytes above the level before one more step of each (``torch.cuda.max_memory_allocated`` on GPU, the
profiler's allocation events on CPU).
Targets: time ratio <= 1.4, peak memory ratio <= 1.2 (the teacher pass and the head's teacher half
should cost less than half a train pass, and add no [tokens, vocab] buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from sdpg_mcore.bench.memory import peak_extra_bytes  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.4, 1.2
ALGORITHMS = ("grpo", "sdpg")


def _batch(args):
    """The fixed scored batch both algorithms train on: ``--prompts`` groups of ``--n``."""
    from sdpg_mcore.audit.synthetic import synthetic_responses

    return synthetic_responses(
        args.prompts, args.n, vocab_size=args.vocab - 1, prompt_len=args.prompt_len,
        context_len=args.context_len, response_len=args.response_len,
    )  # fmt: skip


def lm_head_flops_fraction(shape) -> float:
    """The LM head's share of the per-token matmul FLOPs (attention scores left out): where SDPG's
    extra work (the teacher's logits in the fused KL head) lands, so what sets the SDPG/GRPO ratio."""
    head = shape.vocab_size * shape.hidden_size
    return head / (head + shape.num_layers * shape.layer_sharded_parameters())


def _step_context(algo_name: str, model_dir: str, layout, args: argparse.Namespace):
    """A fresh policy of ``model_dir`` and the trainer's step context for ``algo_name``'s defaults."""
    from sdpg_mcore import algo
    from sdpg_mcore.audit.synthetic import synthetic_step_context
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.train.model_setup import build_policy

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.1)
    policy = build_policy(
        model_dir,
        layout,
        dtype=dtype,
        optim=optim,
        total_updates=100,
        vocab_size=args.vocab,
        chunk_size=args.chunk_size,
    )
    return synthetic_step_context(
        policy, layout, algo.get_algorithm(algo_name).config_cls(), reference_dir=model_dir,
        token_budget=args.token_budget, mini_batch_groups=args.mini_batch_prompts, total_steps=100,
    )  # fmt: skip


def _bench_both(rank, world_size, model_dir: str, args_dict: dict) -> dict:
    """GRPO and SDPG policies side by side in one process, their timed steps interleaved.

    Interleaving (order flipped every round) exposes both to the same background load, which
    sequential runs in separate processes did not: their ratio moved by +-15% between runs.
    """
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.step import run_step

    args = argparse.Namespace(**args_dict)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    batch = _batch(args)
    contexts = {name: _step_context(name, model_dir, layout, args) for name in ALGORITHMS}
    steps = dict.fromkeys(ALGORITHMS, 0)

    def step(name: str) -> dict:
        steps[name] += 1
        metrics = run_step(contexts[name], steps[name], batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return metrics

    for name in ALGORITHMS:  # warm-up: optimizer state, allocator
        step(name)
    times = {name: [] for name in ALGORITHMS}
    phases = {name: {} for name in ALGORITHMS}
    for round_ in range(args.repeats):
        for name in ALGORITHMS if round_ % 2 == 0 else ALGORITHMS[::-1]:
            began = time.perf_counter()
            metrics = step(name)
            times[name].append(time.perf_counter() - began)
            for k, v in metrics.items():
                if k.startswith("time/"):
                    phases[name].setdefault(k[5:], []).append(v)
    results = {}
    for name in ALGORITHMS:  # more steps each, measured alone (the profiler would slow a timed one)
        peak, kind = peak_extra_bytes(lambda name=name: step(name))
        results[name] = {
            "step_s": statistics.median(times[name]),
            "phases_s": {k: statistics.median(v) for k, v in phases[name].items()},
            "peak_extra_mb": peak / 2**20,
            "memory_kind": kind,
        }
    state.destroy()
    return results


SHAPE_KEYS = (
    "hidden",
    "layers",
    "vocab",
    "prompts",
    "n",
    "prompt_len",
    "response_len",
    "context_len",
    "bf16",
    "mini_batch_prompts",
    "token_budget",
    "chunk_size",
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF model dir (default: a random tiny Qwen3 of the sizes below)"
    )
    # Default shape: the LM head is 10% of the per-token matmul FLOPs, as in Qwen3-4B (9.7%); the head
    # is where SDPG adds work (teacher logits), so a head-heavy toy (--hidden 128 --layers 2: 55%)
    # overstates the ratio and a 70B model (1.5%) understates it.
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--mini-batch-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--context-len", type=int, default=24, help="extra teacher-context tokens")
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=2048, help="padded tokens per micro-batch")
    parser.add_argument("--chunk-size", type=int, default=256, help="fused-head tokens per chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one step of each algorithm)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this path")
    return parser.parse_args(argv)


def _model_dir(args: argparse.Namespace, tmp: str) -> str:
    """``--model``, whose vocabulary then sets ``args.vocab``; else a random tiny Qwen3 of the given sizes."""
    if args.model is not None:
        from transformers import AutoConfig

        args.vocab = AutoConfig.from_pretrained(args.model).vocab_size
        return args.model
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    heads = max(2, args.hidden // 32)
    return str(
        save_tiny_hf_model(
            Path(tmp) / "m",
            "qwen3",
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            vocab_size=args.vocab,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=32,
            intermediate_size=3 * args.hidden,
        )
    )


def _print_table(report: dict) -> None:
    results, ratio_t, ratio_m = report["results"], report["time_ratio"], report["memory_ratio"]
    phases = sorted({p for r in results.values() for p in r["phases_s"]})
    sys.stdout.write(f"LM head: {report['lm_head_flops_fraction']:.1%} of the per-token matmul FLOPs\n")
    sys.stdout.write(f"{'':14}{'grpo':>12}{'sdpg':>12}{'ratio':>10}\n")
    g, s = results["grpo"], results["sdpg"]
    sys.stdout.write(
        f"{'step (s)':14}{g['step_s']:12.3f}{s['step_s']:12.3f}{ratio_t:10.2f}  target <= {TIME_TARGET}\n"
    )
    for p in phases:
        gv, sv = g["phases_s"].get(p, 0.0), s["phases_s"].get(p, 0.0)
        sys.stdout.write(f"{'  ' + p:14}{gv:12.3f}{sv:12.3f}\n")
    sys.stdout.write(
        f"{'peak MB':14}{g['peak_extra_mb']:12.1f}{s['peak_extra_mb']:12.1f}{ratio_m:10.2f}  target <= {MEMORY_TARGET}"
        f"  ({g['memory_kind']})\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from sdpg_mcore.parallel.spawn import spawn_ranks
    from sdpg_mcore.plan.shape import ModelShape

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(args, tmp)
        model_config = json.loads((Path(model_dir) / "config.json").read_text())
        head_fraction = lm_head_flops_fraction(ModelShape.from_hf_config(model_config))
        results = spawn_ranks(_bench_both, 1, args=(model_dir, vars(args)), timeout_s=3600)[0]
    report = {
        "results": results,
        "time_ratio": results["sdpg"]["step_s"] / results["grpo"]["step_s"],
        "memory_ratio": results["sdpg"]["peak_extra_mb"] / max(results["grpo"]["peak_extra_mb"], 1e-9),
        "time_target": TIME_TARGET,
        "memory_target": MEMORY_TARGET,
        "lm_head_flops_fraction": head_fraction,
        "model_config": model_config,  # for tools/plan.py --against-bench
        "shape": {k: getattr(args, k) for k in SHAPE_KEYS},
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
