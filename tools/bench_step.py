"""Time and peak memory of one SDPG training step vs one GRPO step on the same batch, side by side.

    python tools/bench_step.py                                 # small CPU default, ~1 min
    python tools/bench_step.py --hidden 256 --layers 4 --vocab 32000 --response-len 256 --json
    python tools/bench_step.py --model /models/Qwen3-4B ...    # a real checkpoint (GPU)

Each algorithm runs in a fresh process (so peak memory is its own): the real trainer step
(``train.step.run_step``: old/ref log-probs, the teacher pass for SDPG, mini-batch updates through
Megatron's schedule and optimizer) on a fixed synthetic batch, without rollout or weight sync.
One warm-up step, then ``--repeats`` timed steps (median). Peak memory: ``torch.cuda.max_memory_allocated``
on GPU; on CPU the peak resident set size above the level before the timed steps (sampled every 2 ms).
Targets (DESIGN.md): time ratio <= 1.4, peak memory ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.4, 1.2


def _batch(args):
    from sdpg_mcore.train.batch import Response

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(args.prompts * args.n):
        prompt = torch.randint(5, args.vocab - 1, (args.prompt_len,), generator=g).tolist()
        context = torch.randint(5, args.vocab - 1, (args.context_len,), generator=g).tolist()
        out.append(
            Response(
                group=i // args.n,
                prompt_ids=prompt,
                teacher_prompt_ids=prompt + context,
                response_ids=torch.randint(5, args.vocab - 1, (args.response_len,), generator=g).tolist(),
                rollout_logprobs=[-1.0] * args.response_len,
                reward=float(i % 3 == 0),
                acc=float(i % 3 == 0),
            )
        )
    return out


class _PeakRss:
    """Peak RSS of this process while running, sampled by a thread."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return self.peak - self.base


def _bench_one(rank, world_size, algo_name: str, model_dir: str, args_dict: dict) -> dict:
    from sdpg_mcore import algo
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train.model_setup import OptimSettings, ReferenceWeights, build_policy
    from sdpg_mcore.train.step import StepContext, run_step

    args = argparse.Namespace(**args_dict)
    torch.manual_seed(0)
    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    optim = OptimSettings(1e-6, 0.0, 0, "constant", 0.1, 0.9, 0.999, 1e-8, 1.0, True)
    policy = build_policy(
        model_dir,
        layout,
        dtype=dtype,
        optim=optim,
        total_updates=100,
        vocab_size=args.vocab,
        chunk_size=args.chunk_size,
    )
    loss_cfg = algo.get_algorithm(algo_name).config_cls()
    reference = ReferenceWeights(policy, "cpu_swap", model_dir, layout, dtype)
    ctx = StepContext(
        policy=policy,
        reference=reference,
        algorithm=algo.get_algorithm(algo_name),
        loss_cfg=loss_cfg,
        layout=layout,
        temperature=1.0,
        token_budget=args.token_budget,
        mini_batch_groups=args.mini_batch_prompts,
        total_steps=100,
        pad_id=0,
    )
    batch = _batch(args)
    gpu = torch.cuda.is_available()
    run_step(ctx, 1, lambda s: (batch, {}), lambda s: None)  # warm-up: optimizer state, allocator
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        rss = _PeakRss()
    times, phases = [], {}
    for step in range(2, 2 + args.repeats):
        began = time.perf_counter()
        metrics = run_step(ctx, step, lambda s: (batch, {}), lambda s: None)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        for k, v in metrics.items():
            if k.startswith("time/"):
                phases.setdefault(k[5:], []).append(v)
    peak = (torch.cuda.max_memory_allocated() - base) if gpu else rss.stop()
    state.destroy()
    return {
        "step_s": statistics.median(times),
        "phases_s": {k: statistics.median(v) for k, v in phases.items()},
        "peak_extra_mb": peak / 2**20,
        "memory_kind": "cuda_max_allocated" if gpu else "cpu_peak_rss",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF model dir (default: a random tiny Qwen3 of the sizes below)"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--mini-batch-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--context-len", type=int, default=24, help="extra teacher-context tokens")
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=2048, help="padded tokens per micro-batch")
    parser.add_argument("--chunk-size", type=int, default=256, help="fused-head tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from sdpg_mcore.models.tiny import save_tiny_hf_model
    from sdpg_mcore.parallel.spawn import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            heads = max(2, args.hidden // 32)
            model_dir = str(
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
        else:
            from transformers import AutoConfig

            args.vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        results = {
            name: spawn_ranks(_bench_one, 1, args=(name, model_dir, vars(args)), timeout_s=3600)[0]
            for name in ("grpo", "sdpg")
        }
    ratio_t = results["sdpg"]["step_s"] / results["grpo"]["step_s"]
    ratio_m = results["sdpg"]["peak_extra_mb"] / max(results["grpo"]["peak_extra_mb"], 1e-9)
    report = {
        "results": results,
        "time_ratio": ratio_t,
        "memory_ratio": ratio_m,
        "time_target": TIME_TARGET,
        "memory_target": MEMORY_TARGET,
        "shape": {
            k: getattr(args, k)
            for k in (
                "hidden",
                "layers",
                "vocab",
                "prompts",
                "n",
                "prompt_len",
                "response_len",
                "context_len",
                "bf16",
            )
        },
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    phases = sorted({p for r in results.values() for p in r["phases_s"]})
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
