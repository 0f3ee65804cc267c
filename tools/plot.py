"""Plot training curves of one or more runs on one figure, and print a first-vs-last summary table.

    python tools/plot.py runs/sdpg runs/grpo --out runs/compare.png --smooth 5
    python tools/plot.py runs/sdpg --json          # the summary as JSON (no figure unless --out)

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per step, written by the trainer) and draws reward,
accuracy, KL, entropy and response length against the step, one panel each, one line per run.
Panels whose metric no run logged are left out. The summary compares the mean of the first and the
last ``--window`` steps per run (the tiny example's acceptance check).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

#: (metric key, panel title) in drawing order.
PANELS = (
    ("reward_mean", "reward"),
    ("acc", "accuracy"),
    ("kl_mean", "KL (student || teacher)"),
    ("entropy", "entropy"),
    ("response_len_mean", "response length"),
)


def load_run(run_dir: Path) -> list[dict]:
    """The step records of a run (torn or blank lines skipped), sorted by step; last record wins per step."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass a run directory that holds metrics.jsonl")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is not None:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def summarize(records: list[dict], window: int) -> dict[str, float | int | None]:
    """Mean of each panel metric over the first and the last ``window`` steps."""
    summary: dict[str, float | int | None] = {"steps": len(records)}
    for key, _ in PANELS:
        _, values = series(records, key)
        first = values[:window]
        last = values[-window:]
        summary[f"{key}_first"] = sum(first) / len(first) if first else None
        summary[f"{key}_last"] = sum(last) / len(last) if last else None
    return summary


def plot_runs(runs: dict[str, list[dict]], out: Path, smooth_window: int = 1) -> Path:
    """Draw every panel that has data into ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdpg_mcore.bench.stats import trailing_mean

    panels = [(k, t) for k, t in PANELS if any(series(r, k)[1] for r in runs.values())]
    if not panels:
        raise ValueError(f"none of {', '.join(k for k, _ in PANELS)} was logged by {', '.join(runs)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, records in runs.items():
            steps, values = series(records, key)
            if values:
                ax.plot(steps, trailing_mean(values, smooth_window), label=label, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument(
        "--labels", default="", help="comma-separated legend labels (default: directory names)"
    )
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1 = raw)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the first/last summary")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = parser.parse_args(argv)

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [p.name for p in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    try:
        runs = {label: load_run(path) for label, path in zip(labels, args.runs)}
        summary = {label: summarize(records, args.window) for label, records in runs.items()}
        out = args.out
        if out is None and not args.json:
            out = args.runs[0] / "curves.png"
        if out is not None:
            plot_runs(runs, out, args.smooth)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        json.dump({"runs": summary, "figure": str(out) if out else None}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    columns = ["steps"] + [f"{k}_{w}" for k, _ in PANELS for w in ("first", "last")]
    columns = [c for c in columns if any(s.get(c) is not None for s in summary.values())]
    width = max(len(label) for label in summary) + 2
    sys.stdout.write("run".ljust(width) + "  ".join(c.rjust(12) for c in columns) + "\n")
    for label, stats in summary.items():
        sys.stdout.write(label.ljust(width) + "  ".join(_fmt(stats.get(c)).rjust(12) for c in columns) + "\n")
    sys.stdout.write(f"figure: {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
