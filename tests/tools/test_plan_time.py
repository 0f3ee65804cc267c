"""tools/plan.py --time / --search / --validate end to end: the JSON beside the memory plan, the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plan.py"
RECIPE_70B = REPO / "examples" / "llama3_70b" / "recipe.yaml"
CLUSTER = ["--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_time_json_beside_the_memory_plan(tmp_path):
    out_json = tmp_path / "plan.json"
    out = _run("--config", str(RECIPE_70B), *CLUSTER, "--time", "--json", str(out_json), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out_json.read_text())
    assert plan["fits"] and plan["per_gpu_bytes"]["total"] > 0  # the memory plan is still there
    t = plan["time"]
    assert {"total_s", "phases", "tokens_per_s_per_gpu"} <= set(t)
    assert sum(t["phases"].values()) == pytest.approx(t["total_s"])
    assert {"generation", "old_logprob", "ref_logprob", "teacher", "train", "weight_sync"} <= set(t["phases"])
    assert t["gpus"] == 64 + 16  # 8 trainer nodes + the default 2 rollout nodes
    tokens = 128 * 8 * (t["assumed"]["mean_prompt_len"] + t["assumed"]["mean_response_len"])
    assert t["tokens_per_s_per_gpu"] == pytest.approx(tokens / t["total_s"] / t["gpus"])
    assert t["hardware"].startswith("NVIDIA H100")
    assert "predicted step on NVIDIA H100" in out.stdout and "tokens/s/GPU" in out.stdout


def test_search_ranks_fitting_layouts_and_says_why(tmp_path):
    out_json = tmp_path / "plan.json"
    out = _run("--config", str(RECIPE_70B), *CLUSTER, "--search", "--json", str(out_json), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out_json.read_text())
    ranked = plan["search"]
    assert len(ranked) >= 3
    assert [r["total_s"] for r in ranked] == sorted(r["total_s"] for r in ranked)
    assert all(r["peak_gib"] <= 80 for r in ranked)
    best = ranked[0]["layout"]
    label = f"TP{best['tp']} PP{best['pp']} CP{best['cp']} DP{best['dp']}"
    assert plan["why"] and all(line.startswith(f"{label} beats") for line in plan["why"])
    assert "fitting layouts, fastest first" in out.stdout and f"why: {label}" in out.stdout


def test_head_bytes_and_hardware_change_the_prediction(tmp_path):
    def total(*extra: str) -> float:
        path = tmp_path / "t.json"
        out = _run("--config", str(RECIPE_70B), *CLUSTER, "--time", "--json", str(path), *extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(path.read_text())["time"]["total_s"]

    triton, h200 = total(), total("--hardware", "h200")
    torch_head, torch_bytes = total("--logprob-backend", "torch"), total("--head-bytes", "130")
    assert triton < torch_bytes < torch_head and h200 < triton  # torch's log-prob passes move 40 B, not 8


def test_validate_prints_every_published_run(tmp_path):
    out_json = tmp_path / "v.json"
    out = _run("--validate", "--json", str(out_json), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out_json.read_text())["validation"]
    assert len(rows) == 5 and all(abs(r["total_error"]) <= 0.25 for r in rows if r["checked"])
    assert "nemo_rl_v0.3_llama3.1_70b:" in out.stdout and "[not asserted]" in out.stdout


def test_bad_time_input_exits_2(tmp_path):
    out = _run("--config", str(RECIPE_70B), *CLUSTER, "--time", "--rollout-tp", "3", cwd=tmp_path)
    assert out.returncode == 2 and "rollout GPUs" in out.stderr
    out = _run("--time", cwd=tmp_path)
    assert out.returncode == 2 and "--config is required" in out.stderr
