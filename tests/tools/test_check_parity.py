"""``tools/check_parity.py``: spawns its own gloo ranks and prints a JSON report as its last line."""

import json
import subprocess
import sys
from pathlib import Path

from checkpoints_convert.convert import hf_to_mcore
from sdpg_mcore.models.tiny import save_tiny_hf_model

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_parity.py"


def test_check_parity_from_converted_checkpoint(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", arch="llama")
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    res = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--hf",
            str(hf),
            "--tp",
            "1",
            "--pp",
            "1",
            "--mcore",
            str(tmp_path / "mc"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4 and report["tokens"] == 32 and report["source"] == "mcore"


def test_help():
    res = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--mcore" in res.stdout


def test_check_parity_refuses_other_config_and_bad_tp(tmp_path):
    llama = save_tiny_hf_model(tmp_path / "llama", arch="llama")
    qwen3 = save_tiny_hf_model(tmp_path / "qwen3", arch="qwen3")
    hf_to_mcore(llama, tmp_path / "mc")
    res = subprocess.run(
        [sys.executable, str(TOOL), "--hf", str(qwen3), "--mcore", str(tmp_path / "mc")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "converted from a different model config" in res.stderr
    res = subprocess.run(
        [sys.executable, str(TOOL), "--hf", str(llama), "--tp", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "--tp=4 does not divide num_key_value_heads=2" in res.stderr
