"""Check ``compute_score_strict`` against the SDPG reference's own scores on generated responses.

The reference's outcomes (its verl fork's ``default_compute_score``, in both answer formats) come from
a fixture written by ``tests/make_reference_fixtures.py`` from a checkout of the reference; its code is
not part of this repository and this tool does not import it. The committed fixture holds 300
generated cases and the reward tests' listed cases; every case is scored by ours for both formats and
the results (score, acc, pred — or the exception for an unknown source) must be identical.

    python tools/check_reward_agreement.py                       # the committed fixture
    python tools/check_reward_agreement.py --timeout-s 10        # ours via the reward worker
    # 6,000 generated cases (write the larger fixture with the reference's Python first):
    PYTHONPATH=. <reference python> tests/make_reference_fixtures.py --reference <checkout> \\
        --only rewards --cases 6000 --out /tmp/reference_scores_6000.json
    python tools/check_reward_agreement.py --reference-scores /tmp/reference_scores_6000.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sdpg_mcore.rewards.agreement import compare  # noqa: E402

DEFAULT_FIXTURE = (
    Path(__file__).resolve().parents[1] / "tests" / "rewards" / "fixtures" / "reference_scores.json"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference-scores", type=Path, default=DEFAULT_FIXTURE,
        help="the reference's outcomes, written by tests/make_reference_fixtures.py (default: the committed one)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout-s", type=float, default=None, help="score ours in the reward worker under this limit"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write counts and the first disagreements here"
    )
    args = parser.parse_args()
    fixture = json.loads(args.reference_scores.read_text())
    start = time.monotonic()
    try:
        counts, disagreements = compare(fixture, args.timeout_s)
    except ValueError as err:  # a stale fixture: its generated cases are not the generator's any more
        parser.exit(2, f"error: {args.reference_scores}: {err}\n")
    total = sum(c["cases"] for c in counts.values())
    agree = sum(c["agree"] for c in counts.values())
    print(f"reference: {fixture['provenance']['repository']} @ {fixture['provenance']['commit'][:12]}")
    print(f"{'format/scorer':38s} {'cases':>6s} {'agree':>6s} {'ref correct':>11s}")
    for key in sorted(counts):
        c = counts[key]
        print(f"{key:38s} {c['cases']:6d} {c['agree']:6d} {c['ref_correct']:11d}")
    print(f"{'total':38s} {total:6d} {agree:6d}   ({time.monotonic() - start:.0f} s)")
    for d in disagreements[:5]:
        print("DISAGREE", json.dumps(d)[:400])
    if args.json:
        summary = {"total": total, "agree": agree, "counts": counts, "disagreements": disagreements,
                   "provenance": fixture["provenance"]}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0 if agree == total else 1


if __name__ == "__main__":
    sys.exit(main())
