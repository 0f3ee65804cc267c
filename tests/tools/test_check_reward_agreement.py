"""tools/check_reward_agreement.py: the case generator (``sdpg_mcore.rewards.agreement``), and ours against the reference's own scores.

The reference's outcomes are the committed fixture ``tests/rewards/fixtures/reference_scores.json``,
written by ``tests/make_reference_fixtures.py`` from a checkout of the reference (its code is not in
this repository); the tool scores every case with ``compute_score_strict`` and must agree on all.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sdpg_mcore.rewards import agreement as tool

ROOT = Path(__file__).resolve().parents[2]

TOOL = ROOT / "tools" / "check_reward_agreement.py"
FIXTURE = ROOT / "tests" / "rewards" / "fixtures" / "reference_scores.json"


def test_generator_is_deterministic_and_varied():
    cases = list(tool.generate(3000, seed=3, sources=tool.SOURCES + tool.UNKNOWN_SOURCES))
    assert cases == list(tool.generate(3000, seed=3, sources=tool.SOURCES + tool.UNKNOWN_SOURCES))
    assert cases != list(tool.generate(3000, seed=4, sources=tool.SOURCES + tool.UNKNOWN_SOURCES))
    sources = Counter(source for source, _, _ in cases)
    assert set(sources) == set(tool.SOURCES + tool.UNKNOWN_SOURCES)
    responses = [r for _, r, _ in cases]
    for marker in ("\\boxed{", "Answer:", "answer :", "Answer:\n", "\\boxed ", "\\fbox{", "#### "):
        assert sum(marker in r for r in responses) > 30, marker
    assert sum(len(r) > 800 for r in responses) > 300  # answers outside the reference's 300/500 tails
    assert sum(truth in r for _, r, truth in cases) > 1000  # many correct answers, not only wrong ones


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def test_strict_scorer_agrees_with_the_reference_on_every_fixture_case(tmp_path):
    fixture = json.loads(FIXTURE.read_text())
    listed = sum(len(fixture[s]) for s in ("table", "traps", "correct"))
    out = _run("--json", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert out.returncode == 0, out.stdout[-2000:]
    assert summary["total"] == summary["agree"] == 2 * (listed + fixture["generated"]["n"])
    assert fixture["generated"]["n"] >= 300 and summary["disagreements"] == []
    scorers = {key.split("/")[1] for key in summary["counts"]}
    assert {"math_dapo", "aime24", "math_500", "openai", "unknown"} <= scorers  # every reference dispatch
    unknown = fixture["generated"]["cases"]
    assert any(c["reference"]["boxed"] == "NotImplementedError" for c in unknown)
    assert summary["provenance"]["commit"] == fixture["provenance"]["commit"]


def test_a_changed_reference_outcome_or_generator_fails(tmp_path):
    fixture = json.loads(FIXTURE.read_text())
    row = json.loads(json.dumps(fixture["table"][0]))
    row["reference"]["boxed"]["acc"] = not row["reference"]["boxed"]["acc"]
    no_generated = {"n": 0, "seed": 0, "cases": []}
    (tmp_path / "wrong.json").write_text(
        json.dumps(dict(fixture, table=[row], traps=[], correct=[], generated=no_generated))
    )
    out = _run("--reference-scores", tmp_path / "wrong.json")
    assert out.returncode == 1 and "DISAGREE" in out.stdout
    stale = {"n": 3, "seed": fixture["generated"]["seed"] + 1, "cases": fixture["generated"]["cases"][:3]}
    (tmp_path / "stale.json").write_text(
        json.dumps(dict(fixture, table=[], traps=[], correct=[], generated=stale))
    )
    out = _run("--reference-scores", tmp_path / "stale.json")
    assert out.returncode == 2 and "no longer produces the fixture's cases" in out.stderr


def test_help():
    out = _run("--help")
    assert out.returncode == 0 and "--reference-scores" in out.stdout and "--timeout-s" in out.stdout
