"""Push trainer weights (HF names, full tensors) to the rollout servers: by disk or by broadcast.

The input is an iterable of ``(hf_name, full_tensor)`` per pipeline stage — what
``checkpoints_convert.model_io.iter_hf_tensors`` yields on every TP rank of a stage (it all-gathers
one tensor at a time, so the whole model never sits on one rank). Only the stage's *source* rank
(TP rank 0, DP rank 0) sends; the other TP ranks pass ``is_source=False`` and merely drive the
iterator, which keeps their all-gathers in step.

- :class:`DiskWeightSync`: each stage writes ``stage{k}.safetensors`` into a staging directory,
  one rank publishes it with an atomic rename and calls ``/update_weights_from_disk``.
- :class:`DistributedWeightSync`: each stage source hosts a weight-update group joined by every
  server (``/init_weights_update_group``); tensors go out in buckets (default 512 MB, one dtype
  each): per bucket ONE ``/update_weights_from_distributed`` request listing names/dtypes/shapes,
  then ONE broadcast of the concatenated flat buffer (``load_format="flattened_bucket"``, the
  default) or, with ``flatten=False``, the bucket's tensors broadcast back to back with no copies.

Every update sets ``weight_version`` on the servers; :func:`check_weight_versions` verifies it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpg_mcore.rollout.dist_group import WeightUpdateGroup
from sdpg_mcore.rollout.protocol import FLATTENED_BUCKET
from sdpg_mcore.rollout.servers import http_json

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
    """A server refused or failed a weight update, or reports the wrong ``weight_version``."""


@dataclass
class WeightSyncStats:
    """What the last push moved and how fast."""

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


def check_weight_versions(server_urls: list[str], expected: str, *, timeout_s: float = 30.0) -> None:
    """Raise :class:`WeightSyncError` unless every server reports ``weight_version == expected``."""
    wrong = {}
    for url in server_urls:
        status, body = http_json(f"{url}/get_weight_version", timeout_s=timeout_s)
        version = body.get("weight_version") if status == 200 and isinstance(body, dict) else f"HTTP {status}"
        if str(version) != str(expected):
            wrong[url] = version
    if wrong:
        raise WeightSyncError(f"servers report weight_version {wrong}, expected {expected!r}")


def _post_all(
    pool: ThreadPoolExecutor, urls: list[str], path: str, payload: dict[str, Any], timeout_s: float
):
    """POST ``payload`` to every URL concurrently; returns futures of ``(status, body)``."""
    return [pool.submit(http_json, f"{url}{path}", payload, timeout_s=timeout_s) for url in urls]


def _check(futures, urls: list[str], path: str) -> None:
    errors = []
    for url, fut in zip(urls, futures):
        status, body = fut.result()
        if status != 200 or (isinstance(body, dict) and body.get("success") is False):
            errors.append(f"{url}: HTTP {status} {str(body)[:300]}")
    if errors:
        raise WeightSyncError(f"{path} failed on {len(errors)} server(s): " + "; ".join(errors))


# ---------------------------------------------------------------------------- disk
class DiskWeightSync:
    """Safetensors in a shared directory + ``/update_weights_from_disk``.

    Single stage: ``push(named_tensors, version)``. Pipeline stages: every stage source calls
    ``write_stage(named_tensors, version, stage=k)``, the trainer barriers, then one rank calls
    ``commit(version)``.
    """

    def __init__(
        self,
        server_urls: list[str],
        shared_dir: str | Path,
        hf_config_dir: str | Path | None = None,
        *,
        keep_last: int = 2,
        timeout_s: float = 600.0,
    ):
        self.server_urls = list(server_urls)
        self.shared_dir = Path(shared_dir)
        self.hf_config_dir = Path(hf_config_dir) if hf_config_dir is not None else None
        self.keep_last = keep_last
        self.timeout_s = timeout_s
        self.stats = WeightSyncStats()

    def staging_dir(self, version: str) -> Path:
        return self.shared_dir / f".staging-{version}"

    def published_dir(self, version: str) -> Path:
        return self.shared_dir / f"weights-{version}"

    def write_stage(
        self, named_tensors: NamedTensors, version: str, *, stage: int = 0, is_source: bool = True
    ) -> int:
        """Write this stage's tensors to the staging directory (tmp file + rename); return bytes written."""
        from safetensors.torch import save_file

        if not is_source:
            for _ in named_tensors:  # keep the TP all-gathers of the iterator in step with the source
                pass
            return 0
        tensors = {name: t.detach().contiguous().cpu() for name, t in named_tensors}
        staging = self.staging_dir(version)
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".stage{stage}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, staging / f"stage{stage}.safetensors")
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self, version: str, *, flush_cache: bool = True) -> Path:
        """Publish the staging directory atomically, make every server load it, and check the version."""
        staging, final = self.staging_dir(version), self.published_dir(version)
        if not any(staging.glob("stage*.safetensors")):
            raise WeightSyncError(f"nothing to commit in {staging}: call write_stage on each stage first")
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
        with ThreadPoolExecutor(max_workers=max(1, len(self.server_urls))) as pool:
            _check(
                _post_all(pool, self.server_urls, "/update_weights_from_disk", payload, self.timeout_s),
                self.server_urls,
                "/update_weights_from_disk",
            )
        self.stats.num_requests = len(self.server_urls)
        check_weight_versions(self.server_urls, str(version))
        self._prune(keep=final)
        return final

    def push(self, named_tensors: NamedTensors, version: str, *, is_source: bool = True) -> WeightSyncStats:
        """Single-stage sync: write, publish, load, verify."""
        start = time.perf_counter()
        num_bytes = self.write_stage(named_tensors, version, is_source=is_source)
        if is_source:
            self.commit(version)
        self.stats = WeightSyncStats(0, num_bytes, len(self.server_urls), time.perf_counter() - start)
        return self.stats

    def _prune(self, keep: Path) -> None:
        published = sorted(self.shared_dir.glob("weights-*"), key=lambda p: p.stat().st_mtime)
        for old in published[: max(0, len(published) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- distributed
class DistributedWeightSync:
    """Bucketed broadcast from one pipeline stage's source rank to every server.

    Per bucket one request; its tensors travel as one flattened broadcast (``flatten``, the default)
    or as per-tensor broadcasts all in flight at once, received straight into the server's
    weights. ``server_ranks`` is how many group ranks each server occupies (its TP x DP size for real
    SGLang, 1 for the dev server). ``stage`` picks the group name and, by default, the port
    (``master_port + stage``) so every stage has its own group.
    """

    def __init__(
        self,
        server_urls: list[str],
        *,
        master_address: str = "127.0.0.1",
        master_port: int,
        stage: int = 0,
        backend: str = "gloo",
        bucket_bytes: int = 512 << 20,
        flatten: bool = True,
        server_ranks: int = 1,
        group_prefix: str = "sdpg_weights",
        timeout_s: float = 600.0,
    ):
        self.server_urls = list(server_urls)
        self.master_address = master_address
        self.master_port = master_port + stage
        self.stage = stage
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        # One big broadcast beats many small ones on both backends: it saves NCCL launches on GPU, and
        # on gloo it outruns back-to-back broadcasts despite the copy into it (tools/bench_weight_sync.py,
        # bf16: 2.1-2.8 vs 1.2-2.4 GB/s with one server, 1.2-1.7 vs 0.7 with two).
        self.flatten = flatten
        self.server_ranks = server_ranks
        self.group_name = f"{group_prefix}_pp{stage}"
        self.timeout_s = timeout_s
        self.group: WeightUpdateGroup | None = None
        self.stats = WeightSyncStats()
        self._device = "cuda" if backend == "nccl" else "cpu"
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=len(self.server_urls) + 2, thread_name_prefix="weight-sync"
        )

    @property
    def world_size(self) -> int:
        return 1 + self.server_ranks * len(self.server_urls)

    def connect(self) -> None:
        """Host the group as rank 0 while every server joins it (their HTTP calls run concurrently)."""
        futures = [
            self._pool.submit(
                http_json,
                f"{url}/init_weights_update_group",
                {
                    "master_address": self.master_address,
                    "master_port": self.master_port,
                    "rank_offset": 1 + i * self.server_ranks,
                    "world_size": self.world_size,
                    "group_name": self.group_name,
                    "backend": self.backend,
                },
                timeout_s=self.timeout_s,
            )
            for i, url in enumerate(self.server_urls)
        ]
        try:
            self.group = WeightUpdateGroup.create(
                self.backend,
                self.master_address,
                self.master_port,
                rank=0,
                world_size=self.world_size,
                group_name=self.group_name,
                timeout_s=self.timeout_s,
            )
        finally:
            _check(futures, self.server_urls, "/init_weights_update_group")

    def push(
        self,
        named_tensors: NamedTensors,
        version: str | None,
        *,
        is_source: bool = True,
        flush_cache: bool = True,
    ) -> WeightSyncStats:
        """Send every tensor (one request + one broadcast per bucket), then set ``version`` and check it.

        Double-buffered: while bucket ``k`` is on the wire, the iterator produces (and this rank
        flattens) bucket ``k + 1``. With pipeline stages pass ``version=None`` on each stage source and
        call :meth:`commit` on one rank once all stages pushed (the version means "all weights new").
        """
        if not is_source:
            for _ in named_tensors:
                pass
            return WeightSyncStats()
        if self.group is None:
            self.connect()
        stats, start = WeightSyncStats(), time.perf_counter()
        in_flight: _InFlight | None = None
        for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            payload, flat = self._prepare(bucket, slot=index % 2)
            if in_flight is not None:
                in_flight.wait()
            in_flight = self._start(payload, flat, bucket)
            stats.num_tensors += len(bucket)
            stats.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            stats.num_requests += 1
        if in_flight is not None:
            in_flight.wait()
        if version is not None:
            self.set_version(version, flush_cache=flush_cache)
        stats.seconds = time.perf_counter() - start
        self.stats = stats
        if version is not None:
            check_weight_versions(self.server_urls, str(version))
        return stats

    def _prepare(
        self, bucket: list[tuple[str, torch.Tensor]], slot: int
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The request body of ``bucket`` and, when flattened, its tensors copied into buffer ``slot``."""
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
        key = (slot, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:  # reused across buckets and pushes: no page faults
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=self._device)
        flat = buffer[:numel]
        torch.cat([t.detach().reshape(-1) for _, t in bucket], out=flat)
        return payload, flat

    def _start(self, payload: dict[str, Any], flat: torch.Tensor | None, bucket) -> _InFlight:
        """Post the request to every server and start the broadcast in a worker thread."""
        assert self.group is not None
        group, device = self.group, self._device
        futures = _post_all(
            self._pool, self.server_urls, "/update_weights_from_distributed", payload, self.timeout_s
        )

        def broadcast() -> None:
            if flat is not None:
                group.broadcast(flat, 0)
            else:
                group.broadcast_many([t.detach().to(device).contiguous() for _, t in bucket], 0)

        return _InFlight(self, futures, self._pool.submit(broadcast))

    def _mark_broken(self) -> None:
        self.group = None  # out of step with the servers now; the next push reconnects

    def set_version(self, version: str, *, flush_cache: bool = True) -> None:
        """Set ``weight_version`` on every server with an empty update (no tensors move)."""
        payload = {
            "names": [],
            "dtypes": [],
            "shapes": [],
            "group_name": self.group_name,
            "weight_version": str(version),
            "flush_cache": flush_cache,
        }
        _check(
            _post_all(
                self._pool, self.server_urls, "/update_weights_from_distributed", payload, self.timeout_s
            ),
            self.server_urls,
            "set_version",
        )

    def commit(self, version: str, *, flush_cache: bool = True) -> None:
        """After every stage pushed with ``version=None``: set ``version`` on the servers and check it."""
        self.set_version(version, flush_cache=flush_cache)
        check_weight_versions(self.server_urls, str(version))

    def close(self) -> None:
        """Leave the group on the servers and here."""
        if self.group is not None:
            futures = _post_all(
                self._pool,
                self.server_urls,
                "/destroy_weights_update_group",
                {"group_name": self.group_name},
                30.0,
            )
            for fut in futures:
                fut.result()
            self.group.destroy()
            self.group = None
        self._pool.shutdown(wait=False)


class _InFlight:
    """A bucket on the wire: the servers' HTTP answers and the local broadcast."""

    def __init__(self, sync: DistributedWeightSync, futures: list, sent):
        self.sync, self.futures, self.sent = sync, futures, sent

    def wait(self) -> None:
        urls, path = self.sync.server_urls, "/update_weights_from_distributed"
        # A server that rejects the request never joins the broadcast: fail now, not at the gloo timeout.
        while not self.sent.done():
            wait([self.sent, *self.futures], return_when=FIRST_COMPLETED)
            refused = [(u, f) for u, f in zip(urls, self.futures) if f.done() and f.result()[0] != 200]
            if refused and not self.sent.done():
                self.sync._mark_broken()
                _check([f for _, f in refused], [u for u, _ in refused], path)
        self.sent.result()
        _check(self.futures, urls, path)
