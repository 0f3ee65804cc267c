"""Wall time per step, synchronous vs asynchronous rollouts (``rollout.async_steps``), in one run.

    python tools/bench_async.py --json async.json                # the tiny example, 40 steps each
    python tools/bench_async.py --seeds 1 2 3 --json async.json  # accuracy over several seeds
    python tools/bench_async.py --steps 10 --set data.batch_prompts=16

For each mode (``rollout.async_steps=0``, then each ``--async-steps`` value) the tool starts a fresh
built-in rollout server (initial weights) pinned to ``--server-cpus`` with one torch thread, and the
trainer (``sdpg-train`` on ``examples/tiny/sdpg.yaml``, ``rollout.backend=external``) pinned to
``--trainer-cpus`` with one thread, so generation and training each own a core and the overlap can
show. It reports the mean ``step_seconds`` (rollout wait + training + weight push) over the steps
after the first (the first has nothing to overlap with), the accuracy over the steps, and
``speedup`` = synchronous / asynchronous seconds per step. Without ``taskset`` (or with one core)
the processes run unpinned and the table says so.

With several ``--seeds`` each seed runs every mode (``trainer.seed``), one after the other, and the
summary holds the mean over seeds: seconds per step, accuracy over the first and last ten steps, and
the paired difference async - sync in last-ten accuracy with its standard error over seeds. One
seed's 40-step accuracy curve moves by several points between seeds (each step scores
``batch_prompts * n`` samples), so "no worse than synchronous" is read from that difference.

The training accuracy of an asynchronous step comes from weights one version older than the
synchronous step's, so the tool also evaluates the held-out prompts (``test.jsonl`` of the data
directory: avg@k over ``--eval-samples`` samples each, every ``--eval-interval`` steps): both modes
score the same weight versions on the same prompts and sampling seeds, and the summary holds the
paired difference at each evaluation. Evaluation time is not part of the step time (the trainer
measures it apart), although in the asynchronous mode it shares the server with the next rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from sdpg_mcore.bench.async_runs import last10_accuracy, mean_or_nan, mode_name, report  # noqa: E402

RECIPE = REPO / "examples" / "tiny" / "sdpg.yaml"


def _pinned(cpus: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def _start_server(model_dir: Path, cpus: str | None, log_path: Path):
    from sdpg_mcore.parallel.spawn import find_free_port
    from sdpg_mcore.rollout.http import http_json

    port = find_free_port()
    cmd = [sys.executable, "-m", "sdpg_mcore.rollout.dev_server", "--model-path", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--num-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        _pinned(cpus, cmd),
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dev server exited ({proc.returncode}); see {log_path}")
        try:
            if http_json(f"{url}/health", timeout_s=2.0)[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"dev server not healthy after 600 s; see {log_path}")


def run_mode(args, async_steps: int, seed: int) -> dict:
    """One training run of ``args.steps`` steps against a fresh pinned server; its per-step numbers."""
    run_dir = args.out / f"seed{seed}" / mode_name(async_steps)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    server, url = _start_server(args.model_dir, args.server_cpus, run_dir / "server.log")
    overrides = [
        f"model.path={args.model_dir}",
        f"data.train_files=[{args.data_dir / 'train.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        f"trainer.total_steps={args.steps}",
        f"trainer.seed={seed}",
        "trainer.save_interval=0",
        "trainer.resume=none",
        "rollout.backend=external",
        f"rollout.urls=[{url}]",
        f"rollout.async_steps={async_steps}",
        f"rollout.async_cpus=[{args.server_cpus or ''}]",  # the client thread works beside the server
        "logging.progress=false",
        "logging.tensorboard=false",
        *_eval_overrides(args),
        *args.set,
    ]
    cmd = [sys.executable, "-m", "sdpg_mcore.cli", "--config", str(RECIPE), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    began = time.perf_counter()
    try:
        with open(run_dir / "trainer.log", "w") as log:
            rc = subprocess.run(
                _pinned(args.trainer_cpus, cmd), env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    if rc != 0:
        raise RuntimeError(f"{run_dir.name}: trainer exited {rc}; see {run_dir / 'trainer.log'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steady = [r["step_seconds"] for r in records[1:]] or [records[0]["step_seconds"]]
    return {
        "async_steps": async_steps,
        "seed": seed,
        "steps": len(records),
        "step_s": statistics.fmean(steady),
        "step_s_median": statistics.median(steady),
        "wall_s": time.perf_counter() - began,
        "acc": [r["acc"] for r in records],
        "eval": {str(r["step"]): v for r in records for k, v in r.items() if "/avg@" in k},
        "version_lag_max": max(r["rollout/version_lag_max"] for r in records),
        "logprob_mismatch_mean": statistics.fmean(r["logprob_mismatch"] for r in records),
    }


def _eval_overrides(args) -> list[str]:
    """Held-out evaluation every ``--eval-interval`` steps on the data directory's test prompts."""
    test = args.data_dir / "test.jsonl"
    if not args.eval_interval or not test.is_file():
        return ["eval.interval=0"]
    return [
        f"eval.files=[{test}]",
        f"eval.interval={args.eval_interval}",
        f"eval.n_samples={args.eval_samples}",
    ]


def _pinning(args) -> str:
    if args.no_pin or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        args.server_cpus = args.trainer_cpus = None
        return "unpinned"
    return f"server cpus {args.server_cpus}, trainer cpus {args.trainer_cpus}"


def _assets(args) -> None:
    """The tiny example's model and data (as examples/tiny/run.sh makes them), if missing."""
    if not (args.model_dir / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--out", str(args.model_dir)],
            check=True,
        )
    if not (args.data_dir / "train.jsonl").is_file():
        cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--synthetic", "arithmetic"]
        cmd += ["--out", str(args.data_dir), "--format", "jsonl", "--num-train", "2048", "--num-test", "64"]
        subprocess.run(cmd, check=True)


def print_table(out: dict) -> None:
    lines = [f"pinning: {out['pinning']}", ""]
    header = f"{'mode':<8} {'seed':>5} {'steps':>5} {'s/step':>8} {'median':>8} {'acc 1-10':>9} {'acc last10':>10} {'lag max':>8} {'mismatch':>9}"
    lines.append(header)
    for name, runs in out["runs"].items():
        for r in runs:
            lines.append(
                f"{name:<8} {r['seed']:>5} {r['steps']:>5} {r['step_s']:>8.3f} {r['step_s_median']:>8.3f} "
                f"{mean_or_nan(r['acc'][:10]):>9.3f} {last10_accuracy(r):>10.3f} {r['version_lag_max']:>8.0f} {r['logprob_mismatch_mean']:>9.2e}"
            )
    lines += [
        "",
        f"{'mode':<8} {'seeds':>5} {'s/step':>8} {'speedup':>8} {'acc 1-10':>9} {'acc last10':>10} {'last10 async-sync (se)':>24}",
    ]
    for name, r in out["results"].items():
        diff = "" if name == "sync" else f"{r['acc_last10_diff']:+.3f} ({r['acc_last10_diff_se']:.3f})"
        lines.append(
            f"{name:<8} {len(r['seeds']):>5} {r['step_s']:>8.3f} {r.get('speedup', 1.0):>8.2f} "
            f"{r['acc_first10']:>9.3f} {r['acc_last10']:>10.3f} {diff:>24}"
        )
    steps = list(out["results"]["sync"]["eval"])
    if steps:  # held-out avg@k of the same weight versions; async - sync (se) beside each
        lines += ["", f"{'held-out after step':<20}" + "".join(f"{step:>22}" for step in steps)]
        for name, r in out["results"].items():
            cells = [f"{r['eval'][step]:.3f}" for step in steps]
            if name != "sync":
                cells = [
                    f"{c} {r['eval_diff'][step]:+.3f} ({r['eval_diff_se'][step]:.3f})"
                    for c, step in zip(cells, steps)
                ]
            lines.append(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per mode")
    parser.add_argument(
        "--async-steps", type=int, nargs="+", default=[1], help="async_steps values to compare"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1], help="trainer.seed values; each runs every mode"
    )
    parser.add_argument("--model-dir", type=Path, default=REPO / "examples" / "tiny" / "model")
    parser.add_argument("--data-dir", type=Path, default=REPO / "runs" / "tiny_data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_async", help="run directories")
    parser.add_argument("--server-cpus", default="1", help="taskset CPU list of the rollout server")
    parser.add_argument("--trainer-cpus", default="0", help="taskset CPU list of the trainer")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the processes")
    parser.add_argument(
        "--eval-interval", type=int, default=10, help="held-out evaluation every N steps (0: none)"
    )
    parser.add_argument("--eval-samples", type=int, default=32, help="samples per held-out prompt (avg@k)")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for both modes")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    if args.steps < 2 or any(k < 1 for k in args.async_steps):
        parser.error("--steps must be >= 2 and every --async-steps >= 1")
    _assets(args)
    pinning = _pinning(args)
    per_seed: dict[str, list[dict]] = {mode_name(k): [] for k in [0, *args.async_steps]}
    for seed in args.seeds:
        for k in [0, *args.async_steps]:
            per_seed[mode_name(k)].append(run_mode(args, k, seed))
    out = report(per_seed, pinning)
    print_table(out)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
