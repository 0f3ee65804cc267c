"""The SGLang HTTP contract (``rollout/README.md``) as typed values, shared by the client and the dev server.

Both sides parse and emit the same JSON shapes through this module, so a field renamed here is
renamed everywhere. Parsing raises ``ValueError`` naming the offending field; the dev server turns
that into an HTTP 400 JSON error and stays up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: ``/update_weights_from_distributed`` load format in which every tensor of the request shares one
#: dtype and travels as ONE broadcast of their concatenated flat views (SGLang's ``FlattenedTensorBucket``).
FLATTENED_BUCKET = "flattened_bucket"

#: Tags accepted by ``/release_memory_occupation`` and ``/resume_memory_occupation``.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")

#: ``sampling_params`` keys SGLang 0.5.23 knows but this project's dev server does not implement,
#: with the value that means "off": accepted at that value, refused otherwise (never ignored).
SGLANG_ONLY_SAMPLING_KEYS: dict[str, Any] = {
    "stop_regex": None,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "beam_width": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "spaces_between_special_tokens": True,
    "stream_interval": None,
    "logit_bias": None,
    "custom_params": None,
    "watermark": None,
}
#: SGLang checks ``sampling_seed`` against int64; ``max_new_tokens`` and ``n`` are int64 too.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Largest ``n`` one request may ask for (each sample is a sequence in the batch).
MAX_N = 1024

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
        """Parse the ``sampling_params`` object of a ``/generate`` body.

        As SGLang 0.5.22+: unknown keys are refused (a typo must not silently sample with
        defaults), integers must be integers within int64, floats finite.
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"sampling_params must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key in known:
                continue
            if key not in SGLANG_ONLY_SAMPLING_KEYS:
                raise ValueError(
                    f"unknown field `{key}` in sampling_params; expected one of {sorted(known | set(SGLANG_ONLY_SAMPLING_KEYS))}"
                )
            if value is not None and value != SGLANG_ONLY_SAMPLING_KEYS[key]:
                raise ValueError(f"sampling_params.{key}={value!r} is not implemented by the dev server")
        params = cls()
        for name in ("temperature", "top_p"):
            if data.get(name) is not None:
                setattr(params, name, _number(data[name], f"sampling_params.{name}", float))
        for name in ("top_k", "max_new_tokens", "n", "sampling_seed"):
            if data.get(name) is not None:
                setattr(params, name, _number(data[name], f"sampling_params.{name}", int))
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
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT64_MAX for i in ids
            ):
                raise ValueError(f"sampling_params.stop_token_ids must be a list of token ids, got {ids!r}")
            params.stop_token_ids = ids
        params.validate()
        return params

    def validate(self) -> None:
        """Range checks, with the field name and the valid range in the message (SGLang's ranges)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"sampling_params.temperature must be a non-negative finite number, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.max_new_tokens <= INT64_MAX:
            raise ValueError(
                f"sampling_params.max_new_tokens must be in [0, 2**63 - 1], got {self.max_new_tokens}"
            )
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"sampling_params.n must be in [1, {MAX_N}], got {self.n}")
        if self.sampling_seed is not None and not INT64_MIN <= self.sampling_seed <= INT64_MAX:
            raise ValueError(
                f"sampling_params.sampling_seed must be in [-2**63, 2**63 - 1], got {self.sampling_seed}"
            )

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent to a server (``sampling_seed`` only when set, as SGLang rejects null in some versions)."""
        out = asdict(self)
        if out["sampling_seed"] is None:
            del out["sampling_seed"]
        if out["n"] == 1:
            del out["n"]
        return out


def _number(value: Any, name: str, kind: type) -> Any:
    """``value`` as ``kind``: a finite number; for ``int`` a JSON integer (``2.0`` is refused, as SGLang does)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if kind is int and not isinstance(value, int):
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
