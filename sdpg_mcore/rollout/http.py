"""The one blocking HTTP helper of the rollout package: client admin calls, launcher, weight sync.

Standard library only, JSON in and out. ``/generate`` traffic goes through the async client
(aiohttp, many requests in flight); everything else — health checks, weight updates, version
reads, memory release — is a handful of calls and uses this.

    status, body = http_json(f"{url}/model_info")
    post_all(urls, "/update_weight_version", {"new_version": "7"})   # raises HTTPCallError on any failure
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class HTTPCallError(RuntimeError):
    """A server answered a non-200 status or ``success: false``; the message names each URL."""


def http_json(
    url: str, payload: dict[str, Any] | None = None, *, timeout_s: float = 5.0, method: str | None = None
) -> tuple[int, Any]:
    """One request; returns ``(status, parsed JSON or text)``. Connection errors raise ``OSError``."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
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
) -> list[Any]:
    """POST ``payload`` to every URL at once; return the bodies, or raise :class:`HTTPCallError`."""
    if not urls:
        return []
    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=len(urls))
    try:
        futures = [pool.submit(http_json, f"{u}{path}", payload or {}, timeout_s=timeout_s) for u in urls]
        return check_all(urls, path, [f.result() for f in futures])
    finally:
        if own:
            pool.shutdown(wait=False)


def check_all(urls: list[str], path: str, results: list[tuple[int, Any]]) -> list[Any]:
    """The bodies of ``results`` (one ``(status, body)`` per URL), or :class:`HTTPCallError` naming the failures."""
    errors = [f"{u}: HTTP {s} {str(b)[:300]}" for u, (s, b) in zip(urls, results) if failed(s, b)]
    if errors:
        raise HTTPCallError(f"{path} failed on {len(errors)} server(s): " + "; ".join(errors))
    return [b for _, b in results]
