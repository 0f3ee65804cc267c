"""The project documents itself: no citation of a document outside the repository, links that resolve,
a README short enough to read, and headline figures that cannot drift from the benchmark doc."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_DOCS = re.compile(
    r"SDPG\.md|STYLE\.md|DESIGN\.md|SGLANG_CPU(?!_OMP_THREADS_BIND)|LOCAL_SLURM|\.\./shared|/work/shared"
)  # SGLANG_CPU_OMP_THREADS_BIND: SGLang's own environment variable, not a document
CHECKED = (
    "sdpg_mcore",
    "checkpoints_convert",
    "tools",
    "tests",
    "examples",
    "slurm",
    "README.md",
    "setup.py",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def tracked(*paths: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def test_no_file_cites_a_document_outside_the_repository():
    this = Path(__file__).resolve()
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in tracked(*CHECKED)
        if path != this and path.suffix not in (".json", ".parquet", ".png")
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_DOCS.search(line)
    ]
    assert hits == []


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in tracked("*.md"):
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []


def test_every_package_has_a_readme_linked_from_the_top_readme():
    readme = (REPO / "README.md").read_text()
    packages = [p for p in (REPO / "sdpg_mcore").iterdir() if (p / "__init__.py").exists()]
    assert len(packages) >= 10
    for package in packages:
        assert (package / "README.md").exists(), package.name
        assert f"sdpg_mcore/{package.name}/README.md" in readme, package.name


def test_readme_is_for_users():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250 and len(text.encode()) <= 12_000
    cells = [cell.strip() for line in text.splitlines() if line.startswith("|") for cell in line.split("|")]
    assert max(map(len, cells)) <= 200  # a sentence or two, not a paragraph
    assert text.count("<!-- example-command -->") == 1 and text.count("<!-- test-command -->") == 1


def headline_rows(readme: str) -> list[tuple[str, str]]:
    """``(what, result)`` of each row of the README's headline table, without the header."""
    table = readme.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line
    ]
    return [(what.strip(), result.strip()) for what, result in rows[1:]]


def figures_missing(readme: str, bench: str) -> list[tuple[str, str]]:
    """Numbers of the README's headline results that the benchmark doc does not state."""
    return [
        (what, number)
        for what, result in headline_rows(readme)
        for number in NUMBER.findall(result)
        if number not in bench
    ]


def test_headline_figures_are_the_benchmark_docs_figures():
    """Each number in the README's headline table appears in tools/README.md, beside its command."""
    readme = (REPO / "README.md").read_text()
    assert len(headline_rows(readme)) >= 6
    assert figures_missing(readme, (REPO / "tools" / "README.md").read_text()) == []


def test_the_figure_check_sees_a_changed_figure():
    readme = (REPO / "README.md").read_text()
    bench = (REPO / "tools" / "README.md").read_text()
    changed = readme.replace("time ratio 0.41", "time ratio 0.39")
    assert changed != readme and figures_missing(changed, bench) != []
