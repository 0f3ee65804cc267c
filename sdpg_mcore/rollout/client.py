"""Async rollout client for the SGLang HTTP contract (``protocol.py``), pointed at a router or one server.

Token ids in, token ids and rollout log-probs out. Each sample is one ``/generate`` request, so the
router spreads a group over workers and a failed request is re-sent alone (with backoff; the
router then picks a live worker). After a failed attempt the client asks ``on_failure`` (the
supervisor of launched servers: ``rollout/supervisor.py``) to bring back a server that died, and
re-sends the request once it has; completed requests are kept. Requests carry a ``rid`` so that
cancelling a rollout aborts them on the workers, a per-sample ``sampling_seed`` derived from
``seed`` so reruns are reproducible, and the run's API key (``ClientConfig.api_key``).

    client = RolloutClient(ClientConfig(url=router_url, worker_urls=worker_urls, api_key=key))
    groups = client.run(client.generate(prompts_ids, SamplingParams(max_new_tokens=64), n=8, seed=step))
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import aiohttp

from sdpg_mcore.rollout.auth import bearer
from sdpg_mcore.rollout.protocol import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: HTTP statuses worth re-sending: the router or a worker is overloaded, restarting or gone.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
KEEPALIVE_S = 4.0
"""Seconds an idle connection is kept for the next request (uvicorn, under SGLang, closes at 5)."""


class RolloutError(RuntimeError):
    """A rollout request failed for good (retries spent, deadline passed, or a 4xx from the server)."""


@dataclass
class ClientConfig:
    """Where to send requests and how hard to try."""

    url: str
    """Base URL of the router (or of a single server)."""
    worker_urls: list[str] = field(default_factory=list)
    """Workers behind the router; ``/abort_request`` goes to them, as the router does not forward it."""
    max_concurrency: int = 64
    """Most ``/generate`` requests in flight at once."""
    request_timeout_s: float = 600.0
    """Budget of one HTTP attempt."""
    max_retries: int = 5
    """Re-sends after a connection error, timeout or retryable status (see ``RETRY_STATUSES``)."""
    backoff_s: float = 0.25
    """First back-off; doubles per retry up to ``max_backoff_s``."""
    max_backoff_s: float = 8.0
    deadline_s: float | None = None
    """Budget of one whole :meth:`RolloutClient.generate` call; ``None`` for none."""
    api_key: str | None = field(default=None, repr=False)
    """The run's API key, sent as ``Authorization: Bearer`` (``rollout/auth.py``); never printed."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass
class Sample:
    """One generated response."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    rollout_logprobs: list[float]
    """Log-prob of each output token under the engine's sampling distribution (see ``engine.py``)."""
    text: str | None
    finish_reason: str
    """``stop`` | ``length`` | ``abort``."""
    weight_version: str
    batch_index: int = 0


@dataclass
class RolloutMetrics:
    """Counters since the client was made (or since :meth:`RolloutClient.reset_metrics`)."""

    num_requests: int = 0
    num_retries: int = 0
    num_failed: int = 0
    num_aborted: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    generate_wall_s: float = 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.generate_wall_s if self.generate_wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "output_tokens_per_s": self.output_tokens_per_s}


def sample_seed(seed: int, prompt_index: int, sample_index: int, batch_index: int = 0) -> int:
    """A per-sample ``sampling_seed`` that depends only on its coordinates, never on scheduling."""
    return (seed * 1_000_003 + batch_index * 7_919_993 + prompt_index * 1_009 + sample_index) % (1 << 62)


class RolloutClient:
    """Batched ``/generate`` with retries, aborts, over-sampling and metrics; plus the admin calls."""

    def __init__(self, config: ClientConfig, *, on_failure: Callable[[], Awaitable[bool]] | None = None):
        self.config = config
        self.on_failure = on_failure
        """Awaited after a failed attempt: brings back what died and says whether it did (the request is
        then re-sent at once, without spending a retry); what it raises ends the request."""
        self.metrics = RolloutMetrics()
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_abort: list[str] = []
        self._runner: asyncio.Runner | None = None

    # ---------------------------------------------------------------- plumbing
    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` to completion from synchronous code, on this client's own event loop.

        The loop and its HTTP session (keep-alive connections) live until :meth:`shutdown`. Why: with
        a fresh loop per call, every request of every step opened its own TCP connection — most of
        the client's CPU in a profile of the tiny example (256 connects a step), CPU that a rollout
        thread takes from the trainer under the GIL (``rollout.async_steps``)."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    def shutdown(self) -> None:
        """Close the HTTP session and the event loop (the next :meth:`run` starts new ones)."""
        if self._runner is not None:
            self._runner.run(self.close())
            self._runner.close()
            self._runner = None

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop = loop
            # Idle connections are dropped before uvicorn's (SGLang's) 5 s keep-alive could close
            # one under a request; a rare race still ends in a retry with a fresh rid.
            connector = aiohttp.TCPConnector(
                limit=self.config.max_concurrency + 8, force_close=False, keepalive_timeout=KEEPALIVE_S
            )
            self._session = aiohttp.ClientSession(connector=connector, headers=bearer(self.config.api_key))
            self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def reset_metrics(self) -> None:
        self.metrics = RolloutMetrics()

    async def post(
        self,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        url: str | None = None,
        timeout_s: float = 60.0,
    ) -> tuple[int, Any]:
        """One POST; returns ``(status, parsed JSON or text)``. Connection errors propagate."""
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(
            f"{url or self.config.url}{path}", json=payload or {}, timeout=timeout
        ) as resp:
            return resp.status, await _read_body(resp)

    async def get(self, path: str, *, url: str | None = None, timeout_s: float = 30.0) -> tuple[int, Any]:
        session = self._get_session()
        async with session.get(
            f"{url or self.config.url}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            return resp.status, await _read_body(resp)

    # ---------------------------------------------------------------- generate
    async def generate_raw(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST one ``/generate`` body with retries; abort it on the workers if cancelled.

        Every attempt carries a fresh ``rid``: SGLang refuses a rid it still tracks ("Duplicate
        request ID"), and a timed-out attempt may still be running there. Each abandoned attempt
        is aborted on the workers. After a failed attempt :attr:`on_failure` may restart a dead
        server; the request is then re-sent without spending one of ``max_retries``.
        """
        self._get_session()
        assert self._semaphore is not None
        last_error, attempts, failures = "", 0, 0
        async with self._semaphore:
            while failures <= self.config.max_retries:
                if failures:
                    delay = min(self.config.backoff_s * 2 ** (failures - 1), self.config.max_backoff_s)
                    await asyncio.sleep(delay)
                self.metrics.num_retries += attempts > 0  # every re-send, whatever made it necessary
                attempts += 1
                status, body = await self._attempt(payload)
                if status == 200 and isinstance(body, dict):
                    self.metrics.num_requests += 1
                    return body
                last_error = body if status is None else f"HTTP {status}: {str(body)[:500]}"
                if status is not None and status not in RETRY_STATUSES:
                    break
                logger.debug("generate attempt %d failed: %s", attempts, last_error)
                if self.on_failure is not None and await self.on_failure():
                    continue  # a dead server was brought back: this failure was its, not the request's
                failures += 1
        self.metrics.num_failed += 1
        raise RolloutError(f"/generate at {self.config.url} failed after {attempts} attempt(s): {last_error}")

    async def _attempt(self, payload: dict[str, Any]) -> tuple[int | None, Any]:
        """One ``/generate`` with a fresh rid: ``(status, body)``, or ``(None, error)`` when no answer came."""
        rid = uuid.uuid4().hex
        try:
            return await self.post(
                "/generate", {**payload, "rid": rid}, timeout_s=self.config.request_timeout_s
            )
        except asyncio.CancelledError:
            self._to_abort.append(rid)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            self._to_abort.append(rid)
            return None, f"{type(err).__name__}: {err}"

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        n: int = 1,
        seed: int | None = None,
        batch_index: int = 0,
        return_logprob: bool = True,
    ) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids); returns groups in prompt order.

        With ``seed`` set, sample ``(i, j)`` uses ``sample_seed(seed, i, j, batch_index)``, so the
        same call gives the same tokens however the servers batch it.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        start = time.perf_counter()

        base = SamplingParams(**{**asdict(sampling), "n": 1, "sampling_seed": None}).to_json()

        async def one(i: int, j: int) -> Sample:
            params = base if seed is None else {**base, "sampling_seed": sample_seed(seed, i, j, batch_index)}
            payload = {
                "input_ids": list(prompts[i]),
                "sampling_params": params,
                "return_logprob": return_logprob,
            }
            out = await self.generate_raw(payload)
            return _to_sample(out, i, j, list(prompts[i]), batch_index)

        tasks = [asyncio.ensure_future(one(i, j)) for i in range(len(prompts)) for j in range(n)]
        try:
            if self.config.deadline_s is not None:
                done = await asyncio.wait_for(asyncio.gather(*tasks), timeout=self.config.deadline_s)
            else:
                done = await asyncio.gather(*tasks)
        except asyncio.TimeoutError:
            raise RolloutError(
                f"rollout of {len(tasks)} requests missed its deadline of {self.config.deadline_s}s "
                f"({sum(t.done() for t in tasks)} finished); pending requests were aborted"
            ) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._to_abort:  # requests a server may still be running: stop them there
                rids, self._to_abort = self._to_abort, []
                await asyncio.gather(*(self.abort(rid) for rid in rids))
            self.metrics.generate_wall_s += time.perf_counter() - start
        for sample in done:
            self.metrics.num_prompt_tokens += len(sample.prompt_ids)
            self.metrics.num_output_tokens += len(sample.output_ids)
            self.metrics.num_aborted += sample.finish_reason == "abort"
        return [list(done[i * n : (i + 1) * n]) for i in range(len(prompts))]

    # ---------------------------------------------------------------- admin
    async def abort(self, rid: str | None = None, *, abort_all: bool = False) -> None:
        """Abort ``rid`` (or everything) on every worker; errors are logged, never raised."""
        payload = {"abort_all": True} if abort_all else {"rid": rid}
        for url in self.config.worker_urls or [self.config.url]:
            try:
                await self.post("/abort_request", payload, url=url, timeout_s=5.0)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                logger.debug("abort %s on %s failed: %s", rid, url, err)  # a dead server aborted it


async def _read_body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            import json

            return json.loads(text)
        except ValueError:
            return text
    return text


def _to_sample(out: dict[str, Any], i: int, j: int, prompt_ids: list[int], batch_index: int) -> Sample:
    meta = out.get("meta_info", {})
    logprobs = meta.get("output_token_logprobs") or []
    output_ids = out.get("output_ids")
    if output_ids is None:  # SGLang builds without output_ids: the log-prob entries carry the ids
        output_ids = [int(entry[1]) for entry in logprobs]
    reason = meta.get("finish_reason") or {}
    return Sample(
        prompt_index=i,
        sample_index=j,
        prompt_ids=prompt_ids,
        output_ids=list(output_ids),
        rollout_logprobs=[float(entry[0]) for entry in logprobs],
        text=out.get("text"),
        finish_reason=reason.get("type", "abort") if isinstance(reason, dict) else str(reason),
        weight_version=str(meta.get("weight_version", "")),
        batch_index=batch_index,
    )
