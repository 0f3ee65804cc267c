"""Shared fixtures: a tiny model directory (with a tokenizer) and two dev servers behind the real router."""

from __future__ import annotations

import pytest

from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen3 (fp32, random init) with the tiny tokenizer saved next to it."""
    path = save_tiny_hf_model(tmp_path_factory.mktemp("model") / "qwen3", arch="qwen3", seed=0)
    save_tiny_tokenizer(path, style="qwen")
    return path


def start_servers(model_dir, log_dir, num_servers=2, **overrides) -> RolloutServers:
    config = ServerConfig(
        model_path=str(model_dir),
        num_servers=num_servers,
        log_dir=str(log_dir),
        health_timeout_s=120,
        env={"OMP_NUM_THREADS": "1"},
        extra_args=["--num-threads", "1"],
        **overrides,
    )
    return RolloutServers(config).start()


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
