"""Synchronous vs asynchronous rollout runs (``tools/bench_async.py``): per-mode means over seeds, and
each asynchronous run paired with the synchronous run of its seed.

A run is the dict ``tools/bench_async.py`` reads off one trainer's ``metrics.jsonl``: ``async_steps``,
``seed``, ``steps``, ``step_s`` (mean seconds per step after the first), ``step_s_median``, ``acc``
(training accuracy per step), ``eval`` (held-out avg@k by step), ``version_lag_max``,
``logprob_mismatch_mean``.

    out = report({"sync": [run_seed1, run_seed2], "async1": [...]}, pinning="unpinned")
    out["speedup"], out["results"]["async1"]["acc_last10_diff"], ...["acc_last10_diff_se"]
"""

from __future__ import annotations

import statistics

from sdpg_mcore.bench.stats import standard_error


def mode_name(async_steps: int) -> str:
    """``sync`` for ``rollout.async_steps=0``, else ``async<k>``."""
    return "sync" if async_steps == 0 else f"async{async_steps}"


def mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def last10_accuracy(run: dict) -> float:
    """Mean training accuracy over the run's last ten steps."""
    return mean_or_nan(run["acc"][-10:])


def summarise(runs: list[dict]) -> dict:
    """One mode over its seeds: means of the per-seed figures, and the mean accuracy curve."""
    curves = [r["acc"] for r in runs]
    eval_steps = sorted(set.intersection(*(set(r.get("eval", {})) for r in runs)), key=int)
    return {
        "async_steps": runs[0]["async_steps"],
        "seeds": [r["seed"] for r in runs],
        "steps": min(r["steps"] for r in runs),
        "step_s": mean_or_nan([r["step_s"] for r in runs]),
        "step_s_median": statistics.median([r["step_s_median"] for r in runs]),
        "acc": [mean_or_nan(list(step)) for step in zip(*curves)],
        "acc_first10": mean_or_nan([mean_or_nan(r["acc"][:10]) for r in runs]),
        "acc_last10": mean_or_nan([last10_accuracy(r) for r in runs]),
        "eval": {step: mean_or_nan([r["eval"][step] for r in runs]) for step in eval_steps},
        "version_lag_max": max(r["version_lag_max"] for r in runs),
        "logprob_mismatch_mean": mean_or_nan([r["logprob_mismatch_mean"] for r in runs]),
    }


def _paired(res: dict, sync: dict, runs: list[dict], sync_runs: list[dict]) -> None:
    """Each asynchronous run minus its seed's synchronous run: last-ten and held-out accuracy (se over seeds)."""
    diffs = [last10_accuracy(a) - last10_accuracy(s) for a, s in zip(runs, sync_runs)]
    res["acc_last10_diff"] = mean_or_nan(diffs)
    res["acc_last10_diff_se"] = standard_error(diffs)
    res["eval_diff"], res["eval_diff_se"] = {}, {}
    for step in res["eval"]:
        if step in sync["eval"]:
            eval_diffs = [a["eval"][step] - s["eval"][step] for a, s in zip(runs, sync_runs)]
            res["eval_diff"][step] = mean_or_nan(eval_diffs)
            res["eval_diff_se"][step] = standard_error(eval_diffs)


def report(per_seed: dict[str, list[dict]], pinning: str) -> dict:
    """``per_seed[mode]`` = that mode's runs in seed order; the summary the table and JSON show."""
    results = {name: summarise(runs) for name, runs in per_seed.items()}
    sync = results["sync"]
    for name, res in results.items():
        if name == "sync":
            continue
        res["speedup"] = sync["step_s"] / res["step_s"]
        _paired(res, sync, per_seed[name], per_seed["sync"])
    out = {"pinning": pinning, "results": results, "runs": per_seed}
    first_async = next((r for n, r in results.items() if n != "sync"), None)
    if first_async is not None:
        out["speedup"] = first_async["speedup"]
    return out
