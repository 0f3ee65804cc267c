"""The checks that show other checks can fail run in CI: in the default suite where each takes under
a minute, else in ``.ci/run``'s step after it (``pytest -m ci``); and under CI the Slurm tests cannot
skip (``.ci/run`` sets ``CI=true``)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Each breaks the code on purpose, or runs it end to end against the real thing: a check that stopped
#: seeing anything would show here. Node id -> how many tests it must collect.
IN_DEFAULT_SUITE = {
    "tests/tools/test_device_audit.py": 12,  # the clean step (device, host; EMA and initial teachers), 7 mutants
    "tests/train/test_step_parity.py::test_step_matches_tp1[tp2pp2]": 1,  # TP2 x PP2 on 4 gloo ranks
}
IN_CI_STEP = {
    "tests/rollout/test_sglang_real.py::test_trainer_on_real_sglang": 2,  # the trainer on real SGLang
    "tests/examples/test_tiny_example.py::test_tiny_example_accuracy_rises": 1,  # the README's example learns
}


def _collected(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return [line for line in proc.stdout.splitlines() if "::" in line]


def _assert_collects(collected: list[str], required: dict[str, int]) -> None:
    for node, count in required.items():
        assert sum(line.startswith(node) for line in collected) == count, (node, collected)


def test_ci_runs_the_checks_that_show_other_checks_can_fail():
    files = sorted({node.split("::")[0] for node in (*IN_DEFAULT_SUITE, *IN_CI_STEP)})
    _assert_collects(_collected(*files), IN_DEFAULT_SUITE)  # pyproject's addopts: -m 'not slow'
    _assert_collects(_collected("-m", "ci", *files), IN_CI_STEP)
    run = (REPO / ".ci" / "run").read_text()
    assert "export CI=true" in run and "pytest -q -m ci" in run
