"""sdpg-train's start-up checks of the node (cli.check_node), through the real entry point as a process:
``model.transformer_impl=te`` without a working Transformer-Engine, and launched SGLang servers on a
trainer's GPU, stop it with exit 2 naming the keys, in seconds. GPU nodes are simulated
(``sdpg_mcore.audit.simulated_node``: CUDA reports N devices; the command must stop before using one).
"""

import os
import subprocess
import sys
import time

import pytest

RECIPE = """
model: {{path: {model}}}
data: {{train_files: [a.jsonl], max_prompt_length: 16, max_response_length: 8, micro_batch_tokens: 64,
       batch_prompts: 4, mini_batch_prompts: 2}}
rollout: {{backend: sglang}}
"""
TORCHRUN_8 = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}


@pytest.fixture
def recipe(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model))
    return str(path)


def _cli(
    *args: str, gpus: int | None = None, env: dict | None = None, pythonpath: str | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """``sdpg-train`` as a process (``gpus``: as on a node with that many GPUs); it and its seconds."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_8 and not k.startswith("SLURM_")}
    if pythonpath:
        base["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, base.get("PYTHONPATH")) if p)
    prefix = [sys.executable, "-m"]
    if gpus is not None:
        prefix += ["sdpg_mcore.audit.simulated_node", "--gpus", str(gpus), "-m"]
    began = time.monotonic()
    proc = subprocess.run(
        [*prefix, "sdpg_mcore.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=120,
    )
    return proc, time.monotonic() - began


def test_te_without_transformer_engine_exits_2_naming_the_key_within_30s(recipe):
    proc, seconds = _cli("--config", recipe, "rollout.backend=builtin", "model.transformer_impl=te")
    assert proc.returncode == 2, proc.stderr
    assert "sdpg-train: error: config key 'model.transformer_impl' is te" in proc.stderr
    assert "no CUDA device is visible" in proc.stderr  # this machine: no GPU
    assert seconds < 30
    proc, _ = _cli("--config", recipe, "rollout.backend=builtin", "model.transformer_impl=te", gpus=1)
    assert proc.returncode == 2 and "transformer_engine is not installed" in proc.stderr, proc.stderr


def test_te_that_is_installed_but_broken_exits_2_with_the_import_error(recipe, tmp_path):
    """An install whose import fails (ABI/CUDA mismatch: an undefined symbol) is refused, not skipped."""
    package = tmp_path / "site" / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '2.0.0'\n")
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    site = str(tmp_path / "site")
    proc, seconds = _cli(
        "--config", recipe, "rollout.backend=builtin", "model.transformer_impl=te", gpus=1, pythonpath=site
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "import transformer_engine.pytorch failed: ImportError: libtransformer_engine.so: undefined symbol"
        in proc.stderr
    )
    assert "model.transformer_impl=auto" in proc.stderr and seconds < 30
    auto, _ = _cli(
        "--config", recipe, "--print-config", "model.transformer_impl=auto", gpus=1, pythonpath=site
    )
    assert auto.returncode == 0 and "transformer_impl: auto" in auto.stdout


def test_a_server_on_trainer_rank_0_gpu_of_a_simulated_8_gpu_node_is_refused(recipe):
    """torchrun's 8 ranks on an 8-GPU node and an SGLang server on GPU 0 (rollout.base_gpu_id=0)."""
    proc, seconds = _cli("--config", recipe, "rollout.base_gpu_id=0", gpus=8, env=TORCHRUN_8)
    assert proc.returncode == 2, proc.stderr
    assert "sdpg-train: error: rollout server 0 would run on GPU(s) [0]" in proc.stderr
    assert "rollout.base_gpu_id" in proc.stderr and "rollout.colocated" in proc.stderr
    assert seconds < 30
    # Colocated, the same GPU passes the placement; the next check (no TE here) stops the run instead.
    colocated, _ = _cli("--config", recipe, "rollout.base_gpu_id=0", "rollout.colocated=true",
                        "model.transformer_impl=te", gpus=8, env=TORCHRUN_8)  # fmt: skip
    assert colocated.returncode == 2
    assert "would run on GPU" not in colocated.stderr and "model.transformer_impl" in colocated.stderr
    # A full node by default (no base given): no GPU is left for the server.
    full, _ = _cli("--config", recipe, gpus=8, env=TORCHRUN_8)
    assert full.returncode == 2 and "free: none" in full.stderr, full.stderr


def test_placement_counts_the_ranks_on_this_node_not_the_world():
    """A 2-node job of 4 ranks per node on 8-GPU nodes: servers on GPUs 4-7 are fine."""
    from sdpg_mcore.cli import check_node
    from sdpg_mcore.config import ConfigError, config_from_dict

    cfg = config_from_dict({"rollout": {"backend": "sglang", "num_servers": 2, "tp_size": 2}})
    check_node(cfg, local_world_size=4, gpu_count=8)
    with pytest.raises(ConfigError, match="rollout.num_servers=2 x rollout.tp_size=2"):
        check_node(cfg, local_world_size=6, gpu_count=8)
    check_node(cfg, local_world_size=8, gpu_count=0)  # no GPU: CPU servers need no placement
