"""``tools/convert_hf.py`` command contract: to-mcore / to-hf round trip and error exits."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdpg_mcore.models.tiny import save_tiny_hf_model

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_hf.py"


def _run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_to_mcore_to_hf_round_trip(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="qwen2")
    res = _run(
        "to-mcore", "--hf", hf, "--out", tmp_path / "mc", "--tp", 2, "--pp", 2, "--json", tmp_path / "a.json"
    )
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "a.json").read_text())["tensors"] > 0
    res = _run("to-hf", "--mcore", tmp_path / "mc", "--out", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    src, back = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(src) == sorted(back) and all(torch.equal(src[k], back[k]) for k in src)


def test_errors_exit_2_with_the_fix(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="llama")
    res = _run("to-mcore", "--hf", hf, "--out", tmp_path / "mc", "--tp", 1, "--pp", 3)
    assert res.returncode == 2 and "--pp=3 does not divide num_hidden_layers=4" in res.stderr


def test_help():
    res = _run("--help")
    assert res.returncode == 0 and "to-mcore" in res.stdout


def test_bench_convert_help():
    bench = TOOL.parent / "bench_convert.py"
    res = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--size-gb" in res.stdout
