"""rollout/auth.py: the run's key file (0600, fresh per run) and the check both servers make."""

import os
import stat
import subprocess
import sys

import pytest

from sdpg_mcore.config import ConfigError, load_config
from sdpg_mcore.rollout.auth import ApiKeyError, authorized, new_key_file, open_path, read_key_file
from sdpg_mcore.rollout.sglang_launch import KEYED_MAIN

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny", "sdpg.yaml")


def test_new_key_file_is_private_and_fresh(tmp_path):
    first = new_key_file(tmp_path / "secrets")
    key = read_key_file(first)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    assert len(key) == 64 and int(key, 16) >= 0  # 256 bits, hex: safe on a command line, in YAML, in a header
    again = new_key_file(tmp_path / "secrets")
    assert again == first and read_key_file(again) != key  # a new run, a new key
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left


def test_read_key_file_formats_and_refusals(tmp_path):
    plain, yaml_config = tmp_path / "plain", tmp_path / "sglang.yaml"
    for path, text in (
        (plain, "abc123\n"),
        (yaml_config, "# SGLang --config\napi-key: 'abc123'\nport: 30000\n"),
    ):
        path.write_text(text)
        path.chmod(0o600)
        assert read_key_file(path) == "abc123"
    plain.chmod(0o644)
    with pytest.raises(ApiKeyError, match=r"readable by other users \(mode 644\); run `chmod 600 "):
        read_key_file(plain)
    with pytest.raises(ApiKeyError, match="cannot be read"):
        read_key_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ApiKeyError, match="holds no key"):
        read_key_file(empty)


def test_authorized_and_open_paths():
    assert authorized("Bearer k1", "k1") and authorized("bearer k1", "k1")
    assert not authorized(None, "k1") and not authorized("Bearer k2", "k1") and not authorized("k1", "k1")
    assert all(open_path(p) for p in ("/health", "/health_generate", "/ready", "/metrics"))
    assert not any(open_path(p) for p in ("/generate", "/model_info", "/update_weights_from_disk", "/"))


def test_api_key_file_is_validated_by_the_config(tmp_path):
    key = new_key_file(tmp_path / "s")
    external = ["rollout.backend=external", "rollout.urls=[http://127.0.0.1:1]"]
    assert load_config(RECIPE, [*external, f"rollout.api_key_file={key}"]).rollout.api_key_file == str(key)
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"'rollout.api_key_file': .*readable by other users.*chmod 600"):
        load_config(RECIPE, [*external, f"rollout.api_key_file={key}"])
    with pytest.raises(ConfigError, match=r"'rollout.api_key_file': .*cannot be read"):
        load_config(RECIPE, [*external, f"rollout.api_key_file={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"'rollout.api_key_file': is for rollout.backend=external"):
        load_config(RECIPE, [f"rollout.api_key_file={key}"])


def test_keyed_main_hands_the_key_over_in_process_and_redacts_it(tmp_path):
    """The program sees ``--api-key KEY`` in its argv; /proc shows only the file; what it logs or
    prints carries ``<redacted>``; a key file others can read is refused."""
    key_file = new_key_file(tmp_path / "s")
    key = read_key_file(key_file)
    module = tmp_path / "fake_server.py"
    module.write_text(
        "import logging, sys, time\n"
        "logging.basicConfig(level='INFO')\n"
        "logging.getLogger('x').info('server_args=%s', sys.argv)\n"
        "print('argv', sys.argv, flush=True)\n"
        "time.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(KEYED_MAIN), "--api-key-file", str(key_file), "-m", "fake_server", "--port", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        printed = proc.stdout.readline() + proc.stdout.readline()  # its log record and its print
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode()
        assert str(key_file) in cmdline and key not in cmdline
    finally:
        proc.kill()
        proc.communicate()
    assert "server_args=" in printed and "argv [" in printed and "--port" in printed, printed
    assert key not in printed and printed.count("<redacted>") == 2, printed
    key_file.chmod(0o644)
    refused = subprocess.run(
        [sys.executable, str(KEYED_MAIN), "--api-key-file", str(key_file), "-m", "fake_server"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
