"""The one blocking HTTP helper of the rollout package: client admin calls, launcher, weight sync.

Standard library only, JSON in and out. ``/generate`` traffic goes through the async client
(aiohttp, many requests in flight); everything else — health checks, weight updates, version
reads, memory release — is a handful of calls and uses this.

    status, body = http_json(f"{url}/model_info", api_key=key)
    post_all(urls, "/update_weight_version", {"new_version": "7"}, api_key=key)   # HTTPCallError on a failure

``api_key`` (the run's key, ``auth.py``) goes out as ``Authorization: Bearer``; without it a server
started with a key answers 401 to everything but ``/health*``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sdpg_mcore.rollout.auth import bearer


class HTTPCallError(RuntimeError):
    """A server answered a non-200 status or ``success: false``, or did not answer; the message names
    each URL, ``urls`` lists them."""

    def __init__(self, message: str, urls: list[str] | None = None):
        super().__init__(message)
        self.urls = list(urls or [])


def http_json(
    url: str,
    payload: dict[str, Any] | None = None,
    *,
    timeout_s: float = 5.0,
    method: str | None = None,
    api_key: str | None = None,
) -> tuple[int, Any]:
    """One request; returns ``(status, parsed JSON or text)``. Connection errors raise ``OSError``."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    for name, value in bearer(api_key).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body, status = resp.read().decode(errors="replace"), resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read().decode(errors="replace"), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def failed(status: int, body: Any) -> bool:
    """SGLang's two ways of saying no: a non-200 status, or 200 with ``success: false``."""
    return status != 200 or (isinstance(body, dict) and body.get("success") is False)


def post_all(
    urls: list[str],
    path: str,
    payload: dict[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    pool: ThreadPoolExecutor | None = None,
    api_key: str | None = None,
) -> list[Any]:
    """POST ``payload`` to every URL at once; return the bodies, or raise :class:`HTTPCallError`
    (a server that cannot be reached counts as a failure: ``HTTP 0`` and the connection error)."""
    if not urls:
        return []
    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=len(urls))
    try:
        futures = [
            pool.submit(answer, f"{u}{path}", payload or {}, timeout_s=timeout_s, api_key=api_key)
            for u in urls
        ]
        return check_all(urls, path, [f.result() for f in futures])
    finally:
        if own:
            pool.shutdown(wait=False)


UNREACHABLE = 0
"""The status :func:`answer` gives a request that got no HTTP answer (refused, reset, timed out)."""


def answer(url: str, payload: dict[str, Any] | None = None, **kwargs) -> tuple[int, Any]:
    """:func:`http_json`, with a connection error as ``(UNREACHABLE, "ConnectionRefusedError: ...")``:
    for calls to many servers, where one server's death must not hide the others' answers."""
    try:
        return http_json(url, payload, **kwargs)
    except OSError as err:
        return UNREACHABLE, f"{type(err).__name__}: {getattr(err, 'reason', err)}"


def check_all(urls: list[str], path: str, results: list[tuple[int, Any]]) -> list[Any]:
    """The bodies of ``results`` (one ``(status, body)`` per URL), or :class:`HTTPCallError` naming the failures."""
    bad = [(u, s, b) for u, (s, b) in zip(urls, results) if failed(s, b)]
    if bad:
        errors = "; ".join(f"{u}: HTTP {s} {str(b)[:300]}" for u, s, b in bad)
        raise HTTPCallError(f"{path} failed on {len(bad)} server(s): {errors}", [u for u, _, _ in bad])
    return [b for _, b in results]
