"""The SGLang HTTP contract (SDPG.md §7) as typed values, shared by the client and the dev server.

Both sides parse and emit the same JSON shapes through this module, so a field renamed here is
renamed everywhere. Parsing raises ``ValueError`` naming the offending field; the dev server turns
that into an HTTP 400 JSON error and stays up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: ``/update_weights_from_distributed`` load format in which every tensor of the request shares one
#: dtype and travels as ONE broadcast of their concatenated flat views (SGLang's ``FlattenedTensorBucket``).
FLATTENED_BUCKET = "flattened_bucket"

#: Tags accepted by ``/release_memory_occupation`` and ``/resume_memory_occupation``.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


@dataclass
class SamplingParams:
    """Per-request sampling parameters, with SGLang's names and defaults."""

    temperature: float = 1.0
    """0 means greedy (argmax); the returned log-prob is then that of the untempered distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep the ``top_k`` most likely tokens; -1 keeps all."""
    max_new_tokens: int = 128
    """Generation budget; reaching it finishes with ``{"type": "length"}``."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (need a tokenizer); matched text is trimmed unless ``no_stop_trim``."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Stop tokens in addition to the model's EOS (kept in ``output_ids``)."""
    ignore_eos: bool = False
    """Keep generating past EOS (stop strings and ``stop_token_ids`` still apply)."""
    skip_special_tokens: bool = True
    """Drop special tokens when decoding ``text``."""
    no_stop_trim: bool = False
    """Keep a matched stop string in ``text``."""
    sampling_seed: int | None = None
    """Seed of a per-request generator: same seed, same tokens, whatever the batch."""
    n: int = 1
    """Samples per input; the response then holds ``n`` outputs per input."""

    @classmethod
    def from_json(cls, data: Any) -> SamplingParams:
        """Parse the ``sampling_params`` object of a ``/generate`` body (unknown keys are ignored, as SGLang does)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"sampling_params must be an object, got {type(data).__name__}")
        params = cls()
        for name, kind in (("temperature", float), ("top_p", float)):
            if data.get(name) is not None:
                setattr(params, name, _number(data[name], f"sampling_params.{name}", kind))
        for name in ("top_k", "max_new_tokens", "n"):
            if data.get(name) is not None:
                setattr(params, name, _number(data[name], f"sampling_params.{name}", int))
        if data.get("sampling_seed") is not None:
            params.sampling_seed = _number(data["sampling_seed"], "sampling_params.sampling_seed", int)
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
            if data.get(name) is not None:
                if not isinstance(data[name], bool):
                    raise ValueError(f"sampling_params.{name} must be true or false, got {data[name]!r}")
                setattr(params, name, data[name])
        stop = data.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise ValueError(
                    f"sampling_params.stop must be a non-empty string or a list of them, got {stop!r}"
                )
            params.stop = stop
        if data.get("stop_token_ids") is not None:
            ids = data["stop_token_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise ValueError(f"sampling_params.stop_token_ids must be a list of ints, got {ids!r}")
            params.stop_token_ids = ids
        params.validate()
        return params

    def validate(self) -> None:
        """Range checks, with the field name and the valid range in the message."""
        if self.temperature < 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"sampling_params.n must be >= 1, got {self.n}")

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent to a server (``sampling_seed`` only when set, as SGLang rejects null in some versions)."""
        out = asdict(self)
        if out["sampling_seed"] is None:
            del out["sampling_seed"]
        if out["n"] == 1:
            del out["n"]
        return out


def _number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return kind(value)


def parse_dtype_name(name: Any, field_name: str = "dtypes") -> str:
    """Normalise ``"torch.float32"`` / ``"float32"`` to ``"float32"``; reject anything else."""
    if not isinstance(name, str):
        raise ValueError(f"{field_name} entries must be dtype names like 'bfloat16', got {name!r}")
    short = name.removeprefix("torch.")
    if short not in _DTYPE_NAMES:
        raise ValueError(f"{field_name}: unsupported dtype {name!r}; choose one of {list(_DTYPE_NAMES)}")
    return short


def finish_reason_length(length: int) -> dict[str, Any]:
    return {"type": "length", "length": length}


def finish_reason_stop(matched: int | str) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def finish_reason_abort(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message}
