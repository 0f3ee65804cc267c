"""tools/make_tiny_model.py: the command makes a loadable model and prints its measurements."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_model.py"


def test_cli_writes_the_model_and_prints_its_measurements(tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--sft-steps", "2", "--batch-size", "2"]
    proc = subprocess.run(
        [*cmd, "--eval-prompts", "2", "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["sft_steps"] == 2 and 0.0 <= stats["student_acc_t1"] <= 1.0
    assert stats == {**json.loads((out / "warmstart.json").read_text())}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    help_text = subprocess.run(
        [sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True
    )
    assert "--teacher-fraction" in help_text.stdout
