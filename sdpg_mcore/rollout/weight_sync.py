"""Push trainer weights (HF names, full tensors) to the rollout servers: by disk, broadcast or tensor handles.

The input is an iterable of ``(hf_name, full_tensor)`` per pipeline stage — what
``checkpoints_convert.model_io.iter_hf_tensors`` yields on every TP rank of a stage (it all-gathers
one tensor at a time, so the whole model never sits on one rank). Only the stage's *source* rank
(TP rank 0, DP rank 0) sends; the other TP ranks pass ``is_source=False`` and merely drive the
iterator, which keeps their all-gathers in step.

Every backend has the interface of :class:`WeightSync`, driven the same way by the trainer::

    sync.begin()                                   # one rank, before any stage sends
    sync.send(named_tensors, version, stage=k)     # each stage's source (others: is_source=False)
    sync.commit(version)                           # one rank, after every stage sent

- :class:`DiskWeightSync`: each stage writes ``stage{k}.safetensors`` into a staging directory;
  ``commit`` publishes it with an atomic rename and calls ``/update_weights_from_disk``.
- :class:`DistributedWeightSync`: each stage source hosts a weight-update group (on a port its own
  host picks) joined by every TP rank of every server; tensors go out in buckets (default 512 MB,
  one dtype each): per bucket ONE ``/update_weights_from_distributed`` request, then ONE broadcast of
  the bucket's bytes (``load_format="flattened_bucket"``) or the tensors back to back.
- :class:`TensorWeightSync` (colocated engines, same devices as the trainer): per bucket one
  ``/update_weights_from_tensor`` carrying torch's shared-memory handles, no communicator at all.

SGLang (0.5.21+) only accepts distributed and tensor updates inside ``/begin_weight_update`` …
``/end_weight_update``; ``commit`` then flushes the radix cache (its KV came from the old weights),
sets the version with ``/update_weight_version`` and checks it in every server's ``/model_info``.

Failures. Every call carries the run's key (``api_key``). A server that refuses, or dies (its request
gets no answer), fails the send at once, not at the group's timeout: :class:`WeightSyncError` names
it in ``urls``. The broadcast group is then dropped here (NCCL aborts it; a gloo broadcast cannot be
aborted, so its daemon thread ends at the group's timeout and drops it then, while the caller goes
on); ``reset`` frees its name on the servers and starts a fresh HTTP pool, and the next send forms a
new group, under a new name, with every server. Restarting a dead server and pushing again is the
caller's (``train/rollout_io.py``: ``WeightPusher``).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpg_mcore.rollout.dist_group import WeightUpdateGroup, host_store, routable_address, start_collective
from sdpg_mcore.rollout.http import HTTPCallError, answer, check_all, post_all
from sdpg_mcore.rollout.protocol import FLATTENED_BUCKET

logger = logging.getLogger(__name__)
NamedTensors = Iterable[tuple[str, torch.Tensor]]
#: Files copied next to the weights so the published directory is a loadable HF model.
_HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class WeightSyncError(RuntimeError):
    """A server refused or failed a weight update, or reports the wrong ``weight_version``; ``urls``
    names the servers at fault (those that refused, answered wrong or did not answer)."""

    def __init__(self, message: str, urls: list[str] | None = None):
        super().__init__(message)
        self.urls = list(urls or [])


@dataclass
class WeightSyncStats:
    """What the last send moved and how fast."""

    num_tensors: int = 0
    num_bytes: int = 0
    num_requests: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into buckets of at most ``bucket_bytes`` (a bigger tensor gets its own), one dtype each.

    ``bucket_bytes <= 0`` gives one tensor per bucket (the per-tensor baseline). Order within a
    dtype is kept; a bucket is yielded as soon as it is full, so at most one bucket per dtype is held.
    """
    open_buckets: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket_bytes <= 0:
            yield [(name, tensor)]
            continue
        bucket = open_buckets.setdefault(tensor.dtype, [])
        if bucket and sizes[tensor.dtype] + nbytes > bucket_bytes:
            yield bucket
            bucket = open_buckets[tensor.dtype] = []
            sizes[tensor.dtype] = 0
        bucket.append((name, tensor))
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + nbytes
    for bucket in open_buckets.values():
        if bucket:
            yield bucket


# ---------------------------------------------------------------------------- versions
def weight_versions(
    server_urls: list[str], *, timeout_s: float = 30.0, api_key: str | None = None
) -> dict[str, str]:
    """``weight_version`` of every server, from ``GET /model_info`` (SGLang has no ``/get_weight_version``);
    ``"HTTP <status>"`` for a server that does not say (``HTTP 0``: no answer)."""
    out = {}
    for url in server_urls:
        status, body = answer(f"{url}/model_info", timeout_s=timeout_s, api_key=api_key)
        ok = status == 200 and isinstance(body, dict)
        out[url] = str(body.get("weight_version")) if ok else f"HTTP {status}"
    return out


def check_weight_versions(
    server_urls: list[str], expected: str, *, timeout_s: float = 30.0, api_key: str | None = None
) -> None:
    """Raise :class:`WeightSyncError` unless every server reports ``weight_version == expected``."""
    versions = weight_versions(server_urls, timeout_s=timeout_s, api_key=api_key)
    wrong = {u: v for u, v in versions.items() if v != str(expected)}
    if wrong:
        raise WeightSyncError(f"servers report weight_version {wrong}, expected {expected!r}", list(wrong))


def _post(
    urls: list[str], path: str, payload: dict[str, Any] | None, timeout_s: float, *, api_key: str | None
) -> None:
    try:
        post_all(urls, path, payload, timeout_s=timeout_s, api_key=api_key)
    except HTTPCallError as err:
        raise WeightSyncError(str(err), err.urls) from None


def flush_caches(
    server_urls: list[str], *, timeout_s: float = 60.0, poll_s: float = 0.2, api_key: str | None = None
) -> int:
    """``/flush_cache`` on every server, re-sent while one answers 400 (requests still finishing).

    Returns how many re-sends it took. The client's admin calls and the weight sync share this.
    """
    deadline = time.monotonic() + timeout_s
    pending, resends = list(server_urls), 0
    while True:
        results = {u: answer(f"{u}/flush_cache", {}, timeout_s=timeout_s, api_key=api_key) for u in pending}
        pending = [u for u, (status, _) in results.items() if status != 200]
        if not pending:
            return resends
        if any(results[u][0] != 400 for u in pending) or time.monotonic() > deadline:
            raise WeightSyncError(f"/flush_cache failed: { {u: results[u] for u in pending} }", pending)
        resends += 1
        time.sleep(poll_s)


class WeightSync:
    """The interface of every backend (module docstring); sessions, cache and version handled here."""

    #: Whether SGLang wants this kind of update inside a begin/end weight-update session.
    uses_session = True

    def __init__(self, server_urls: list[str], *, timeout_s: float = 600.0, api_key: str | None = None):
        self.server_urls = list(server_urls)
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.stats = WeightSyncStats()

    def _post(self, path: str, payload: dict[str, Any] | None) -> None:
        """POST to every server; :class:`WeightSyncError` naming those that failed or did not answer."""
        _post(self.server_urls, path, payload, self.timeout_s, api_key=self.api_key)

    def _submit(self, pool: ThreadPoolExecutor, url: str, path: str, payload: dict[str, Any]):
        """One POST on ``pool``; its future gives ``(status, body)`` (``(0, error)``: no answer)."""
        return pool.submit(answer, f"{url}{path}", payload, timeout_s=self.timeout_s, api_key=self.api_key)

    def begin(self) -> None:
        """Open the update on every server (before any stage sends)."""
        if self.uses_session:
            self._post("/begin_weight_update", {})

    def send(
        self, named_tensors: NamedTensors, version: str, *, stage: int = 0, is_source: bool = True
    ) -> WeightSyncStats:
        """Move this stage's tensors (``is_source=False``: only drive the iterator)."""
        raise NotImplementedError

    def commit(self, version: str, *, flush_cache: bool = True) -> None:
        """After every stage sent: close the session, flush caches, set ``version`` and check it.

        ``flush_cache=False`` while requests sit paused in place (asynchronous rollouts): a flush
        would wait for them, and SGLang cannot flush with requests in flight."""
        if self.uses_session:
            self._post("/end_weight_update", {})
        if flush_cache:
            flush_caches(self.server_urls, api_key=self.api_key)
        # SGLang aborts every running request on a version change unless told not to.
        self._post("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
        check_weight_versions(self.server_urls, str(version), api_key=self.api_key)

    def push(self, named_tensors: NamedTensors, version: str, *, flush_cache: bool = True) -> WeightSyncStats:
        """Single stage, single process: begin, send, commit."""
        self.begin()
        try:
            stats = self.send(named_tensors, version)
        except BaseException:
            self.abandon()
            raise
        self.commit(version, flush_cache=flush_cache)
        return stats

    def abandon(self) -> None:
        """After a failed send: close the session on every server (else the next ``begin`` is refused)."""
        if not self.uses_session:
            return
        for url in self.server_urls:
            status, body = answer(f"{url}/end_weight_update", {}, timeout_s=30.0, api_key=self.api_key)
            if status not in (200, 400):  # 400: no session open there (it never began, or restarted)
                logger.warning("end_weight_update on %s after a failed send: HTTP %s %s", url, status, body)

    def reset(self) -> None:
        """The servers changed (one was restarted): forget what was set up with the old ones."""

    def close(self) -> None:
        """Release what the backend holds (groups, buffers)."""


def _drain(named_tensors: NamedTensors) -> WeightSyncStats:
    for _ in named_tensors:  # keep the TP all-gathers of the iterator in step with the source
        pass
    return WeightSyncStats()


# ---------------------------------------------------------------------------- disk
class DiskWeightSync(WeightSync):
    """Safetensors in a shared directory + ``/update_weights_from_disk`` (no session needed)."""

    uses_session = False

    def __init__(
        self,
        server_urls: list[str],
        shared_dir: str | Path,
        hf_config_dir: str | Path | None = None,
        *,
        keep_last: int = 2,
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ):
        super().__init__(server_urls, timeout_s=timeout_s, api_key=api_key)
        self.shared_dir = Path(shared_dir)
        self.hf_config_dir = Path(hf_config_dir) if hf_config_dir is not None else None
        self.keep_last = keep_last

    def staging_dir(self, version: str) -> Path:
        return self.shared_dir / f".staging-{version}"

    def published_dir(self, version: str) -> Path:
        return self.shared_dir / f"weights-{version}"

    def send(
        self, named_tensors: NamedTensors, version: str, *, stage: int = 0, is_source: bool = True
    ) -> WeightSyncStats:
        """Write this stage's tensors to the staging directory (tmp file + rename)."""
        from safetensors.torch import save_file

        if not is_source:
            return _drain(named_tensors)
        start = time.perf_counter()
        tensors = {name: t.detach().contiguous().cpu() for name, t in named_tensors}
        staging = self.staging_dir(version)
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".stage{stage}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, staging / f"stage{stage}.safetensors")
        num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.stats = WeightSyncStats(len(tensors), num_bytes, 0, time.perf_counter() - start)
        return self.stats

    def commit(self, version: str, *, flush_cache: bool = True) -> None:
        """Publish the staging directory atomically, make every server load it, and check the version."""
        staging, final = self.staging_dir(version), self.published_dir(version)
        if not any(staging.glob("stage*.safetensors")):
            raise WeightSyncError(f"nothing to commit in {staging}: call send on each stage first")
        if self.hf_config_dir is not None:
            for name in _HF_SIDE_FILES:
                if (self.hf_config_dir / name).is_file():
                    shutil.copy2(self.hf_config_dir / name, staging / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        payload = {
            "model_path": str(final),
            "load_format": "auto",
            "weight_version": str(version),
            "flush_cache": flush_cache,
        }
        self._post("/update_weights_from_disk", payload)
        self.stats.num_requests = len(self.server_urls)
        check_weight_versions(self.server_urls, str(version), api_key=self.api_key)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        published = sorted(self.shared_dir.glob("weights-*"), key=lambda p: p.stat().st_mtime)
        for old in published[: max(0, len(published) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- bucketed senders
class _BucketSender(WeightSync):
    """Bucketing, double buffering and one request per bucket; subclasses move the bytes."""

    def __init__(self, server_urls: list[str], *, bucket_bytes: int, timeout_s: float, api_key: str | None):
        super().__init__(server_urls, timeout_s=timeout_s, api_key=api_key)
        self.bucket_bytes = bucket_bytes
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        """One HTTP call per server in flight (collectives run in threads of their own)."""
        return ThreadPoolExecutor(max_workers=len(self.server_urls), thread_name_prefix="weight-sync")

    def reset(self) -> None:
        """A fresh pool for the next attempt: a call of the failed one may still wait on a stuck server
        (up to its timeout), and no call may queue behind it — a server answers
        ``/init_weights_update_group`` only once every rank joined, so a queued one deadlocks the group
        (seen with real SGLang: a push after a server's restart hung both servers for 10 minutes)."""
        old, self._pool = self._pool, self._new_pool()
        old.shutdown(wait=False)

    def send(
        self, named_tensors: NamedTensors, version: str, *, stage: int = 0, is_source: bool = True
    ) -> WeightSyncStats:
        """One request per bucket; while bucket ``k`` is in flight the iterator produces bucket ``k + 1``."""
        if not is_source:
            return _drain(named_tensors)
        self._prepare_send()
        stats, start = WeightSyncStats(), time.perf_counter()
        in_flight: _InFlight | None = None
        for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            staged = self._stage(bucket, slot=index % 2)
            if in_flight is not None:
                in_flight.wait()
            in_flight = self._start(staged, bucket)
            stats.num_tensors += len(bucket)
            stats.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            stats.num_requests += 1
        if in_flight is not None:
            in_flight.wait()
        stats.seconds = time.perf_counter() - start
        self.stats = stats
        return stats

    def _prepare_send(self) -> None:
        """Before the first bucket (connect a group, ...)."""

    def _stage(self, bucket: list[tuple[str, torch.Tensor]], slot: int) -> Any:
        raise NotImplementedError

    def _start(self, staged: Any, bucket: list[tuple[str, torch.Tensor]]) -> _InFlight:
        raise NotImplementedError

    def _mark_broken(self) -> None:
        """A server refused mid-bucket: local state is out of step with it."""

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# ---------------------------------------------------------------------------- distributed
class DistributedWeightSync(_BucketSender):
    """Bucketed broadcast from one pipeline stage's source rank to every TP rank of every server.

    ``server_tp_sizes[i]`` is how many ranks server ``i`` holds in the group (its ``--tp-size``;
    rank = rank_offset + tp_rank), so ``world_size = 1 + sum(server_tp_sizes)``.
    ``master_address`` must be this rank's address as the servers see it (default:
    :func:`routable_address`); ``master_port=0`` lets this host pick a free port. ``stage`` names
    the group, so every pipeline stage has its own.
    """

    def __init__(
        self,
        server_urls: list[str],
        *,
        server_tp_sizes: list[int] | None = None,
        master_address: str | None = None,
        master_port: int = 0,
        stage: int = 0,
        backend: str = "gloo",
        bucket_bytes: int = 512 << 20,
        flatten: bool = True,
        group_prefix: str = "sdpg_weights",
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ):
        super().__init__(server_urls, bucket_bytes=bucket_bytes, timeout_s=timeout_s, api_key=api_key)
        self.server_tp_sizes = list(server_tp_sizes or [1] * len(self.server_urls))
        if len(self.server_tp_sizes) != len(self.server_urls):
            raise ValueError(f"server_tp_sizes {self.server_tp_sizes} for {len(self.server_urls)} servers")
        self.master_address = master_address or routable_address(self.server_urls)
        self.master_port = master_port
        self.stage = stage
        self.backend = backend
        # One big broadcast beats many small ones on both backends: it saves NCCL launches on GPU, and
        # on gloo it outruns back-to-back broadcasts despite the copy into it (tools/bench_weight_sync.py).
        self.flatten = flatten
        self.group_prefix = group_prefix
        self.generation = 0
        """How many groups this sender dropped (each gets a new name: see :attr:`group_name`)."""
        self.group: WeightUpdateGroup | None = None
        self._stale_names: list[str] = []
        self._device = "cuda" if backend == "nccl" else "cpu"
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._collective: Future | None = None
        """The last broadcast (or group forming) started: a dropped group outlives it (see ``destroy``)."""

    @property
    def world_size(self) -> int:
        return 1 + sum(self.server_tp_sizes)

    @property
    def group_name(self) -> str:
        """``sdpg_weights_pp<stage>``, then ``..._g<n>`` for the n-th re-formed group: a server keeps a
        name taken until the group is destroyed there, which a server that was stuck may not have seen."""
        base = f"{self.group_prefix}_pp{self.stage}"
        return base if not self.generation else f"{base}_g{self.generation}"

    def rank_offsets(self) -> list[int]:
        """Group rank of each server's TP rank 0: the trainer is 0, server ``i`` follows the ranks before it."""
        offsets, next_rank = [], 1
        for tp in self.server_tp_sizes:
            offsets.append(next_rank)
            next_rank += tp
        return offsets

    def connect(self) -> None:
        """Host the group as rank 0 while every server joins it (their HTTP calls run concurrently).

        A server that refuses or does not answer fails the call at once, not at the group's timeout."""
        store = host_store(self.master_address, 0, self.timeout_s)  # a fresh port per group
        self.master_port = store.port
        init = {"master_address": self.master_address, "master_port": self.master_port}
        init |= {"world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
        futures = [
            self._submit(self._pool, url, "/init_weights_update_group", {**init, "rank_offset": offset})
            for url, offset in zip(self.server_urls, self.rank_offsets())
        ]
        created = self._collective = start_collective(
            lambda: WeightUpdateGroup.create(
                self.backend, init["master_address"], init["master_port"], rank=0,
                world_size=init["world_size"], group_name=init["group_name"], timeout_s=self.timeout_s, store=store,
            )
        )  # fmt: skip
        try:
            _InFlight(self, "/init_weights_update_group", futures, created).wait()
        except WeightSyncError:
            self._stale_names.append(self.group_name)  # taken on the servers that joined
            self.generation += 1
            raise
        self.group = created.result()

    def reset(self) -> None:
        """Drop the group here and on the servers that answer (a server that died took its side with
        it); the next send forms a new one, under a new name, with every server, from a fresh pool."""
        super().reset()
        self._mark_broken()
        for name in self._stale_names:
            self._destroy_on_servers(name)
        self._stale_names.clear()

    def _prepare_send(self) -> None:
        if self.group is None:
            self.connect()

    def _stage(self, bucket, slot: int) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The request body of ``bucket`` and, when flattened, its bytes copied into buffer ``slot``."""
        flatten = self.flatten and len(bucket) > 1
        payload: dict[str, Any] = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name,
            "flush_cache": False,
        }
        if not flatten:
            return payload, None
        payload["load_format"] = FLATTENED_BUCKET
        dtype, numel = bucket[0][1].dtype, sum(t.numel() for _, t in bucket)
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < numel:  # reused across buckets and pushes: no page faults
            buffer = self._buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype, device=self._device)
        flat = buffer[:numel]
        torch.cat([t.detach().reshape(-1) for _, t in bucket], out=flat)
        return payload, flat.view(torch.uint8)  # SGLang receives a flattened bucket as bytes

    def _start(self, staged, bucket) -> _InFlight:
        """Post the request to every server and start the broadcast in a worker thread."""
        payload, flat = staged
        group, device = self.group, self._device
        assert group is not None
        futures = [
            self._submit(self._pool, u, "/update_weights_from_distributed", payload) for u in self.server_urls
        ]

        def broadcast() -> None:
            if flat is not None:
                group.broadcast(flat, 0)
            else:
                group.broadcast_many([t.detach().to(device).contiguous() for _, t in bucket], 0)

        self._collective = start_collective(broadcast)
        return _InFlight(self, "/update_weights_from_distributed", futures, self._collective)

    def _mark_broken(self) -> None:
        """Out of step with the servers: drop the group here, without waiting for a broadcast the
        servers never joined (:meth:`WeightUpdateGroup.destroy`); the next send forms a new one under
        a new name (:meth:`reset` also frees the old name on the servers)."""
        if self.group is not None:
            self._stale_names.append(self.group_name)
            self.group.destroy(after=self._collective)
            self.group = None
            self.generation += 1

    def _destroy_on_servers(self, name: str) -> None:
        """Free the group ``name`` on every server that still holds it (best effort: a restarted
        server never had it)."""
        for url in self.server_urls:
            payload = {"group_name": name}
            status, body = answer(
                f"{url}/destroy_weights_update_group", payload, timeout_s=30, api_key=self.api_key
            )
            if status not in (200, 400):
                logger.warning(
                    "destroy_weights_update_group %s on %s: HTTP %s %s", name, url, status, str(body)[:200]
                )

    def close(self) -> None:
        """Leave the group on the servers (frees its name there) and here."""
        if self.group is not None:
            self._destroy_on_servers(self.group_name)
            self.group.destroy(after=self._collective)
            self.group = None
        super().close()


# ---------------------------------------------------------------------------- tensor (colocated)
def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``: ForkingPickler + base64.

    Tensors travel as shared-memory handles (CUDA IPC on GPU). On CPU the ``file_system`` sharing
    strategy must be on (:class:`TensorWeightSync` sets it): with the default ``file_descriptor``
    strategy the receiver's fd hand-off fails and the SGLang scheduler process dies.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named_tensors)
    return base64.b64encode(buf.getvalue()).decode()


class TensorWeightSync(_BucketSender):
    """Colocated engines: per bucket one ``/update_weights_from_tensor`` with shared-memory handles.

    What slime and verl do when SGLang shares the trainer's GPUs: no communicator (NCCL refuses two
    ranks of one communicator on one GPU), the engine maps the trainer's tensors. Each server gets
    one payload per TP rank (``server_tp_sizes``); every rank maps the same full tensors.
    """

    def __init__(
        self,
        server_urls: list[str],
        *,
        server_tp_sizes: list[int] | None = None,
        bucket_bytes: int = 512 << 20,
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ):
        super().__init__(server_urls, bucket_bytes=bucket_bytes, timeout_s=timeout_s, api_key=api_key)
        self.server_tp_sizes = list(server_tp_sizes or [1] * len(self.server_urls))
        if not torch.cuda.is_available():
            torch.multiprocessing.set_sharing_strategy("file_system")

    def _stage(self, bucket, slot: int) -> tuple[list[tuple[str, torch.Tensor]], str]:
        # Own contiguous copies: they must stay alive (and unchanged) until the servers answered.
        tensors = [(n, t.detach().contiguous().clone()) for n, t in bucket]
        return tensors, serialize_named_tensors(tensors)

    def _start(self, staged, bucket) -> _InFlight:
        tensors, serialized = staged
        futures = [
            self._submit(
                self._pool,
                u,
                "/update_weights_from_tensor",
                {"serialized_named_tensors": [serialized] * tp, "flush_cache": False},
            )
            for u, tp in zip(self.server_urls, self.server_tp_sizes)
        ]
        return _InFlight(self, "/update_weights_from_tensor", futures, None, keep_alive=tensors)


# ---------------------------------------------------------------------------- choosing one
WEIGHT_SYNC_MODES = ("disk", "distributed", "tensor")


def server_tp_sizes(server_urls: list[str], *, api_key: str | None = None) -> list[int]:
    """Each server's ``--tp-size`` (its ranks in a weight-update group), from ``/server_info``."""
    from sdpg_mcore.rollout.sglang_launch import server_facts

    return [server_facts(u, api_key=api_key).tp_size for u in server_urls]


def make_weight_sync(
    mode: str,
    server_urls: list[str],
    *,
    server_tp_sizes: list[int] | None = None,
    stage: int = 0,
    shared_dir: str | Path = "weights",
    hf_dir: str | Path | None = None,
    bucket_bytes: int = 512 << 20,
    backend: str = "gloo",
    api_key: str | None = None,
) -> WeightSync:
    """The backend for ``rollout.weight_sync``: ``disk``, ``distributed`` (broadcast) or ``tensor`` (colocated)."""
    if mode == "disk":
        return DiskWeightSync(server_urls, shared_dir, hf_dir, keep_last=1, api_key=api_key)
    if mode == "distributed":
        return DistributedWeightSync(
            server_urls,
            server_tp_sizes=server_tp_sizes,
            stage=stage,
            bucket_bytes=bucket_bytes,
            backend=backend,
            api_key=api_key,
        )
    if mode == "tensor":
        return TensorWeightSync(
            server_urls, server_tp_sizes=server_tp_sizes, bucket_bytes=bucket_bytes, api_key=api_key
        )
    raise ValueError(f"rollout.weight_sync={mode!r}: choose one of {list(WEIGHT_SYNC_MODES)}")


# ---------------------------------------------------------------------------- shared
def _raise_failed(urls: list[str], path: str, results: list[tuple[int, Any]]) -> None:
    try:
        check_all(urls, path, results)
    except HTTPCallError as err:
        raise WeightSyncError(str(err), err.urls) from None


class _InFlight:
    """A bucket on the wire (or a group forming): the servers' HTTP answers and, for broadcasts, the
    local side (``sent``, a future). A server that refuses, or dies (no answer), fails the wait at
    once, not at the group's timeout: it never joins the collective the local side waits in."""

    def __init__(self, sync: _BucketSender, path: str, futures: list, sent, keep_alive=None):
        self.sync, self.path, self.futures, self.sent = sync, path, futures, sent
        self.keep_alive = keep_alive

    def wait(self) -> None:
        urls = self.sync.server_urls
        while self.sent is not None and not self.sent.done():
            wait([self.sent, *self.futures], return_when=FIRST_COMPLETED)
            refused = [(u, f) for u, f in zip(urls, self.futures) if f.done() and f.result()[0] != 200]
            if refused and not self.sent.done():
                self.sync._mark_broken()
                _raise_failed([u for u, _ in refused], self.path, [f.result() for _, f in refused])
        if self.sent is not None and self.sent.exception() is not None:
            self.sync._mark_broken()
            bad = [u for u, f in zip(urls, self.futures) if f.result()[0] != 200]
            raise WeightSyncError(
                f"{self.path}: the collective with the servers failed: {self.sent.exception()}", bad
            )
        _raise_failed(urls, self.path, [f.result() for f in self.futures])
        self.keep_alive = None
