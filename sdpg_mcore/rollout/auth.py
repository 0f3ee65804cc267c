"""The rollout servers' API key: one secret per run, in a 0600 file, sent as ``Authorization: Bearer``.

Without it anyone who reaches a server's port can replace the policy's weights
(``/update_weights_from_disk``, ``…_from_distributed``, ``…_from_tensor``), pause generation or
read rollouts. Real SGLang (0.5.23) and the built-in server check the same way
(``sglang/srt/utils/auth.py``): with ``--api-key`` set, every route answers 401 ``{"error":
"Unauthorized"}`` without the key, except ``/health*``, ``/ready*`` and ``/metrics*``.

One key serves generation and the weight-update ("admin optional") routes. SGLang would take a
second one (``--admin-api-key``), but its ``/server_info`` returns every launch option, the admin
key included, to any holder of the generation key, and the trainer is the only client of both kinds
of route: a second key would separate nothing.

Where the key travels (never on a command line, which ``/proc`` shows to every user):

- launched servers and the router get the file's path. sglang-router 0.3.2 takes a key only on its
  command line (``--api-key``); SGLang 0.5.23 also from its ``--config`` YAML file, from no
  environment variable, and it logs every option at start-up. So ``sglang_entry/sdpg_keyed_main.py``
  reads the file and hands the key to both inside their own process, with their logs redacted;
- ``rollout.backend=external`` reads it from ``rollout.api_key_file`` (this format, or SGLang's
  ``--config`` YAML with an ``api-key`` entry).

    key_file = new_key_file(run_dir / "secrets")      # 0700 directory, 0600 file, fresh 256-bit key
    key = read_key_file(key_file)
    http_json(f"{url}/update_weight_version", {...}, api_key=key)
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

KEY_FILE_NAME = "rollout_api_key"


class ApiKeyError(ValueError):
    """The key file is missing, readable by others or empty; the message names the file and the fix."""


def new_key_file(directory: str | Path, name: str = KEY_FILE_NAME) -> Path:
    """Write a fresh key (``secrets.token_hex``, 256 bits) to ``directory/name``, mode 0600.

    The directory is made (0700) if needed. The file is written under a temporary name created
    0600 and renamed over any older key, so it is never readable by others, not even for a moment.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_key_file(path: str | Path, *, what: str = "the API key file") -> str:
    """The key in ``path``: a file holding only the key, or SGLang's ``--config`` YAML with ``api-key``.

    Refuses a file that its group or other users can read (``chmod 600`` fixes it), like ssh does
    with private keys: a key readable by others protects nothing.
    """
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as err:
        raise ApiKeyError(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiKeyError(f"{what} {str(path)!r} is not a regular file")
    if info.st_mode & 0o077:
        raise ApiKeyError(
            f"{what} {str(path)!r} is readable by other users (mode {stat.S_IMODE(info.st_mode):03o}); "
            f"run `chmod 600 {path}`"
        )
    key = _key_of(text)
    if not key:
        raise ApiKeyError(f"{what} {str(path)!r} holds no key (one line, or an `api-key:` entry)")
    return key


def _key_of(text: str) -> str:
    """The key of a one-line file, or the ``api-key`` entry of an SGLang ``--config`` YAML."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("api-key", "api_key"):
            return value.strip().strip("'\"")
    return lines[0] if len(lines) == 1 and ":" not in lines[0] else ""


def bearer(api_key: str | None) -> dict[str, str]:
    """The request header that carries ``api_key`` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``api_key`` (constant-time comparison, as SGLang)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), api_key.encode())


def open_path(path: str) -> bool:
    """Routes SGLang leaves open even with a key: probes and metrics scrapers carry no secret."""
    return path.startswith(("/health", "/ready", "/metrics"))
