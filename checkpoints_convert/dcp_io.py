"""Stream a Megatron-Core distributed checkpoint (``torch_dist`` format) in and out, one tensor at a time.

``megatron.core.dist_checkpointing.save`` resolves every tensor of the state dict before writing
(its async writer stages them all), so it needs the whole model in memory. The on-disk format is
PyTorch DCP plus two small Megatron files, so this module writes the same format directly: a DCP
``SavePlanner`` whose ``resolve_data`` *produces* each chunk on demand (read HF tensors, fuse, pad)
and torch's ``FileSystemWriter`` with one thread, which resolves and writes items one by one.

Layout written (what ``GPTModel.sharded_state_dict()`` expects, so ``dist_checkpointing.load``
reshards it to any TP/PP): one global tensor per key; layer keys are stacked along a leading
layer axis and stored as one chunk per layer; ``_extra_state`` objects of the linear layers are
stored as ``None`` like a freshly built local-spec model saves them.

    write_dcp_checkpoint(out_dir, [LazyChunk(key, global_shape, offsets, sizes, dtype, make_fn), ...])
    reader = DcpChunkReader(out_dir); t = reader.read(key, offsets, sizes)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpoints_convert.hf_io import CheckpointError

#: What Megatron's ``dist_checkpointing`` writes next to the DCP files (``metadata.json``, ``common.pt``).
MCORE_BACKEND_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class LazyChunk:
    """One chunk of one global tensor, produced only when the writer reaches it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _none_bytes() -> io.BytesIO:
    """An empty ``_extra_state``, serialised as Megatron does: a list with one entry per shard."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf


class _StreamingSavePlanner(SavePlanner):
    """A DCP save planner whose items are ``LazyChunk``s (tensors) and fixed byte objects."""

    def __init__(self, chunks: list[LazyChunk], objects: list[str], on_resolve: Callable[[int], None] | None):
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects = objects
        self.on_resolve = on_resolve

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = True) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self.chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return _none_bytes()
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.make()
        assert tuple(tensor.shape) == chunk.sizes and tensor.dtype == chunk.dtype, (
            f"{chunk.key}@{chunk.offsets}: made {tuple(tensor.shape)} {tensor.dtype}, planned {chunk.sizes} {chunk.dtype}"
        )
        if self.on_resolve is not None:
            self.on_resolve(tensor.nbytes)
        return tensor


class _OneAtATimeWriter(FileSystemWriter):
    """``FileSystemWriter`` that resolves, writes and frees one item at a time, in plan order.

    Why: torch's own loop keeps the last tensor of every key alive until the file is closed (it
    builds a name -> tensor dict for its safetensors mode), i.e. one layer of every weight at once;
    for a 70B model that is several GB on top of the tensor being written. Items are still written
    with ``torch.save`` into ``__0_0.distcp`` and described by ``_StorageInfo``, so torch's
    ``FileSystemReader`` (and Megatron's ``dist_checkpointing.load``) read the result unchanged.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        items = [i for i in plan.items if i.type == WriteItemType.BYTE_IO]
        items += [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        with open(Path(self.path) / file_name, "wb") as stream:
            for item in items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(data, stream)
                del data
                length = stream.tell() - offset
                results.append(WriteResult(item.index, length, _StorageInfo(file_name, offset, length)))
            stream.flush()
            os.fsync(stream.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


def write_dcp_checkpoint(
    out_dir: str | Path,
    chunks: list[LazyChunk],
    objects: list[str] = (),
    on_resolve: Callable[[int], None] | None = None,
) -> None:
    """Write a Megatron ``torch_dist`` checkpoint from lazy chunks, holding one chunk at a time."""
    from torch.distributed.checkpoint import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _OneAtATimeWriter(out, single_file_per_rank=True, thread_count=1)
    planner = _StreamingSavePlanner(chunks, list(objects), on_resolve)
    with warnings.catch_warnings():  # no_dist=True is the intent: one process writes every chunk
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save({}, out / "common.pt")
    (out / "metadata.json").write_text(json.dumps(MCORE_BACKEND_METADATA))


class _ChunkLoadPlanner(LoadPlanner):
    """Reads the requested region of one key into ``target``."""

    def __init__(self, key: str, offsets: tuple[int, ...], target: torch.Tensor):
        self.key, self.offsets, self.target = key, offsets, target

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.target.shape)
        return LoadPlan(
            create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [chunk])
        )

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise AssertionError("only tensors are read")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of bytes ``[offset, offset + length)`` of an open file."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = base + pos
        return self.pos

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self.pos)
        if count <= 0:
            return 0
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(buffer)[:count])
        self.pos += got
        return got


class DcpChunkReader:
    """Read any rectangular region of any tensor of a ``torch_dist`` checkpoint, one at a time."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        if not (self.ckpt_dir / ".metadata").is_file():
            raise CheckpointError(
                f"{self.ckpt_dir} is not a Megatron torch_dist checkpoint (no .metadata file); pass the directory "
                "written by `convert_hf.py to-mcore` or by dist_checkpointing.save"
            )
        self._reader = FileSystemReader(self.ckpt_dir)
        self.metadata = self._reader.read_metadata()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def _exact_chunk(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor | None:
        """The stored chunk itself when the request is exactly one stored chunk (no copy into a target).

        Why: the generic DCP read buffers the stored bytes, loads them and copies the result into the
        target (3x the chunk); loading from a window onto the file reads the storage in place (1x).
        """
        md = self.metadata.state_dict_metadata[key]
        for index, chunk in enumerate(md.chunks):
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(offsets), index))
                if info is None or info.transform_descriptors:
                    return None
                with open(self.ckpt_dir / info.relative_path, "rb") as f:
                    window = io.BufferedReader(_FileWindow(f, info.offset, info.length))
                    tensor = torch.load(window, map_location="cpu", weights_only=True)
                return tensor if tuple(tensor.shape) == tuple(sizes) else None
        return None

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if key not in self.metadata.state_dict_metadata:
            raise CheckpointError(
                f"{self.ckpt_dir} has no tensor {key!r}; the checkpoint is for another model"
            )
        exact = self._exact_chunk(key, offsets, sizes)
        if exact is not None:
            return exact
        target = torch.empty(sizes, dtype=self.dtype(key))
        planner = _ChunkLoadPlanner(key, offsets, target)
        planner.set_up_planner({}, self.metadata, True)
        self._reader.set_up_storage_reader(self.metadata, True)
        plan = self._reader.prepare_local_plan(planner.create_local_plan())
        plan = self._reader.prepare_global_plan([plan])[0]
        covered = sum(_numel(item.lengths) for item in plan.items)
        if covered != target.numel():
            raise CheckpointError(
                f"{self.ckpt_dir}: {key}@{offsets} is not fully stored ({covered}/{target.numel()})"
            )
        self._reader.read_data(dataclasses.replace(plan), planner).wait()
        return target


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
