"""model.transformer_impl: ``te`` stops sdpg-train at start-up (exit 2, naming the key, within 30 s)
when Transformer-Engine is missing or broken; ``auto`` says which spec it chose and why."""

import logging
import os
import subprocess
import sys
import time

import pytest

from sdpg_mcore.models.spec import TransformerImplError, resolve_transformer_impl

RECIPE = """
model: {{path: {model}}}
data: {{train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,
       batch_prompts: 4, mini_batch_prompts: 2}}
"""
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def recipe(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model))
    return str(path)


def _cli(
    *args: str, gpus: int | None = None, pythonpath: str | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """``sdpg-train`` as a process (``gpus``: as on a node with that many GPUs); returns it and its seconds."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    prefix = [sys.executable, "-m"]
    if gpus is not None:
        prefix += ["sdpg_mcore.audit.simulated_node", "--gpus", str(gpus), "-m"]
    began = time.monotonic()
    proc = subprocess.run(
        [*prefix, "sdpg_mcore.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
    return proc, time.monotonic() - began


def test_te_without_transformer_engine_exits_2_naming_the_key_within_30s(recipe):
    proc, seconds = _cli("--config", recipe, "model.transformer_impl=te")
    assert proc.returncode == 2, proc.stderr
    assert "sdpg-train: error: config key 'model.transformer_impl' is te" in proc.stderr
    assert "no CUDA device is visible" in proc.stderr  # this machine: no GPU
    assert seconds < 30
    proc, _ = _cli("--config", recipe, "model.transformer_impl=te", gpus=1)  # a GPU node without TE
    assert proc.returncode == 2 and "transformer_engine is not installed" in proc.stderr, proc.stderr


def test_te_that_is_installed_but_broken_exits_2_with_the_import_error(recipe, tmp_path):
    """An install whose import fails (ABI/CUDA mismatch: an undefined symbol) is refused, not skipped."""
    package = tmp_path / "site" / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '2.0.0'\n")
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    proc, seconds = _cli(
        "--config", recipe, "model.transformer_impl=te", gpus=1, pythonpath=str(tmp_path / "site")
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "import transformer_engine.pytorch failed: ImportError: libtransformer_engine.so: undefined symbol"
        in proc.stderr
    )
    assert "model.transformer_impl=auto" in proc.stderr and seconds < 30
    auto, _ = _cli("--config", recipe, "--print-config", "model.transformer_impl=auto", gpus=1,
                   pythonpath=str(tmp_path / "site"))  # fmt: skip
    assert auto.returncode == 0 and "transformer_impl: auto" in auto.stdout


def test_auto_and_local_log_the_spec_they_chose(caplog):
    with caplog.at_level(logging.INFO, logger="sdpg_mcore.models.spec"):
        assert resolve_transformer_impl("auto") is False
        assert resolve_transformer_impl("local") is False
    messages = [r.getMessage() for r in caplog.records]
    assert any("local spec (model.transformer_impl=auto: no CUDA device" in m for m in messages), messages
    assert any("local spec (model.transformer_impl=local)" in m for m in messages), messages
    with pytest.raises(
        TransformerImplError, match="'model.transformer_impl' got 'fast'; choose one of: auto, te, local"
    ):
        resolve_transformer_impl("fast")


def test_the_70b_recipe_demands_transformer_engine():
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples/llama3_70b/recipe.yaml").read_text()
    )
    assert recipe["model"]["transformer_impl"] == "te"
