"""Stage ``parity``: Megatron vs ``transformers`` fp32 logits on tiny Llama and Qwen3 models, through
``tools/check_parity.py`` at :data:`PARITY_TOL` (the parity tests' bound), each in its own process, with the
layer spec the trainer would pick (Transformer-Engine when it imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sdpg_mcore.audit.gpu_check import common

PARITY_TOL = 1e-4
"""Largest max |logit difference| (fp32): the bound the CPU parity tests hold (``checkpoints_convert/README.md``)."""


def check(hf_dir: str, *, mcore: str | None = None, timeout_s: float = 120.0) -> dict:
    """``tools/check_parity.py`` on ``hf_dir`` (weights from ``mcore`` when given) at :data:`PARITY_TOL`:
    its JSON report with the exit code (1: over the limit)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "parity.json"
        command = [sys.executable, str(common.TOOLS / "check_parity.py"), "--hf", hf_dir, "--json", str(report),
                   "--tol", str(PARITY_TOL)] + (["--mcore", mcore] if mcore else [])  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        out = json.loads(report.read_text()) if report.exists() else {"error": proc.stderr[-2000:]}
    return out | {"returncode": proc.returncode}


def run(cpu: bool) -> dict:
    from sdpg_mcore.models.spec import te_available
    from sdpg_mcore.models.tiny import save_tiny_hf_model

    out = {"spec": "transformer_engine" if te_available() else "local", "tol": PARITY_TOL}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen3"):
            with common.phase(f"parity {arch}"):
                model_dir = save_tiny_hf_model(Path(tmp) / arch, arch)
                out[arch] = check(str(model_dir), timeout_s=common.stage_limit("parity", cpu) / 2 - 2)
    out["ok"] = all(out[a].get("returncode") == 0 for a in ("llama", "qwen3"))
    return out
