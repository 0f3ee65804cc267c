"""Streaming safetensors I/O: a lazy reader (single file or sharded with an index) and a writer.

Both hold at most one tensor in memory. The reader parses the safetensors header itself and reads
each tensor (or a row slice of it) with a plain ``readinto`` instead of ``safe_open``'s mmap:
mmapped pages stay resident and count in the process RSS for as long as the file is open, which
would make "peak memory ~2x the largest tensor" impossible to check; plain reads also let us detect
a truncated shard up front and name it.

    reader = HfCheckpointReader(hf_dir)
    w = reader.read("model.layers.0.mlp.up_proj.weight", dim=0, start=0, stop=48)
    writer = SafetensorsShardWriter(out_dir, [(name, shape, dtype), ...], max_shard_bytes=5 << 30)
    for name, tensor in ...: writer.write(name, tensor)   # in plan order
    writer.close()                                          # writes the index when sharded
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, truncated or does not match the model; the message says the fix."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file


def _read_header(path: Path) -> tuple[dict, int]:
    fix = f"re-download or re-copy {path.name} (compare its size with the source)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"safetensors file {path} is truncated ({size} bytes, no header); {fix}"
                )
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"safetensors file {path} is truncated inside its header; {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(
            f"safetensors file {path} is missing; copy it into {path.parent} (the index names it)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"safetensors file {path} has a corrupt header ({err}); {fix}") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"safetensors file {path} is truncated: its header needs {8 + n + end} bytes, the file has {size}; {fix}"
        )
    return header, 8 + n


class HfCheckpointReader:
    """Lazy access to the tensors of an HF model directory (``model.safetensors`` or sharded + index)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        config_path = self.hf_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} not found; --hf must be a Hugging Face model directory")
        self.config: dict = json.loads(config_path.read_text())
        index_path = self.hf_dir / INDEX_FILE
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.hf_dir / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.hf_dir}; save the model with "
                "save_pretrained(..., safe_serialization=True) (.bin checkpoints are not read)"
            )
        self._entries: dict[str, _Entry] = {}
        for file in files:
            path = self.hf_dir / file
            header, data_start = _read_header(path)
            for name, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                self._entries[name] = _Entry(
                    path, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + info["data_offsets"][0]
                )
        if index_path.is_file():
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise CheckpointError(
                    f"{index_path} lists {len(missing)} tensor(s) absent from their files, e.g. {missing[0]!r} "
                    f"in {weight_map[missing[0]]}; re-copy that shard"
                )

    def names(self) -> list[str]:
        return list(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self._entries.items()}

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        return _numel(e.shape) * e.dtype.itemsize

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise CheckpointError(
                f"tensor {name!r} not found in {self.hf_dir}; the checkpoint does not match its config.json "
                "(wrong architecture, or a shard is missing from the index)"
            )
        return self._entries[name]

    def read(
        self,
        name: str,
        dim: int | None = None,
        start: int = 0,
        stop: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tensor ``name``, or its slice ``[start, stop)`` along ``dim`` (only that slice is read for
        dim 0). With ``out`` (contiguous, dim 0 only) the rows are read straight into it."""
        e = self._entry(name)
        if dim is None:
            return self._read_rows(e, 0, e.shape[0] if e.shape else 1).reshape(e.shape)
        if dim == 0:
            return self._read_rows(e, start, stop, out)
        assert out is None, "out= is only supported for row (dim 0) slices"
        return self._read_rows(e, 0, e.shape[0]).narrow(dim, start, stop - start).contiguous()

    @staticmethod
    def _read_rows(e: _Entry, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        row_shape = e.shape[1:]
        count = max(stop - start, 0)
        if out is None:
            out = torch.empty(count, *row_shape, dtype=e.dtype)
        assert out.is_contiguous() and out.dtype == e.dtype and out.shape == (count, *row_shape), (
            f"{e.path}: out {tuple(out.shape)} {out.dtype} for rows {start}:{stop} of {e.shape} {e.dtype}"
        )
        if count:
            buf = out.view(-1).view(torch.uint8).numpy()
            with open(e.path, "rb") as f:
                f.seek(e.begin + start * _numel(row_shape) * e.dtype.itemsize)
                if f.readinto(buf) != buf.nbytes:
                    raise CheckpointError(f"safetensors file {e.path} ended early; re-copy it")
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SafetensorsShardWriter:
    """Write tensors one at a time into safetensors shards planned up front (header first, then data)."""

    def __init__(
        self,
        out_dir: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 << 30,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _numel(item[1]) * item[2].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.files = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shards = shards
        self._order = [
            (fi, name, shape, dtype) for fi, shard in enumerate(shards) for name, shape, dtype in shard
        ]
        self._pos = 0
        self._file_idx = -1
        self._f = None
        self.total_bytes = 0

    def _open(self, fi: int) -> None:
        if self._f is not None:
            self._f.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._shards[fi]:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(self.out_dir / self.files[fi], "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._file_idx = fi

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fi, want, shape, dtype = self._order[self._pos]
        assert name == want and tuple(tensor.shape) == shape and tensor.dtype == dtype, (
            f"writer expected {want} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
        )
        if fi != self._file_idx:
            self._open(fi)
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self.total_bytes += data.nbytes
        self._pos += 1

    def close(self) -> None:
        assert self._pos == len(self._order), f"wrote {self._pos} of {len(self._order)} planned tensors"
        if self._f is not None:
            self._f.close()
            self._f = None
        if len(self.files) > 1:
            weight_map = {name: self.files[fi] for fi, name, _, _ in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files (everything that is not weights); return names."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != INDEX_FILE:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
