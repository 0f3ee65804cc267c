"""SDPG vs DAPO, GRPO, OPSD, RLSD and guarded SDPG in miniature: equal tuning, unseen problems, several seeds.

    python tools/bench_algos.py --grid --out runs/bench_grid          # 6 x 4 tuning runs of 20 steps -> the tuned JSON
    python tools/bench_algos.py --out runs/bench_algos --seeds 1,2,3,4,5 --json runs/bench_algos/bench.json
    python tools/bench_algos.py --out /tmp/b --algos sdpg,dapo --seeds 1 --steps 5     # smoke run
    python tools/bench_algos.py --out runs/b algorithm.kl_clamp=10    # any trainer override, every run

The task (``sdpg_mcore.data.arithmetic``): ``a + b`` / ``a - b``, operands 0-9 (200 problems), the answer
in ``\\boxed{}``. Each seed holds out its own seeded quarter of the problems (50): the training data and
the warm start draw only from the other 150, so accuracy on the held-out ones (``final_acc``) measures
what the student learned to *solve*; ``final_acc_seen`` is accuracy on 50 training problems. The model
is the tiny Qwen3 of ``sdpg_mcore.train.warm_start``, warm-started per seed (its own split, data and
SFT seed; cached, shared by every algorithm of that seed) on *teacher* prompts only, which state the
answer: it learns the response format and to read the context, not the arithmetic, so the student
starts near chance and the teacher near 100 % — most GRPO groups are all wrong, and the self-teacher
knows what the student does not.

Tuning is equal (``sdpg_mcore.bench.tuning``): ``--grid`` runs every method at 2 learning rates x 2
values of its own main coefficient on one seed (``--grid-seed``, not a benchmark seed), with
evaluation off, chooses each method's point on training reward alone and writes ``--tuned``
(default ``examples/tiny/bench_algos_tuned.json``); a benchmark run reads the chosen settings there.

Each (algorithm, seed) is one ``sdpg_mcore.cli`` run in its own process (``--jobs`` at a time, one
thread each, its own rendezvous port, forked from a fork server that imported the trainer once),
evaluated every ``eval.interval`` steps (20) on both problem sets, the held-out one with the mechanism
probe (``sdpg_mcore/train/mechanism.py``). Finished runs are reused when the command is repeated with
the same ``--out``. Writes ``OUT/bench.json`` (or ``--json``), the figure
``OUT/bench.png`` (curves, mean ± s.e. over seeds) and prints a table (mean ± s.e. over seeds) and the
paired differences of SDPG and guarded SDPG over DAPO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sdpg_mcore.bench.stats import paired_difference, standard_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "tiny" / "bench_algos.yaml"
TUNED = ROOT / "examples" / "tiny" / "bench_algos_tuned.json"
HELDOUT, SEEN = "heldout", "seen"
K = 8  # eval.n_samples of the recipe: the avg@k read from the metrics
CPU_FILE = "cpu.json"  # a run's CPU seconds, its servers' and scorers' included (spawn.start_cli_run)
#: Mechanism metrics on the held-out problems, drawn and tabulated (key under ``mech/heldout/``, title).
MECH = (
    ("student_acc", "unseen problems: accuracy (student)"),
    ("teacher_acc", "unseen problems: accuracy (teacher prompt)"),
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


def seed_dir(out: Path, seed: int) -> Path:
    """The seed's warm-started model (``model/``) and task files (``data/``)."""
    return out / "seeds" / f"s{seed}"


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


@dataclass(frozen=True)
class Job:
    """One trainer run: which method, on which seed's model and data, with which overrides."""

    name: str
    """Benchmark method name (``tuning.BENCH_ALGOS``)."""
    seed: int
    rdir: Path
    steps: int
    overrides: tuple[str, ...]
    """The method's own and tuned settings, then the command line's."""
    evaluate: bool
    """Give the run the held-out and seen problem files (off for grid runs: they never see held-out)."""


def launch(out: Path, job: Job, config: Path):
    """One trainer run (one thread, a free rendezvous port), forked from the preloaded fork server in
    a session of its own (``spawn.start_cli_run``); output in RUN_DIR/train.log."""
    from sdpg_mcore.bench.tuning import BENCH_ALGOS
    from sdpg_mcore.parallel.spawn import find_free_port, start_cli_run

    job.rdir.mkdir(parents=True, exist_ok=True)
    data = seed_dir(out, job.seed) / "data"
    evals = [f"eval.files=[{data / (HELDOUT + '.jsonl')},{data / (SEEN + '.jsonl')}]"]
    argv = [
        "--config",
        str(config),
        f"model.path={seed_dir(out, job.seed) / 'model'}",
        f"data.train_files=[{data / 'train.jsonl'}]",
        *(evals if job.evaluate else ["eval.files=[]", "eval.interval=0"]),
        f"trainer.run_dir={job.rdir}",
        f"trainer.total_steps={job.steps}",
        f"trainer.seed={job.seed}",
        f"data.seed={job.seed}",
        f"algorithm.name={BENCH_ALGOS[job.name][0]}",
        "trainer.resume=none",
        *job.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(find_free_port())}
    (job.rdir / "metrics.jsonl").unlink(missing_ok=True)
    (job.rdir / "command.json").write_text(json.dumps(argv, indent=1) + "\n")
    (job.rdir / CPU_FILE).unlink(missing_ok=True)
    return start_cli_run(argv, env, job.rdir / "train.log", job.rdir / CPU_FILE)


def stop_all(running: dict) -> None:
    """SIGTERM every running run's process group (trainer and its rollout server), then wait for them."""
    for proc, _ in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in running.values():
        proc.join(timeout=30)
        if proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join()


def run_all(out: Path, jobs: list[Job], args) -> dict[str, float]:
    """Run the jobs ``args.jobs`` at a time (finished ones are reused); returns wall seconds per job."""
    pending = [j for j in jobs if not finished(j.rdir, j.steps)]
    running: dict = {}  # Job -> (its process, when it started)
    walls: dict[str, float] = {}
    retries: dict[Job, int] = {}
    try:
        _drive(out, pending, running, walls, retries, args)
    except BaseException:  # an error or Ctrl-C: leave no trainer or server behind
        stop_all(running)
        raise
    return walls


def _drive(out, pending, running, walls, retries, args) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            running[job] = (launch(out, job, args.config), time.perf_counter())
            print(f"[bench] started {job.rdir.name}", flush=True)
        time.sleep(1.0)
        for job, (proc, began) in list(running.items()):
            if proc.exitcode is None:
                continue
            del running[job]
            walls[job.rdir.name] = round(time.perf_counter() - began, 1)
            status = "done" if proc.exitcode == 0 else f"FAILED rc={proc.exitcode}"
            log = job.rdir / "train.log"
            print(f"[bench] {status}: {job.rdir.name} in {walls[job.rdir.name]} s (log {log})", flush=True)
            if proc.exitcode != 0:
                # A run can lose a race for a port to another process on the machine: retry it.
                retries[job] = retries.get(job, 0) + 1
                if retries[job] <= args.retries:
                    log.rename(log.with_name(f"train.failed{retries[job]}.log"))
                    pending.insert(0, job)
                    continue
                raise RuntimeError(f"run {job.rdir.name} failed; see {log}")


def curves(rows: list[dict]) -> dict[str, list]:
    """Per-evaluation series: steps, accuracy on unseen and on seen problems, the held-out probe's
    metrics; per training step (``train_step``) the reward, the KL and the response length."""
    evals = [r for r in rows if f"eval/{HELDOUT}/avg@{K}" in r]
    out: dict[str, list] = {"step": [r["step"] for r in evals]}
    out["acc"] = [r[f"eval/{HELDOUT}/avg@{K}"] for r in evals]
    out["acc_seen"] = [r.get(f"eval/{SEEN}/avg@{K}", math.nan) for r in evals]
    for key, _ in MECH:
        out[key] = [r.get(f"mech/{HELDOUT}/{key}", math.nan) for r in evals]
    steps = [r for r in rows if "reward_mean" in r]
    out["train_step"] = [r["step"] for r in steps]
    out["train_reward"] = [r.get("reward_mean") for r in steps]
    out["train_kl_mean"] = [r.get("kl_mean") for r in steps]
    out["train_response_len"] = [r.get("response_len_mean") for r in steps]
    return out


FINAL_KEYS = ("acc", "acc_seen", *(m for m, _ in MECH))
#: Per-step training metrics drawn beside the evaluations (curve key, title).
TRAIN_PANELS = (
    ("train_reward", "training reward"),
    ("train_kl_mean", "KL(student||teacher) per token"),
    ("train_response_len", "response length (tokens)"),
)


def mean_se(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return sum(vals) / len(vals), standard_error(vals)


def summarize(out: Path, algos: list[str], seeds: list[int]) -> dict:
    """Per method: ``final_acc`` / ``final_acc_seen`` over seeds, mean ± s.e. of every final metric,
    and per seed the curves."""
    result: dict = {}
    for algo in algos:
        per_seed = {}
        for seed in seeds:
            c = curves(load_metrics(run_dir(out, algo, seed) / "metrics.jsonl"))
            final = {key: c[key][-1] if c[key] else math.nan for key in FINAL_KEYS}
            per_seed[str(seed)] = {"final": final, "curve": c}
        entry = {
            "final_acc": [per_seed[str(s)]["final"]["acc"] for s in seeds],
            "final_acc_seen": [per_seed[str(s)]["final"]["acc_seen"] for s in seeds],
            "seeds": per_seed,
        }
        for key in FINAL_KEYS:
            mean, se = mean_se([per_seed[str(s)]["final"][key] for s in seeds])
            entry[f"final_{key}_mean"], entry[f"final_{key}_se"] = mean, se
        result[algo] = entry
    return result


def plot(summary: dict, out_png: Path) -> None:
    """Mean ± s.e. over seeds against the step, one panel per metric, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("acc", "unseen problems: accuracy"), ("acc_seen", "training problems: accuracy")]
    panels += [m for m in MECH if m[0] != "student_acc"]
    panels += [(k, f"{t} (every training step)") for k, t in TRAIN_PANELS]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for algo, entry in summary.items():
            x = "train_step" if key.startswith("train_") else "step"
            runs = [s["curve"] for s in entry["seeds"].values() if s["curve"].get(x)]
            if not runs:
                continue
            steps = runs[0][x]
            stats = [mean_se([r[key][i] for r in runs if i < len(r[key])]) for i in range(len(steps))]
            mean = [m for m, _ in stats]
            se = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.plot(steps, mean, label=algo, linewidth=1.6)
            ax.fill_between(
                steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)], alpha=0.18
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
        ("acc", "unseen acc"),
        ("acc_seen", "seen acc"),
        ("teacher_acc", "teacher acc (unseen)"),
        ("all_wrong_share", "all-wrong groups"),
        ("kl_incorrect", "KL wrong"),
        ("kl_correct", "KL right"),
        ("kl_grad_cos_student", "cos(KL grad, student correct)"),
    ]
    lines = [
        f"| method (final, mean ± s.e. over {seeds} seeds) | " + " | ".join(t for _, t in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for algo, e in summary.items():
        cells = [f"{e[f'final_{k}_mean']:.3f} ± {e[f'final_{k}_se']:.3f}" for k, _ in cols]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(summary: dict) -> dict:
    """Paired over seeds, on unseen and on seen problems: each SDPG variant minus DAPO (its KL term),
    minus GRPO; the issue's goal: guarded SDPG - DAPO >= 0.05 on unseen problems, every seed positive."""
    out: dict = {}
    for name in [a for a in summary if a.startswith("sdpg")]:
        for base in ("dapo", "grpo"):
            if base in summary:
                out[f"{name}_minus_{base}"] = {
                    split: paired_difference(summary[name][key], summary[base][key])
                    for split, key in (("unseen", "final_acc"), ("seen", "final_acc_seen"))
                }
    guarded = out.get("sdpg_guarded_minus_dapo")
    if guarded:
        unseen = guarded["unseen"]
        out["goal_met"] = bool(unseen["mean"] >= 0.05 and unseen["all_positive"])
    return out


def comparison_lines(comp: dict) -> str:
    lines = []
    for name, splits in comp.items():
        if isinstance(splits, dict):
            for split, d in splits.items():
                seeds = ", ".join(f"{x:+.3f}" for x in d["per_seed"])
                lines.append(f"{name} ({split}): {d['mean']:+.3f} ± {d['se']:.3f} s.e. [{seeds}]")
    if "goal_met" in comp:
        lines.append(f"goal (guarded SDPG - DAPO >= 0.05 on unseen, every seed positive): {comp['goal_met']}")
    return "\n".join(lines)


def write_result(out: Path, json_path: Path, result: dict, algos: list[str], seeds: list[int]) -> None:
    """Summary, paired comparisons, figure and table of the runs on disk into ``result``."""
    result["algos"] = summarize(out, algos, seeds)
    result["comparisons"] = comparisons(result["algos"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result["algos"], out / "bench.png")
    sys.stdout.write(table(result["algos"], len(seeds)) + "\n")
    sys.stdout.write(comparison_lines(result["comparisons"]) + "\n")


def _parser() -> argparse.ArgumentParser:
    from sdpg_mcore.bench.tuning import BENCH_ALGOS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_algos"))
    parser.add_argument("--algos", default=",".join(BENCH_ALGOS), help="comma-separated method names")
    parser.add_argument(
        "--seeds", default="1,2,3,4,5", help="comma-separated seeds (split, warm start, data, RL)"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=(os.cpu_count() or 1) + 1,
        help="runs at a time, one thread each (default: cores + 1, as a run's trainer and server take "
        "turns and keep a core busy ~90 %% of the time)",
    )
    parser.add_argument("--retries", type=int, default=2, help="reruns of a failed run before giving up")
    parser.add_argument("--config", type=Path, default=RECIPE, help="the trainer recipe every run uses")
    parser.add_argument("--tuned", type=Path, default=TUNED, help="chosen settings (written by --grid)")
    parser.add_argument("--grid", action="store_true", help="tune: run each method's grid, write --tuned")
    parser.add_argument("--grid-seed", type=int, default=0, help="the grid's one seed (not a benchmark seed)")
    parser.add_argument("--grid-steps", type=int, default=20, help="training steps per grid run")
    parser.add_argument(
        "--grid-window", type=int, default=10, help="last steps whose training reward decides"
    )
    parser.add_argument("--sft-steps", type=int, default=150, help="warm-start steps (once per seed)")
    parser.add_argument("--max-operand", type=int, default=9, help="operands lie in [0, max-operand]")
    parser.add_argument("--heldout-fraction", type=float, default=0.25, help="share of problems held out")
    parser.add_argument("--num-seen", type=int, default=50, help="training problems evaluated beside them")
    parser.add_argument("--json", type=Path, default=None, help="default OUT/bench.json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-summarize the finished runs under --out (keeps the JSON's wall and CPU time)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value trainer overrides for every run")
    return parser


def prepare_seed(out: Path, seed: int, args: argparse.Namespace) -> dict:
    """The seed's problem split, task files and warm-started model (made once, reused); its measurements."""
    from sdpg_mcore.data.arithmetic import split_problems, write_split_task

    root = seed_dir(out, seed)
    split = split_problems(max_operand=args.max_operand, heldout_fraction=args.heldout_fraction, seed=seed)
    write_split_task(root / "data", split, num_train=2048, num_seen=args.num_seen, seed=seed)
    if not (root / "model" / "model.safetensors").exists():
        print(f"[bench] warm start of seed {seed} (once, shared by every method)", flush=True)
        import torch

        from sdpg_mcore.train.warm_start import warm_start_tiny_model

        torch.set_num_threads(1)  # the warm start is bit-exact single-threaded
        warm_start_tiny_model(
            root / "model",
            seed=seed,
            sft_steps=args.sft_steps,
            teacher_fraction=1.0,
            max_operand=args.max_operand,
            problems=split.train,
            eval_problems=split.heldout,
        )
    return json.loads((root / "model" / "warmstart.json").read_text())


def warm_start_all(out: Path, seeds: list[int], args: argparse.Namespace) -> dict[str, dict]:
    """Every seed's :func:`prepare_seed`, ``--jobs`` at a time, each in a process of its own (one
    thread: the warm start is bit-exact single-threaded); one after the other left a core idle."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(args.jobs, len(seeds)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(prepare_seed, [out] * len(seeds), seeds, [args] * len(seeds))
        return {str(seed): result for seed, result in zip(seeds, results)}


def tuned_overrides(path: Path, algos: list[str]) -> dict[str, list[str]]:
    """Each method's chosen settings from the ``--grid`` file; exits 2 naming what to tune if absent."""
    chosen = json.loads(path.read_text())["algos"] if path.exists() else {}
    missing = [a for a in algos if a not in chosen]
    if missing:
        sys.stderr.write(
            f"bench_algos: no tuned settings for {missing} in {path}; run "
            f"'tools/bench_algos.py --grid --algos {','.join(missing)}' first (or pass --tuned FILE)\n"
        )
        raise SystemExit(2)
    return {a: chosen[a]["chosen"] for a in algos}


def grid(out: Path, algos: list[str], args: argparse.Namespace) -> int:
    """Run each method's grid on ``--grid-seed`` (no evaluation), choose on training reward, write ``--tuned``."""
    from sdpg_mcore.bench.tuning import BENCH_ALGOS, INHERITED, choose, grid_points

    tuned = json.loads(args.tuned.read_text()) if args.tuned.exists() else {"algos": {}}
    prepare_seed(out, args.grid_seed, args)
    for phase in ([a for a in algos if a not in INHERITED], [a for a in algos if a in INHERITED]):
        chosen = {name: entry["chosen"] for name, entry in tuned["algos"].items()}
        jobs = {
            algo: [
                Job(algo, args.grid_seed, out / "grid" / f"{algo}_g{i}", args.grid_steps,
                    (*BENCH_ALGOS[algo][1], *point, *args.overrides), evaluate=False)
                for i, point in enumerate(grid_points(algo, chosen))
            ]
            for algo in phase
        }  # fmt: skip
        run_all(out, [j for js in jobs.values() for j in js], args)
        for algo, runs in jobs.items():
            pick = choose(
                {str(i): load_metrics(j.rdir / "metrics.jsonl") for i, j in enumerate(runs)}, args.grid_window
            )
            points = [
                {"overrides": list(j.overrides), "train_reward": pick.scores[str(i)]}
                for i, j in enumerate(runs)
            ]
            tuned["algos"][algo] = {
                "chosen": list(runs[int(pick.key)].overrides),
                "train_reward": pick.train_reward,
                "points": points,
            }
            print(
                f"[grid] {algo}: {tuned['algos'][algo]['chosen']} (train reward {pick.train_reward:.3f})",
                flush=True,
            )
    command = " ".join(["bench_algos.py", *sys.argv[1:]])
    for algo in algos:
        tuned["algos"][algo]["command"] = command
    tuned["rule"] = (
        f"highest mean training reward (reward_mean) over the last {args.grid_window} of {args.grid_steps} "
        f"steps, seed {args.grid_seed}, evaluation off"
    )
    args.tuned.parent.mkdir(parents=True, exist_ok=True)
    args.tuned.write_text(json.dumps(tuned, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sdpg_mcore.bench.tuning import BENCH_ALGOS

    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> run_all stops its runs first
    began = time.perf_counter()
    out = args.out.resolve()
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = sorted(set(algos) - set(BENCH_ALGOS))
    if unknown:
        parser.error(f"--algos: unknown {unknown}; choose from {', '.join(BENCH_ALGOS)}")
    json_path = args.json or out / "bench.json"
    if args.report_only:
        write_result(out, json_path, json.loads(json_path.read_text()), algos, seeds)
        return 0
    if args.grid:
        return grid(out, algos, args)
    chosen = tuned_overrides(args.tuned, algos)
    warm = warm_start_all(out, seeds, args)
    jobs = [
        Job(a, s, run_dir(out, a, s), args.steps, (*BENCH_ALGOS[a][1], *chosen[a], *args.overrides), True)
        for s in seeds
        for a in algos
    ]
    walls = run_all(out, jobs, args)
    # The warm starts (this process's children) and the runs made now (each counts its own: spawn.start_cli_run).
    cpus = {
        j.rdir.name: json.loads((j.rdir / CPU_FILE).read_text())["cpu_s"]
        for j in jobs
        if j.rdir.name in walls
    }
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "command": " ".join(["bench_algos.py", *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps,
        "seeds": seeds,
        "jobs": args.jobs,
        "overrides": args.overrides,
        "tuned": {a: chosen[a] for a in algos},
        "warm_start": warm,
        "wall_s": round(time.perf_counter() - began, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime + sum(cpus.values()), 1),
        "load_average_end": os.getloadavg(),
        "run_wall_s": walls,
        "run_cpu_s": cpus,
    }
    write_result(out, json_path, result, algos, seeds)
    sys.stdout.write(
        f"wall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s; json {json_path}; figure {out / 'bench.png'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
