"""tools/bench_spawn.py end to end: both start methods, a row per method and size, table and JSON agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_spawn.py"


def test_both_methods_start_a_group_that_all_reduces(tmp_path):
    json_path = tmp_path / "spawn.json"
    out = subprocess.run(
        [sys.executable, str(TOOL), "--world-sizes", "2", "--repeats", "2", "--json", str(json_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["method"], r["world_size"]) for r in rows] == [("spawn", 2), ("forkserver", 2)]
    for row in rows:
        assert len(row["all_s"]) == 2 and all(s > 0 for s in row["all_s"])
        assert row["first_s"] == round(row["all_s"][0], 2)
        line = f"{row['method']:<11} {2:>5} {row['first_s']:>8.2f} {row['later_median_s']:>17.2f}"
        assert line in out.stdout
