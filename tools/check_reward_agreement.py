"""Check ``compute_score_strict`` against the SDPG reference's own scoring code on generated responses.

The reference (its verl fork, ``verl/utils/reward_score/``) is not part of this repository: copy its
``__init__.py``, ``math_dapo.py``, ``gsm8k.py`` and ``math_verify.py`` into a directory (the
``deprecated`` import of ``__init__.py`` may be stubbed) and pass it as ``--reference``. Every case
is scored by the reference's ``default_compute_score(..., answer_format=F)`` and by ours for both
formats; results (score, acc, pred — or the exception for an unknown source) must be identical.

    python tools/check_reward_agreement.py --reference /tmp/refscore --cases 6000
    python tools/check_reward_agreement.py --reference /tmp/refscore --json /tmp/agree.json
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_cases import SOURCES, UNKNOWN_SOURCES, generate  # noqa: E402

from sdpg_mcore.rewards import compute_score_strict  # noqa: E402


def load_reference(directory: Path):
    init = directory / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "refscore", init, submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["refscore"] = module
    spec.loader.exec_module(module)
    return module.default_compute_score


def _outcome(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        return "NotImplementedError"
    return result if isinstance(result, dict) else float(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="directory with the reference's reward_score files"
    )
    parser.add_argument(
        "--cases", type=int, default=6000, help="generated responses (each scored in both formats)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=None, help="write counts and the first disagreements here"
    )
    args = parser.parse_args()
    reference = load_reference(args.reference)
    cases = list(generate(args.cases, args.seed, SOURCES + UNKNOWN_SOURCES))
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    disagreements = []
    start = time.monotonic()
    for data_source, response, truth in cases:
        scorer = "unknown" if data_source in UNKNOWN_SOURCES else data_source.split("/")[0]
        for answer_format in ("answer_colon", "boxed"):
            ref = _outcome(reference, data_source, response, truth, answer_format=answer_format)
            ours = _outcome(
                compute_score_strict,
                data_source,
                response,
                truth,
                answer_format=answer_format,
                timeout_s=None,
            )
            key = f"{answer_format}/{scorer}"
            counts[key]["cases"] += 1
            counts[key]["agree"] += ref == ours
            counts[key]["ref_correct"] += isinstance(ref, dict) and ref["acc"] or ref == 1.0
            if ref != ours and len(disagreements) < 50:
                disagreements.append(
                    {
                        "data_source": data_source,
                        "response": response,
                        "truth": truth,
                        "answer_format": answer_format,
                        "reference": ref,
                        "ours": ours,
                    }
                )
    total = sum(c["cases"] for c in counts.values())
    agree = sum(c["agree"] for c in counts.values())
    print(f"{'format/scorer':38s} {'cases':>6s} {'agree':>6s} {'ref correct':>11s}")
    for key in sorted(counts):
        c = counts[key]
        print(f"{key:38s} {c['cases']:6d} {c['agree']:6d} {c['ref_correct']:11d}")
    print(f"{'total':38s} {total:6d} {agree:6d}   ({time.monotonic() - start:.0f} s)")
    for d in disagreements[:5]:
        print("DISAGREE", json.dumps(d)[:400])
    if args.json:
        args.json.write_text(
            json.dumps(
                {"total": total, "agree": agree, "counts": counts, "disagreements": disagreements},
                indent=1,
                default=str,
            )
        )
    return 0 if agree == total else 1


if __name__ == "__main__":
    sys.exit(main())
