"""The dev server's scheduler: turns concurrent ``/generate`` calls into batched engine steps.

All model work runs on ONE thread (``model_executor``), so the event loop keeps answering HTTP
(health, abort, pause) while a batch decodes. Requests that arrive together are prefilled as one
cohort; cohorts are stepped round-robin, so a new cohort starts decoding without waiting for the
older ones to finish (continuous-ish batching). Weight updates wait until no cohort is mid-flight
(or generation is paused in place), like SGLang's model-update lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from sdpg_mcore.rollout.engine import Cohort, GenRequest, HFEngine

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the queue, the live cohorts and the pause/update state of one engine."""

    def __init__(self, engine: HFEngine, *, max_batch_size: int = 64, gather_s: float = 0.005):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.gather_s = gather_s
        self.model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.pending: deque[GenRequest] = deque()
        self.cohorts: list[Cohort] = []
        self.futures: dict[int, asyncio.Future] = {}
        self.paused = False
        self.released_tags: set[str] = set()
        self._updates_waiting = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.model_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def num_in_flight(self) -> int:
        return len(self.pending) + sum(len(c.requests) for c in self.cohorts)

    async def submit(self, requests: list[GenRequest]) -> list[GenRequest]:
        """Queue ``requests`` and wait until each has finished (or was aborted)."""
        loop = asyncio.get_running_loop()
        waits = []
        for req in requests:
            fut = loop.create_future()
            self.futures[id(req)] = fut
            self.pending.append(req)
            waits.append(fut)
        self._wake.set()
        try:
            return list(await asyncio.gather(*waits))
        except asyncio.CancelledError:
            # The HTTP client went away: stop spending compute on its requests.
            self.abort(lambda r: r in requests, "client disconnected")
            raise

    def abort(self, match, message: str) -> int:
        """Abort queued and running requests for which ``match(req)`` holds; return how many."""
        count = 0
        for req in list(self.pending):
            if match(req):
                self.pending.remove(req)
                req.abort_message = message
                self.engine.sample_into(req, None)
                self._resolve(req)
                count += 1
        for cohort in self.cohorts:
            for req in cohort.requests:
                if match(req) and req.abort_message is None:
                    req.abort_message = message
                    count += 1
        self._wake.set()
        return count

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._wake.set()

    @asynccontextmanager
    async def exclusive(self):
        """Hold the model for an update: no new cohorts start; wait for running ones (unless paused)."""
        self._updates_waiting += 1
        try:
            while self.cohorts and not self.paused:
                await asyncio.sleep(0.005)
            # Paused in place: let the engine call already running finish before weights change.
            await self.run_on_model(lambda: None)
            yield
        finally:
            self._updates_waiting -= 1
            self._wake.set()

    async def run_on_model(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.model_executor, fn, *args)

    # ---------------------------------------------------------------- loop
    def _resolve(self, req: GenRequest) -> None:
        fut = self.futures.pop(id(req), None)
        if fut is not None and not fut.done():
            fut.set_result(req)

    def _can_admit(self) -> bool:
        return bool(self.pending) and not self.paused and not self.released_tags and not self._updates_waiting

    def _steppable_cohorts(self) -> list:
        """The cohorts to decode now: all of them, or while paused only those holding aborted requests.

        Why: an abort only marks a running request; it is answered at its cohort's next step. A
        pause in "abort" mode must still take that step, else the aborted request (and its client)
        waits for /continue_generation.
        """
        if not self.paused:
            return list(self.cohorts)
        return [c for c in self.cohorts if any(r.abort_message is not None for r in c.requests)]

    async def _run(self) -> None:
        while True:
            if not self._can_admit() and not self._steppable_cohorts():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._admit_and_step()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a model error must fail its requests, not the server
                logger.exception("engine step failed")
                for req in [r for c in self.cohorts for r in c.requests]:
                    req.finish_reason = {"type": "abort", "message": f"engine error: {err}"}
                    self._resolve(req)
                self.cohorts = []

    async def _prefill(self, batch: list[GenRequest]) -> None:
        """Start a cohort; if its prefill fails, retry each request alone so one bad request fails alone."""
        try:
            self.cohorts.append(await self.run_on_model(self.engine.prefill, batch))
            return
        except Exception as err:
            if len(batch) == 1:
                logger.exception("prefill of %s failed", batch[0].rid)
                batch[0].finish_reason = {"type": "abort", "message": f"engine error: {err}"}
                self._resolve(batch[0])
                return
        for req in batch:
            await self._prefill([req])

    async def _admit_and_step(self) -> None:
        if self._can_admit():
            await asyncio.sleep(self.gather_s)  # let requests sent together land in one cohort
            batch = [self.pending.popleft() for _ in range(min(self.max_batch_size, len(self.pending)))]
            await self._prefill(batch)
        for cohort in self._steppable_cohorts():
            if cohort not in self._steppable_cohorts():  # paused meanwhile: stop at this token
                continue
            for req in await self.run_on_model(self.engine.step, cohort):
                self._resolve(req)
            if not cohort.requests:
                self.cohorts.remove(cohort)
