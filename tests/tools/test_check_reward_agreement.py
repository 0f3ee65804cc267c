"""tools/check_reward_agreement.py: its case generator (the reference code itself is not in the repo)."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_reward_agreement as tool  # noqa: E402


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


def test_help_and_missing_reference():
    out = subprocess.run([sys.executable, str(ROOT / "tools/check_reward_agreement.py"), "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "--reference" in out.stdout and "--timeout-s" in out.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools/check_reward_agreement.py")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--reference" in bad.stderr
