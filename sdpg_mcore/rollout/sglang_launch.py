"""Real SGLang: the command line of one server, where its Python lives, and the start-up checks.

The only module that knows SGLang's launch flags. On a machine without CUDA it launches
``sglang.launch_server --device cpu`` from ``.venv-sglang/`` (made by ``tools/setup_sglang_cpu.sh``)
with the flags SGLang needs there (torch-native attention, no CUDA graphs, fp32 when the model is
fp32, one core per TP rank) and ``sglang_cpu_shim/`` on its PYTHONPATH. Every server, launched or
external, is checked at start-up: its version (read from the server) must be at least
:data:`MIN_SGLANG_VERSION`, and a data-parallel server cannot join a weight-update group.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdpg_mcore.rollout.http import http_json

logger = logging.getLogger(__name__)

#: Oldest SGLang the weight sync works with: ``/begin_weight_update`` … ``/end_weight_update`` and
#: ``/update_weight_version`` (0.5.21; ``/get_weight_version`` is gone there). Checked: 0.5.23.
MIN_SGLANG_VERSION = (0, 5, 21)
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = Path(__file__).resolve().parent / "sglang_cpu_shim"
#: Runs a program with the run's API key read from its file (``sglang_entry/sdpg_keyed_main.py``).
KEYED_MAIN = Path(__file__).resolve().parent / "sglang_entry" / "sdpg_keyed_main.py"
SETUP_HINT = "run tools/setup_sglang_cpu.sh (CPU) or pip install 'sglang>=0.5.21' (GPU)"


class SGLangServerError(RuntimeError):
    """A server is too old, or configured in a way the weight sync cannot use; the message says the fix."""


@dataclass(frozen=True)
class ServerFacts:
    """What a running server says about itself (``GET /server_info``)."""

    url: str
    version: str
    tp_size: int
    dp_size: int


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.23"`` / ``"0.5.23.post1"`` / ``"0.5.23-sdpg-dev"`` -> ``(0, 5, 23)``."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not match:
        raise SGLangServerError(f"cannot read an SGLang version from {text!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def server_facts(url: str, timeout_s: float = 30.0, *, api_key: str | None = None) -> ServerFacts:
    """Version and parallel sizes of the server at ``url`` (``/server_info``; ``/get_server_info`` before 0.5.22)."""
    status, body = http_json(f"{url}/server_info", timeout_s=timeout_s, api_key=api_key)
    if status == 404:
        status, body = http_json(f"{url}/get_server_info", timeout_s=timeout_s, api_key=api_key)
    if status == 401:
        raise SGLangServerError(
            f"{url}/server_info: HTTP 401: the server wants an API key and refused the one sent (if any); "
            "give its key file in rollout.api_key_file"
        )
    if status != 200 or not isinstance(body, dict):
        raise SGLangServerError(f"{url}/server_info: HTTP {status} {str(body)[:200]}")
    return ServerFacts(
        url, str(body.get("version", "")), int(body.get("tp_size", 1)), int(body.get("dp_size", 1))
    )


def check_servers(urls: list[str], *, weight_sync: str, api_key: str | None = None) -> list[ServerFacts]:
    """Read every server's facts and :func:`check_facts` them."""
    facts = [server_facts(u, api_key=api_key) for u in urls]
    check_facts(facts, weight_sync=weight_sync)
    return facts


def check_facts(facts: list[ServerFacts], *, weight_sync: str) -> None:
    """Refuse servers older than :data:`MIN_SGLANG_VERSION`, and ``--dp-size > 1`` with distributed sync."""
    minimum = ".".join(map(str, MIN_SGLANG_VERSION))
    for f in facts:
        if parse_version(f.version) < MIN_SGLANG_VERSION:
            raise SGLangServerError(
                f"{f.url} runs SGLang {f.version}; sdpg_mcore needs >= {minimum} (weight-update "
                f"sessions and /update_weight_version); upgrade it: {SETUP_HINT}"
            )
        if weight_sync == "distributed" and f.dp_size > 1:
            raise SGLangServerError(
                f"{f.url} runs with --dp-size {f.dp_size}: SGLang refuses /init_weights_update_group "
                "there; use rollout.weight_sync=disk, or one server per data-parallel replica "
                "(rollout.num_servers) with --dp-size 1"
            )


def keyed_module(module: str, api_key_file: str | None) -> list[str]:
    """The interpreter arguments that run ``module`` (``-m module``), under :data:`KEYED_MAIN` when
    there is a key file: the key then reaches it without appearing on any command line."""
    if api_key_file is None:
        return ["-m", module]
    return [str(KEYED_MAIN), "--api-key-file", str(api_key_file), "-m", module]


def sglang_python() -> str:
    """The interpreter that has ``sglang``: this one, else ``.venv-sglang/bin/python``."""
    override = os.environ.get("SDPG_SGLANG_PYTHON")
    if override:
        return override
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)",
        ],
        capture_output=True,
    )
    if probe.returncode == 0:
        return sys.executable
    venv = REPO_ROOT / ".venv-sglang" / "bin" / "python"
    if venv.is_file():
        return str(venv)
    raise SGLangServerError(f"rollout.backend=sglang: sglang is not installed; {SETUP_HINT}")


def model_dtype(model_path: str) -> str | None:
    """The checkpoint's dtype from ``config.json`` (``dtype`` or ``torch_dtype``), if it says."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype) if dtype else None


def cpu_thread_binding(index: int, tp_size: int, cores: list[int] | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for server ``index``: one core per TP rank, ``"0|1"`` for TP2.

    Without it SGLang refuses more TP ranks than NUMA nodes. Servers wrap around the cores when
    there are fewer cores than ranks (they then share them).
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    return "|".join(str(cores[(index * tp_size + r) % len(cores)]) for r in range(tp_size))


@functools.lru_cache(maxsize=1)
def _warn_seeds_ignored_on_cpu() -> None:
    logger.warning(
        "SGLang on CPU: --enable-deterministic-inference needs fa3/flashinfer/triton attention, "
        "so sampling_seed is ignored and rollouts are not reproducible run to run"
    )


def sglang_command(
    *,
    python: str,
    model_path: str,
    host: str,
    port: int,
    index: int,
    tp_size: int,
    dp_size: int,
    base_gpu_id: int,
    cuda: bool,
    deterministic: bool,
    mem_fraction_static: float | None = None,
    enable_memory_saver: bool = False,
    api_key_file: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Command line and extra environment of server ``index``.

    ``deterministic``: the client sends ``sampling_seed``, which SGLang ignores unless it runs with
    ``--enable-deterministic-inference``. That flag needs fa3/flashinfer/triton attention, so on CPU
    (torch-native attention) it cannot be set and seeds are ignored there (logged).
    ``api_key_file``: SGLang runs under :data:`KEYED_MAIN`, which gives it ``--api-key`` from the file.
    """
    cmd = [python, *keyed_module("sglang.launch_server", api_key_file)]
    cmd += ["--model-path", model_path, "--host", host]
    cmd += ["--port", str(port), "--tp-size", str(tp_size)]
    env: dict[str, str] = {}
    if cuda:
        cmd += ["--dp-size", str(dp_size), "--base-gpu-id", str(base_gpu_id + index * tp_size * dp_size)]
        if deterministic:
            cmd += ["--enable-deterministic-inference"]
    else:
        if dp_size != 1:
            raise SGLangServerError(f"rollout: dp_size={dp_size} on CPU; use num_servers for more replicas")
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph"]
        cmd += ["--skip-server-warmup", "--max-total-tokens", "8192"]
        if mem_fraction_static is None:
            mem_fraction_static = 0.1
        if model_dtype(model_path) == "float32":  # else SGLang casts an fp32 model to fp16 on CPU
            cmd += ["--dtype", "float32"]
        if tp_size > 1:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(index, tp_size)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), os.environ.get("PYTHONPATH")) if p)
        if deterministic:
            _warn_seeds_ignored_on_cpu()
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if enable_memory_saver and cuda:  # torch_memory_saver hooks CUDA allocations; nothing to free on CPU
        cmd += ["--enable-memory-saver"]
    return cmd, env


TRAINER_ONLY_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
    "CUDA_DEVICE_MAX_CONNECTIONS",
)
"""Variables a launched SGLang server must not inherit from the trainer rank that starts it: the
trainer's rendezvous (SGLang's CPU path takes ``MASTER_ADDR``/``MASTER_PORT`` for its own store when
set, and would meet the trainer's), the thread cap torchrun and ``spawn_ranks`` put on each rank
(``OMP_NUM_THREADS=1``; SGLang binds its own CPU threads), and the trainer's one-queue CUDA setting
(SGLang sets its own ``CUDA_DEVICE_MAX_CONNECTIONS``). ``TORCHELASTIC_*`` go too."""


def server_environment(parent: dict[str, str]) -> dict[str, str]:
    """The environment of a launched SGLang server: ``parent`` without :data:`TRAINER_ONLY_ENV` and
    torchrun's ``TORCHELASTIC_*`` (``CUDA_VISIBLE_DEVICES`` stays: ``--base-gpu-id`` counts in it)."""
    return {
        k: v for k, v in parent.items() if k not in TRAINER_ONLY_ENV and not k.startswith("TORCHELASTIC_")
    }
