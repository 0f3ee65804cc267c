"""tools/ holds thin commands over the package: no tool imports another tool (their shared logic lives in
``sdpg_mcore``), and none puts ``tools/`` on the import path."""

import ast
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_tool_imports_another_tool():
    tools = {path.stem for path in TOOLS.glob("*.py")}
    found = {path.name: sorted(imported_modules(path) & tools) for path in sorted(TOOLS.glob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}
    assert "bench_async" in tools and "plan" in tools  # the check sees the tools' names


def test_no_tool_puts_tools_on_the_import_path():
    for path in sorted(TOOLS.glob("*.py")):
        text = path.read_text()
        assert "resolve().parent))" not in text and "sys.path.insert(0, 'tools')" not in text, path.name


def test_the_check_sees_a_tool_import(tmp_path):
    (tmp_path / "a.py").write_text("import json\ndef f():\n    from bench_async import standard_error\n")
    assert imported_modules(tmp_path / "a.py") == {"json", "bench_async"}
