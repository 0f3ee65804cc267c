"""SDPG vs GRPO vs OPSD vs RLSD in miniature: same model, data and step budget, several seeds, one go.

    python tools/bench_algos.py --out runs/bench_algos --json runs/bench_algos/bench.json   # 4 x 5 runs
    python tools/bench_algos.py --out /tmp/b --algos sdpg,grpo --seeds 0 --steps 5     # smoke run
    python tools/bench_algos.py --out runs/b algorithm.beta=0.2                        # any trainer override

The task (examples/tiny/bench_algos.yaml): one-digit ``a + b`` / ``a - b`` with the answer in
``\\boxed{}`` (``sdpg_mcore.data.arithmetic``). The model is the tiny Qwen3 of ``tools/make_tiny_model.py``
(``sdpg_mcore.train.warm_start``), warm-started once (shared by every run) mostly on *teacher*
prompts, which state the answer: it learns the response format and to read the context, not the
arithmetic, so the student starts near 10 % accuracy and the teacher near 90 % — most GRPO groups are
all wrong, and the self-teacher knows what the student does not.
Held-out prompts are a separate sample of the same distribution (the problem space has 200 members,
so the training prompts cover it: "held-out" means unseen prompts, not unseen problems).

Each (algorithm, seed) is one ``sdpg_mcore.cli`` run in its own process (``--jobs`` at a time, one
thread each, its own rendezvous port), evaluated every ``eval.interval`` steps with the mechanism
probe (``sdpg_mcore/train/mechanism.py``). The seed sets the rollout sampling, the prompt order and
torch's seed; the warm-started model is the same for every run. Finished runs are reused when the
command is repeated with the same ``--out``. Writes ``OUT/bench.json`` (or ``--json``), the figure
``OUT/bench.png`` (mean ± std over seeds), and prints a table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "tiny" / "bench_algos.yaml"
ALGOS = ("sdpg", "grpo", "opsd", "rlsd")
HELDOUT = "heldout"
#: Mechanism metrics drawn and tabulated (key under ``mech/heldout/``, title).
MECH = (
    ("student_acc", "held-out accuracy (student)"),
    ("teacher_acc", "held-out accuracy (teacher prompt)"),
    ("all_wrong_share", "share of all-wrong groups"),
    ("student_logp_ref", "log p(correct response), student"),
    ("teacher_logp_ref", "log p(correct response), teacher"),
    ("kl_incorrect", "KL(student||teacher), wrong samples"),
    ("kl_correct", "KL(student||teacher), right samples"),
    ("kl_grad_cos_student", "cos(KL grad, student -log p(correct) grad)"),
    ("kl_grad_cos_teacher", "cos(KL grad, teacher -log p(correct) grad)"),
)


def run_dir(out: Path, algo: str, seed: int) -> Path:
    return out / "runs" / f"{algo}_s{seed}"


def load_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def finished(rdir: Path, steps: int) -> bool:
    return any(r.get("step") == steps for r in load_metrics(rdir / "metrics.jsonl"))


def launch(out: Path, algo: str, seed: int, args, overrides: list[str]) -> subprocess.Popen:
    """One trainer process (one thread, a free rendezvous port); output in RUN_DIR/train.log."""
    from sdpg_mcore.parallel.spawn import find_free_port

    rdir = run_dir(out, algo, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "sdpg_mcore.cli",
        "--config",
        str(args.config),
        f"model.path={out / 'model'}",
        f"data.train_files=[{out / 'data' / 'train.jsonl'}]",
        f"eval.files=[{out / 'data' / (HELDOUT + '.jsonl')}]",
        f"trainer.run_dir={rdir}",
        f"trainer.total_steps={args.steps}",
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        f"algorithm.name={algo}",
        "trainer.resume=none",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(find_free_port())}
    (rdir / "metrics.jsonl").unlink(missing_ok=True)
    log = open(rdir / "train.log", "w")  # noqa: SIM115 - closed by the child's exit
    # Own session: stopping the bench stops the run's whole process group, rollout server included.
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_all(running: dict) -> None:
    """SIGTERM every running run's process group (trainer and its rollout server), then wait for them."""
    for proc, _ in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in running.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def run_all(out: Path, jobs: list[tuple[str, int]], args, overrides: list[str]) -> dict[str, float]:
    """Run the (algo, seed) jobs ``args.jobs`` at a time; returns wall seconds per job."""
    pending = [j for j in jobs if not finished(run_dir(out, *j), args.steps)]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    walls: dict[str, float] = {}
    retries: dict[tuple[str, int], int] = {}
    try:
        _drive(out, pending, running, walls, retries, args, overrides)
    except BaseException:  # an error or Ctrl-C: leave no trainer or server behind
        stop_all(running)
        raise
    return walls


def _drive(out, pending, running, walls, retries, args, overrides) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            running[job] = (launch(out, *job, args, overrides), time.perf_counter())
            print(f"[bench] started {job[0]} seed {job[1]}", flush=True)
        time.sleep(1.0)
        for job, (proc, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[job]
            walls[f"{job[0]}_s{job[1]}"] = round(time.perf_counter() - began, 1)
            status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
            print(
                f"[bench] {status}: {job[0]} seed {job[1]} in {walls[f'{job[0]}_s{job[1]}']} s "
                f"(log {run_dir(out, *job) / 'train.log'})",
                flush=True,
            )
            if proc.returncode != 0:
                # A run can lose a race for a port to another process on the machine: retry it.
                retries[job] = retries.get(job, 0) + 1
                if retries[job] <= args.retries:
                    log = run_dir(out, *job) / "train.log"
                    log.rename(log.with_name(f"train.failed{retries[job]}.log"))
                    pending.insert(0, job)
                    continue
                raise RuntimeError(f"run {job} failed; see {run_dir(out, *job) / 'train.log'}")


def curves(rows: list[dict], k: int) -> dict[str, list]:
    """Per-evaluation series: steps, held-out accuracy and every mechanism metric."""
    evals = [r for r in rows if f"eval/{HELDOUT}/avg@{k}" in r]
    out: dict[str, list] = {"step": [r["step"] for r in evals]}
    out["acc"] = [r[f"eval/{HELDOUT}/avg@{k}"] for r in evals]
    for key, _ in MECH:
        out[key] = [r.get(f"mech/{HELDOUT}/{key}", math.nan) for r in evals]
    out["train_acc"] = [r.get("acc") for r in rows]
    out["train_kl_mean"] = [r.get("kl_mean") for r in rows]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(out: Path, algos: list[str], seeds: list[int], k: int) -> dict:
    result: dict = {}
    for algo in algos:
        per_seed = {}
        for seed in seeds:
            c = curves(load_metrics(run_dir(out, algo, seed) / "metrics.jsonl"), k)
            final = {key: c[key][-1] if c[key] else math.nan for key in ("acc", *(m for m, _ in MECH))}
            per_seed[str(seed)] = {"final_acc": final["acc"], "final": final, "curve": c}
        entry = {"final_acc": [per_seed[str(s)]["final_acc"] for s in seeds], "seeds": per_seed}
        for key in ("acc", *(m for m, _ in MECH)):
            mean, std = mean_std([per_seed[str(s)]["final"][key] for s in seeds])
            entry[f"final_{key}_mean"], entry[f"final_{key}_std"] = mean, std
        result[algo] = entry
    return result


def plot(summary: dict, out_png: Path) -> None:
    """Mean ± std over seeds against the step, one panel per metric, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("acc", "held-out accuracy")] + [m for m in MECH if m[0] != "student_acc"]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for algo, entry in summary.items():
            runs = [s["curve"] for s in entry["seeds"].values() if s["curve"]["step"]]
            if not runs:
                continue
            steps = runs[0]["step"]
            stats = [mean_std([r[key][i] for r in runs if i < len(r[key])]) for i in range(len(steps))]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            ax.plot(steps, mean, label=algo, linewidth=1.6)
            ax.fill_between(
                steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.18
            )
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def table(summary: dict, seeds: int) -> str:
    cols = [
        ("acc", "held-out acc"),
        ("teacher_acc", "teacher acc"),
        ("all_wrong_share", "all-wrong groups"),
        ("student_logp_ref", "log p(correct)"),
        ("kl_incorrect", "KL wrong"),
        ("kl_correct", "KL right"),
        ("kl_grad_cos_student", "cos(KL grad, student correct)"),
    ]
    lines = [
        f"| algorithm (final, mean ± std over {seeds} seeds) | " + " | ".join(t for _, t in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for algo, e in summary.items():
        cells = [f"{e[f'final_{k}_mean']:.3f} ± {e[f'final_{k}_std']:.3f}" for k, _ in cols]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal(summary: dict) -> dict | None:
    """The issue's bar: SDPG's mean final accuracy >= GRPO's + 0.05, and SDPG's worst seed above GRPO's mean."""
    if "sdpg" not in summary or "grpo" not in summary:
        return None
    sdpg, grpo = summary["sdpg"], summary["grpo"]
    margin = sdpg["final_acc_mean"] - grpo["final_acc_mean"]
    worst = min(sdpg["final_acc"])
    return {
        "sdpg_minus_grpo": margin,
        "sdpg_worst_seed": worst,
        "grpo_mean": grpo["final_acc_mean"],
        "met": bool(margin >= 0.05 and worst > grpo["final_acc_mean"]),
    }


def report(out: Path, json_path: Path, algos: list[str], seeds: list[int]) -> int:
    """Rewrite ``json_path``'s summary, figure and table from the runs on disk (after a code change)."""
    result = json.loads(json_path.read_text())
    result["algos"] = summarize(out, algos, seeds, k=8)
    result["goal"] = goal(result["algos"])
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result["algos"], out / "bench.png")
    sys.stdout.write(table(result["algos"], len(seeds)) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_algos"))
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated algorithm names")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a failed run before giving up")
    parser.add_argument("--config", type=Path, default=RECIPE, help="the trainer recipe every run uses")
    parser.add_argument("--sft-steps", type=int, default=150, help="warm-start steps (made once)")
    parser.add_argument(
        "--teacher-fraction",
        type=float,
        default=1.0,
        help="share of warm-start rows under the teacher prompt",
    )
    parser.add_argument("--max-operand", type=int, default=4, help="operands lie in [0, max-operand]")
    parser.add_argument("--num-heldout", type=int, default=64, help="held-out prompts")
    parser.add_argument("--json", type=Path, default=None, help="default OUT/bench.json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-summarize the finished runs under --out (keeps the JSON's wall and CPU time)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value trainer overrides for every run")
    return parser


def _warm_start(out: Path, args: argparse.Namespace) -> dict:
    """The shared warm-started model under ``OUT/model`` (made once); its measurements."""
    if not (out / "model" / "model.safetensors").exists():
        print("[bench] warm start (once, shared by every run)", flush=True)
        import torch

        from sdpg_mcore.train.warm_start import warm_start_tiny_model

        torch.set_num_threads(1)  # the warm start is bit-exact single-threaded
        warm_start_tiny_model(
            out / "model",
            sft_steps=args.sft_steps,
            teacher_fraction=args.teacher_fraction,
            max_operand=args.max_operand,
        )
    return json.loads((out / "model" / "warmstart.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> run_all stops its runs first
    began = time.perf_counter()
    out = args.out.resolve()
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = sorted(set(algos) - set(ALGOS) - {"dapo"})
    if unknown:
        parser.error(f"--algos: unknown {unknown}; choose from {ALGOS + ('dapo',)}")
    json_path = args.json or out / "bench.json"
    if args.report_only:
        return report(out, json_path, algos, seeds)
    warm = _warm_start(out, args)
    from sdpg_mcore.data.arithmetic import write_arithmetic_task

    write_arithmetic_task(out / "data", {"train": 2048, HELDOUT: args.num_heldout}, args.max_operand)
    jobs = [(a, s) for s in seeds for a in algos]
    walls = run_all(out, jobs, args, args.overrides)
    k = 8
    summary = summarize(out, algos, seeds, k)
    wall = round(time.perf_counter() - began, 1)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished run, its server included
    cpu = round(usage.ru_utime + usage.ru_stime, 1)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps,
        "seeds": seeds,
        "jobs": args.jobs,
        "overrides": args.overrides,
        "warm_start": warm,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_end": os.getloadavg(),
        "run_wall_s": walls,
        "algos": summary,
        "goal": goal(summary),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, out / "bench.png")
    sys.stdout.write(table(summary, len(seeds)) + "\n")
    sys.stdout.write(
        f"warm start: student acc {warm['student_acc_t1']:.3f}, teacher acc {warm['teacher_acc_t1']:.3f}\n"
    )
    sys.stdout.write(
        f"wall {wall:.0f} s, CPU {cpu:.0f} s (runs and their servers); json {json_path}; "
        f"figure {out / 'bench.png'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
