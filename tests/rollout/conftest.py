"""Shared fixtures: a tiny model directory (with a tokenizer), dev servers behind the real router, and
``contract_server``: ONE server per test module for each of the built-in server and real SGLang.

Real SGLang runs from ``.venv-sglang`` (``tools/setup_sglang_cpu.sh``; the README's test command
sets it up). Without it the ``sglang`` parameter fails with that hint, unless
``SDPG_SKIP_REAL_SGLANG=1`` says to skip it on purpose.
"""

from __future__ import annotations

import pytest
from launch_testlib import require_real_sglang

from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen3 (fp32, random init) with the tiny tokenizer saved next to it."""
    path = save_tiny_hf_model(tmp_path_factory.mktemp("model") / "qwen3", arch="qwen3", seed=0)
    save_tiny_tokenizer(path, style="qwen")
    return path


def start_servers(model_dir, log_dir, num_servers=2, backend="dev", **overrides) -> RolloutServers:
    config = ServerConfig(
        model_path=str(model_dir),
        backend=backend,
        num_servers=num_servers,
        log_dir=str(log_dir),
        health_timeout_s=120 if backend == "dev" else 600,
        env={"OMP_NUM_THREADS": "1"},
        extra_args=["--num-threads", "1"] if backend == "dev" else [],
        **overrides,
    )
    return RolloutServers(config).start()


@pytest.fixture(scope="module", params=["dev", "sglang"])
def contract_server(request, tiny_model_dir, tmp_path_factory) -> RolloutServers:
    """One server without a router: the built-in one, then real SGLang (24-35 s to start on 2 cores)."""
    if request.param == "sglang":
        require_real_sglang()
    group = start_servers(
        tiny_model_dir,
        tmp_path_factory.mktemp(f"{request.param}_logs"),
        num_servers=1,
        backend=request.param,
        router=False,
    )
    group.backend = request.param
    yield group
    group.stop()


@pytest.fixture(scope="session")
def server_factory():
    """``start_servers(model_dir, log_dir, num_servers=2, **ServerConfig overrides)`` for modules that need their own."""
    return start_servers


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Two dev servers behind ``sglang_router`` (started once per test module)."""
    group = start_servers(tiny_model_dir, tmp_path_factory.mktemp("logs"))
    yield group
    group.stop()
