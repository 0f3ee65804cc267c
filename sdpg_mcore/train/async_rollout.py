"""Asynchronous rollouts (``rollout.async_steps = k >= 1``): the next steps' rollouts are generated
while this step trains.

Rank 0 runs one background thread that generates and scores the rollouts of the coming steps, in
step order, with its own HTTP client (``trainer.generate``, the function the synchronous loop uses);
the main thread takes each step's scored responses when the step starts (broadcast to every rank,
as in the synchronous loop) and pushes new weights after it. The loop picks these phases or the
synchronous ones with :func:`phases`; everything else is shared.

Staleness. The weights after step v are version v (0: the initial weights). The rollout of step s
is started once version ``s - 1 - k`` is on the servers, so each of its tokens comes from a version
in ``[s - 1 - k, s - 1]``: at most k versions older than the weights step s trains from (version
``s - 1``); k = 0 is the synchronous loop. Each response records the version its server reports;
each step logs the lag (``rollout/version_lag_max``, ``rollout/version_lag_mean``; ``async/start_lag``
bounds its oldest token) next to the rollout/old log-prob mismatch (``logprob_mismatch``). The loss
uses the trainer's recomputed old log-probs, as in the synchronous loop, and by default weights each
token's policy-gradient term by ``min(pi_old / pi_rollout, 2)`` (``algorithm.rollout_is_cap``, the
decoupled PPO objective): on the tiny example (``tools/bench_async.py``) it took async - sync accuracy
over steps 31-40 from -0.049 +- 0.017 (3 seeds) to -0.016 +- 0.011 (5 seeds). At fixed weights
(``tools/offpolicy_grad.py``, tiny recipe, samples one version stale) the uncorrected policy
gradient is off by 55-65 % of its norm, the weighted one by at most ~20 % (squared bias 0.31 and 0.42
of the squared norm at versions 6 and 21, against -0.02 +- 0.02 and 0.05 +- 0.02); a per-sequence
weight does no better, a cap of 10 no better and 1.3-1.8x noisier; the KL term on stale states
needs no weight (0.002 +- 0.005, 0.0006 +- 0.0004). What remains at version 21 (0.05, at right angles
to the fresh gradient: the stale one's length along it is 1.04 +- 0.04) seems to come from the
group-normalised advantages, whose mean and std come from the stale group: with advantages
``R - mean reward of an independent fresh group`` in both (no std), the weighted gradient's bias is
-0.008 +- 0.021; importance-weighting the stale group's mean (and std) instead makes it larger
(0.12; 0.07). Lower caps trade that bias for noise and train worse (cap
1.25: -0.036 +- 0.013, 8 seeds). Learning from one step old samples therefore still costs at a large
step size: at the tiny recipe's lr 5e-4 async trails by 1.8 +- 0.5 points over steps 31-40 (16
seeds), at 2.5e-4 by 0.3 (README).

Pushing weights while generating: generation is paused in place (``/pause_generation`` with
``mode=in_place``), the weights are pushed, generation continues (``/continue_generation``). Requests
in flight stall for exactly the push and keep their KV cache, so a response may finish under the
newer weights; its rollout log-probs are still the probabilities it was sampled with. Chosen over
abort-and-resume, which would re-prefill every prompt and partial response in flight and stitch
partial outputs in the client; the dev server and SGLang (which updates at once while paused) both
support it. These pushes do not flush the servers' caches (SGLang cannot with requests in flight),
so with SGLang's radix cache on, a prompt seen again may reuse KV entries of older weights; the
rollout log-probs still record what was sampled.

A server that dies. The thread's client asks the supervisor to restart it
(``rollout/supervisor.py``) and re-sends the requests it lost; pauses and continues skip a server
that does not answer, and the push restarts it and re-forms the update group (``WeightPusher``).
While paused for a push, servers do not answer SGLang's generating ``/health`` nor serve the router:
the supervisor is told (``ServerSupervisor.paused``), so neither its watchdog nor a failed request
takes that for a fault. When a rollout stops because the restarted servers wait for weights that
only every rank can push (distributed or tensor sync), :meth:`AsyncRollouts.take` stops the rollouts
in flight, every rank pushes the current weights, and the dropped rollouts are started again from
the prompts they had drawn.

Data cursor. The thread draws prompts from its own copy of the sampler; when the trainer takes a
step's rollout, ``run.sampler`` becomes that copy's state after the step's draws (dynamic sampling
included). A checkpoint therefore records exactly the prompts trained on: a resumed run regenerates
the rollouts that were in flight (from the resumed weights), so no prompt is lost or used twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from sdpg_mcore.train.batch import Response
from sdpg_mcore.train.metrics_log import PhaseTimer
from sdpg_mcore.train.rollout_io import served

logger = logging.getLogger(__name__)


@contextmanager
def phases(run, rollout: Callable, sync_weights: Callable, generate: Callable) -> Iterator[tuple]:
    """``(rollout, sync_weights)`` phases of the loop: the synchronous ones, or the overlapped ones
    when ``rollout.async_steps > 0`` (stopped, in-flight requests aborted, when the loop ends)."""
    if not run.cfg.rollout.async_steps:
        yield rollout, sync_weights
        return
    overlap = AsyncRollouts(run, generate, sync_weights)
    try:
        yield overlap.take, overlap.push
    finally:
        overlap.close()


@dataclass
class _Rollout:
    """One step's rollout, generated in the background (rank 0)."""

    step: int
    start_version: int
    """Weights on the servers when it was started: no token comes from an older version."""
    future: Future
    """Its ``(responses, metrics, sampler state after its draws)``."""


class AsyncRollouts:
    """The overlapped rollout and weight-sync phases; :meth:`take` and :meth:`push` are collective."""

    def __init__(self, run, generate: Callable, sync_weights: Callable):
        self.run, self.k = run, run.cfg.rollout.async_steps
        self._generate, self._sync_weights = generate, sync_weights
        steps = run.steps()
        self.last_step = steps[-1] if len(steps) else run.start_step
        self.version = run.start_step  # the servers hold the start (or resumed) weights
        run.weights.flush_cache = False  # pushes happen with requests paused in place on the servers
        self.pending: dict[int, _Rollout] = {}
        self._closing = threading.Event()
        if run.rank0:
            from sdpg_mcore.rollout.client import RolloutClient

            # Its own client and sampler: the main thread's client evaluates meanwhile, and the
            # trainer's sampler must only count the prompts of rollouts already trained on.
            self.session = copy.copy(run.session)
            on_failure = run.session.client.on_failure
            self.session.client = RolloutClient(run.session.client.config, on_failure=on_failure)
            self.control = RolloutClient(run.session.client.config)
            self.sampler = copy.deepcopy(run.sampler)
            self._sampler_before: dict[int, dict] = {}  # the thread's sampler when each rollout began
            self._dropped: list[int] = []  # rollouts stopped for want of weights, to start again
            cpus = set(run.cfg.rollout.async_cpus)
            if cpus - set(range(os.cpu_count() or 1)):
                raise ValueError(
                    f"rollout.async_cpus={sorted(cpus)}: this host has CPUs 0-{(os.cpu_count() or 1) - 1}; "
                    "list some of them, or [] to stay on the trainer's"
                )
            self.pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="async-rollout", initializer=_pin, initargs=(cpus,)
            )
        for step in range(run.start_step + 1, run.start_step + 2 + self.k):
            self._start(step)

    # ---------------------------------------------------------------- phases
    def take(self, run, step: int) -> tuple[list[Response], dict[str, float]]:
        """Step ``step``'s scored responses on every rank; ``run.sampler`` moves past its prompts."""
        timer = PhaseTimer()
        with timer.phase("rollout"):
            box = [served(run.weights, run.rank0, lambda: self._result(step))]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(box, src=0)
            responses, metrics, sampler_state, start_version = box[0]
            run.sampler.load_state_dict(sampler_state)
        cursor = {"data/epoch": sampler_state["epoch"], "data/position": sampler_state["position"]}
        lag = {**staleness(responses, step), "async/start_lag": float(step - 1 - start_version)}
        metrics = {**metrics, **lag, **cursor}
        return responses, {**metrics, **timer.pop()}

    def push(self, run, step: int) -> dict[str, float]:
        """The weights after ``step`` to the servers, generation paused in place meanwhile; then start
        the rollout that may now use them (step ``step + 1 + k``)."""
        began = time.perf_counter()
        with self._paused():
            self._control("/pause_generation", {"mode": "in_place"})
            try:
                metrics = self._sync_weights(run, step)
            finally:
                self._control("/continue_generation", {})
        self.version = step
        self._start(step + 1 + self.k)
        return {**metrics, "async/paused_s": time.perf_counter() - began}

    def close(self) -> None:
        """Stop generating: drop rollouts not started, abort the one in flight, wait for the thread."""
        if not self.run.rank0:
            return
        self._closing.set()
        self._stop_pending()
        self.pool.submit(self.session.client.shutdown)  # on its thread, once the rollout there ends
        self.pool.shutdown(wait=False)
        self.control.shutdown()

    def _stop_pending(self) -> None:
        """Cancel the rollouts not started, abort the one in flight and wait for it; forget them all."""
        for job in self.pending.values():
            job.future.cancel()
        running = [job.future for job in self.pending.values() if not job.future.done()]
        deadline = time.monotonic() + 60.0
        for future in running:  # at most one: the thread runs one rollout at a time
            while not future.done() and time.monotonic() < deadline:
                # Repeated: a request the thread sends after one abort is caught by the next.
                self.control.run(self.control.abort(abort_all=True))
                wait([future], timeout=0.5)
        self.pending.clear()

    def _result(self, step: int):
        """Rank 0: step ``step``'s rollout, once it is done. One that stopped because the servers wait
        for weights (``ServersNeedWeights``) stops the later ones too; after the push that ``served``
        makes, they all start again, the thread's sampler back where the first of them began."""
        from sdpg_mcore.rollout.supervisor import ServersNeedWeights

        if self._dropped:
            for dropped in self._dropped:
                self._start(dropped)
            self._dropped = []
        job = self.pending[step]
        try:
            responses, metrics, sampler_state = job.future.result()
        except ServersNeedWeights:
            self._dropped = sorted(self.pending)
            self._stop_pending()
            self.sampler.load_state_dict(self._sampler_before[step])
            raise
        del self.pending[step]
        return responses, metrics, sampler_state, job.start_version

    # ---------------------------------------------------------------- rank 0
    def _start(self, step: int) -> None:
        if self.run.rank0 and step <= self.last_step:
            self.pending[step] = _Rollout(step, self.version, self.pool.submit(self._rollout, step))

    def _rollout(self, step: int):
        """On the thread: draw step ``step``'s prompts, generate and score them."""
        cpu_began = time.thread_time()
        self._sampler_before[step] = copy.deepcopy(self.sampler.state_dict())
        self._sampler_before.pop(step - 2 - self.k, None)  # taken long ago: never needed again
        draws = _StoppableDraws(self.sampler, self._closing)
        first = draws.next_batch()
        responses, metrics = self._generate(self.run, self.session, draws, first, step)
        # CPU the thread spent in the trainer's process (client, scoring): with the GIL, time training lost.
        metrics = {**metrics, "async/thread_cpu_s": time.thread_time() - cpu_began}
        return responses, metrics, self.sampler.state_dict()

    def _paused(self):
        """Rank 0's supervisor told that the servers are paused on purpose (``ServerSupervisor.paused``):
        unanswered health probes are no fault meanwhile, and failed requests wait for the end."""
        supervisor = self.run.session.supervisor if self.run.rank0 else None
        return supervisor.paused() if supervisor is not None else contextlib.nullcontext()

    def _control(self, path: str, payload: dict) -> None:
        """POST ``path`` to every worker (rank 0); raise naming the workers that refused. A worker that
        does not answer has died: it has nothing to pause, and the push restarts it."""
        if not self.run.rank0:
            return
        from sdpg_mcore.rollout.client import RolloutError

        urls = self.run.session.worker_urls
        results = self.control.run(_post_all(self.control, urls, path, payload))
        bad = []
        for url, result in zip(urls, results):
            if isinstance(result, BaseException):
                logger.warning("%s: %s did not answer (%s); the weight push restarts it", path, url, result)
            elif result[0] != 200:
                bad.append(f"{url}: HTTP {result[0]} {str(result[1])[:200]}")
        if bad:
            raise RolloutError(f"{path} failed on {len(bad)} worker(s): " + "; ".join(bad))


def _pin(cpus: set[int]) -> None:
    """Run the calling thread (and the processes it starts) on ``cpus``; Linux pins per thread."""
    if cpus:
        os.sched_setaffinity(0, cpus)


class _StoppableDraws:
    """The thread's sampler as generation sees it: no more draws (dynamic sampling) once stopping."""

    def __init__(self, sampler, closing: threading.Event):
        self.sampler, self.closing = sampler, closing

    def next_batch(self) -> list[int]:
        if self.closing.is_set():
            raise RuntimeError("asynchronous rollouts stopped; no further prompts are drawn")
        return self.sampler.next_batch()


async def _post_all(client, urls: list[str], path: str, payload: dict) -> list:
    """``(status, body)`` of every worker, or the connection error of one that did not answer."""
    import aiohttp

    results = await asyncio.gather(
        *(client.post(path, payload, url=url) for url in urls), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
            result, (aiohttp.ClientError, asyncio.TimeoutError)
        ):
            raise result
    return results


def staleness(responses: list[Response], step: int) -> dict[str, float]:
    """How many versions older than the trainer's (``step - 1``) the weights that sampled the step were
    (as the servers report them; 0 throughout when synchronous)."""
    lags = [step - 1 - r.weight_version for r in responses]
    return {"rollout/version_lag_max": float(max(lags)), "rollout/version_lag_mean": sum(lags) / len(lags)}
