"""Write the test fixtures that hold the SDPG reference's own outputs (lauyikfung/SDPG, a verl fork).

Tests that claim agreement with the reference compare against these JSON files instead of values
written by hand. The reference's code is not part of this repository: this script imports it from a
checkout named on the command line, runs its functions on the tests' inputs, and writes their outputs
with the provenance (repository, commit, file and function, package versions, this command) into

- ``tests/rewards/fixtures/reference_scores.json``: ``verl/utils/reward_score/__init__.py``
  ``default_compute_score`` on the reward table, the trap cases and the generated agreement cases;
- ``tests/algo/fixtures/reference_losses.json``: ``verl/trainer/ppo/core_algos.py`` losses,
  ``agg_loss``, the beta schedule, the GRPO advantage and the KL-in-reward on fixed fp64 inputs;
- ``tests/data/fixtures/reference_prompts.json``: ``verl/utils/dataset/rl_dataset.py``
  ``RLHFDataset`` on a parquet in the reference's teacher-context layout.

The reference needs a Python of its own (verl pins ``transformers<5`` and ``numpy<2``)::

    git clone https://github.com/lauyikfung/SDPG /tmp/sdpg_ref
    git -C /tmp/sdpg_ref checkout f71329ee8a69b6778c2083958872ff8ca425ddde
    python3.11 -m venv /tmp/sdpg_ref_venv
    /tmp/sdpg_ref_venv/bin/pip install torch==2.13.0 "numpy<2" omegaconf codetiming ray pillow \\
        "tensordict>=0.8,<=0.10,!=0.9.0" "transformers<5" "huggingface-hub<1" "datasets<4.3" \\
        "math-verify[antlr4_13_2]==0.9.0" pylatexenc pandas pyarrow
    PYTHONPATH=. /tmp/sdpg_ref_venv/bin/python tests/make_reference_fixtures.py --reference /tmp/sdpg_ref

``PYTHONPATH=.`` lets the script build its inputs with this repository's case generators (the reward
cases, the tiny tokenizer); the outputs come only from the reference's functions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_REPOSITORY = "https://github.com/lauyikfung/SDPG"
PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "tokenizers",
    "datasets",
    "math-verify",
    "latex2sympy2_extended",
)

# The generated agreement cases: tools/check_reward_agreement.py's generator, this many (--cases), this seed.
AGREEMENT_CASES = 300
AGREEMENT_SEED = 0


def load_module(path: Path, name: str):
    """Import one file of this repository by path (the tests' case lists, the tool's generator)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def provenance(reference: Path, functions: list[str], section: str) -> dict:
    commit = subprocess.run(
        ["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "repository": REFERENCE_REPOSITORY,
        "commit": commit,
        "functions": functions,
        "command": "PYTHONPATH=. <reference python> tests/make_reference_fixtures.py "
        f"--reference <checkout of {commit}> --only {section}",
        "python": sys.version.split()[0],
        "packages": versions,
    }


def outcome(fn, *args, **kwargs):
    """The reference's result as JSON: its dict, a float, or the name of the exception it raised."""
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        return "NotImplementedError"
    return result if isinstance(result, dict) else float(result)


def reward_fixture(reference: Path, num_cases: int = AGREEMENT_CASES) -> dict:
    """``default_compute_score`` in both answer formats on the table, the traps and the generated cases."""
    from verl.utils.reward_score import default_compute_score

    def both_formats(data_source: str, response: str, truth: str) -> dict:
        return {
            fmt: outcome(default_compute_score, data_source, response, truth, answer_format=fmt)
            for fmt in ("answer_colon", "boxed")
        }

    cases = load_module(REPO / "tests" / "rewards" / "trap_cases.py", "trap_cases")
    tool = load_module(REPO / "tools" / "check_reward_agreement.py", "check_reward_agreement")
    listed = {
        "table": [("math_dapo", r, t) for r, t, _ in cases.TABLE],
        "traps": [("math", r, t) for r, t in cases.TRAPS],
        "correct": [("math", r, t) for r, t in cases.CORRECT],
    }
    fixture = {
        "provenance": provenance(
            reference, ["verl/utils/reward_score/__init__.py:default_compute_score"], "rewards"
        ),
        "note": "Each case: data_source, response and ground truth (listed cases), or their digest "
        "(generated cases: tools/check_reward_agreement.py generate(n, seed, SOURCES + UNKNOWN_SOURCES)); "
        "the reference's outcome per answer_format.",
    }
    for name, triples in listed.items():
        fixture[name] = [
            {"data_source": s, "response": r, "truth": t, "reference": both_formats(s, r, t)}
            for s, r, t in triples
        ]
    generated = tool.generate(num_cases, AGREEMENT_SEED, tool.SOURCES + tool.UNKNOWN_SOURCES)
    fixture["generated"] = {
        "n": num_cases,
        "seed": AGREEMENT_SEED,
        "cases": [
            {"digest": tool.case_digest(s, r, t), "reference": both_formats(s, r, t)} for s, r, t in generated
        ],
    }
    return fixture


SECTIONS = {
    "rewards": (reward_fixture, REPO / "tests" / "rewards" / "fixtures" / "reference_scores.json"),
}


def to_json(value, indent: str = "") -> str:
    """JSON with one line per item of a list of records (small, and a regenerated fixture diffs by case)."""
    inner = indent + " "
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict | list) for v in value):
        items = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="git checkout of lauyikfung/SDPG")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="write only these")
    parser.add_argument("--cases", type=int, default=AGREEMENT_CASES, help="generated reward cases")
    parser.add_argument("--out", type=Path, default=None, help="write the one --only section here instead")
    args = parser.parse_args()
    sections = args.only or sorted(SECTIONS)
    if args.out is not None and len(sections) != 1:
        parser.error("--out needs exactly one --only section")
    reference = args.reference.resolve()
    sys.path.insert(0, str(reference))  # the reference's package `verl`, from the checkout
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "no prediction extracted" warnings
    for section in sections:
        build, path = SECTIONS[section]
        fixture = build(reference, args.cases) if section == "rewards" else build(reference)
        path = args.out or path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(fixture) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
