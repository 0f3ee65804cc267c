"""The dev server's model engine: batched HF generation with a KV cache, sampling, and weight loads.

A *cohort* is a set of requests prefilled together (left-padded, per-row positions) and then decoded
one token per step with a shared ``DynamicCache``; finished rows are dropped from the cache so the
batch shrinks as requests end. No HTTP or asyncio here: the server drives :class:`HFEngine` from a
single model thread, so every method below runs on that thread.

Log-probs follow SGLang: a sampled token's log-prob is taken from the temperature-scaled
distribution ``log_softmax(logits / T)``, before top-p/top-k renormalisation; with temperature 0
(greedy) it is ``log_softmax(logits)``. ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (as in SGLang) returns
``log_softmax(logits)`` for every temperature. Prompt log-probs (``logprob_start_len >= 0``) are
always untempered.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdpg_mcore.rollout.protocol import (
    SamplingParams,
    finish_reason_abort,
    finish_reason_length,
    finish_reason_stop,
)

logger = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One sequence to generate (a ``/generate`` input with ``n`` samples becomes ``n`` of these)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    base_rid: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish_reason: dict[str, Any] | None = None
    abort_message: str | None = None
    text: str | None = None
    generator: torch.Generator | None = None


@dataclass
class Cohort:
    """Requests decoded together; row ``i`` of every tensor belongs to ``requests[i]``."""

    requests: list[GenRequest]
    cache: Any
    attention_mask_NL: torch.Tensor
    next_position_N: torch.Tensor
    logits_NV: torch.Tensor


def _log_softmax(logits_V: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_V.float(), dim=-1)


def sample_token(
    logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, original_logprob: bool
) -> tuple[int, float]:
    """Sample one token from ``logits_V`` with ``params``; return it and its log-prob (see module docstring)."""
    if params.temperature < 1e-6:
        logprobs_V = _log_softmax(logits_V)
        token = int(torch.argmax(logprobs_V))
        return token, float(logprobs_V[token])
    logprobs_V = _log_softmax(logits_V / params.temperature)
    probs_V = logprobs_V.exp()
    if params.top_k > 0 and params.top_k < probs_V.numel():
        kth = torch.topk(probs_V, params.top_k).values[-1]
        probs_V = torch.where(probs_V >= kth, probs_V, torch.zeros_like(probs_V))
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        cum_V = torch.cumsum(sorted_V, 0) / sorted_V.sum()
        drop_V = (cum_V - sorted_V / sorted_V.sum()) >= params.top_p
        probs_V = probs_V.scatter(0, order_V[drop_V], 0.0)
    token = int(torch.multinomial(probs_V / probs_V.sum(), 1, generator=generator))
    if original_logprob:
        return token, float(_log_softmax(logits_V)[token])
    return token, float(logprobs_V[token])


class HFEngine:
    """A ``transformers`` causal LM on CPU with batched generation and in-place weight loads."""

    def __init__(self, model_path: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.model_path = str(model_path)
        if not (Path(model_path) / "config.json").is_file():
            raise ValueError(
                f"--model-path {model_path}: no config.json; pass a Hugging Face model directory"
            )
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).eval()
        self.tokenizer = _load_tokenizer(self.model_path)
        config = self.model.config
        self.eos_token_ids: set[int] = eos_token_ids(config, self.tokenizer)
        self.vocab_size: int = config.vocab_size
        self.max_context: int = getattr(config, "max_position_embeddings", 1 << 30)
        self.params_by_name: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        # byte-level vocabularies spell each byte as one character: a token's string is >= its text
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        self.max_token_chars: int = max((len(t) for t in vocab), default=1)
        self.default_generator = torch.Generator().manual_seed(seed)
        self.original_logprob = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )

    # ---------------------------------------------------------------- generation
    def validate(self, req: GenRequest) -> None:
        """Raise ``ValueError`` for a request this model cannot serve."""
        if not req.input_ids:
            raise ValueError("input_ids is empty; send at least one token")
        bad = [t for t in req.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids holds ids outside [0, {self.vocab_size}): {bad[:5]}")
        if len(req.input_ids) >= self.max_context:
            raise ValueError(
                f"The input ({len(req.input_ids)} tokens) is longer than the model's context length "
                f"({self.max_context} tokens)."
            )
        if len(req.input_ids) + req.params.max_new_tokens > self.max_context:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {self.max_context} "
                f"tokens: {len(req.input_ids)} input + {req.params.max_new_tokens} max_new_tokens"
            )
        if req.params.stop and self.tokenizer is None:
            raise ValueError(
                "sampling_params.stop needs a tokenizer in --model-path; use stop_token_ids instead"
            )

    @torch.no_grad()
    def prefill(self, requests: list[GenRequest]) -> Cohort:
        """Run the prompts of ``requests`` through the model in one left-padded batch."""
        from transformers import DynamicCache

        lengths = [len(r.input_ids) for r in requests]
        num_rows, width = len(requests), max(lengths)
        ids_NL = torch.zeros(num_rows, width, dtype=torch.long)
        mask_NL = torch.zeros(num_rows, width, dtype=torch.long)
        for i, req in enumerate(requests):
            ids_NL[i, width - lengths[i] :] = torch.tensor(req.input_ids)
            mask_NL[i, width - lengths[i] :] = 1
            if req.params.sampling_seed is not None:
                # int64 seeds (SGLang's range); torch wants them in [0, 2**64)
                req.generator = torch.Generator().manual_seed(req.params.sampling_seed % (1 << 64))
        positions_NL = (mask_NL.cumsum(-1) - 1).clamp(min=0)
        want_prompt_logprobs = any(r.return_logprob and r.logprob_start_len >= 0 for r in requests)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids_NL,
            attention_mask=mask_NL,
            position_ids=positions_NL,
            use_cache=True,
            logits_to_keep=0 if want_prompt_logprobs else 1,
            **{self._cache_kwarg: cache},
        )
        for i, req in enumerate(requests):
            if req.return_logprob and req.logprob_start_len >= 0:
                row_logprobs_LV = torch.log_softmax(out.logits[i, width - lengths[i] :].float(), dim=-1)
                lps: list[float | None] = [None]
                lps += [float(row_logprobs_LV[p - 1, req.input_ids[p]]) for p in range(1, lengths[i])]
                req.input_logprobs = lps[req.logprob_start_len :]
        return Cohort(requests, cache, mask_NL, torch.tensor(lengths), out.logits[:, -1].float())

    @torch.no_grad()
    def step(self, cohort: Cohort) -> list[GenRequest]:
        """Sample one token per live row, retire finished rows, and run the next decode forward.

        Returns the requests that finished in this step; ``cohort.requests`` keeps the live ones.
        """
        finished, keep = [], []
        for i, req in enumerate(cohort.requests):
            if self.sample_into(req, cohort.logits_NV[i]):
                finished.append(req)
            else:
                keep.append(i)
        if not keep:
            cohort.requests = []
            return finished
        if len(keep) < len(cohort.requests):
            index_N = torch.tensor(keep)
            cohort.cache.batch_select_indices(index_N)
            cohort.attention_mask_NL = cohort.attention_mask_NL[index_N]
            cohort.next_position_N = cohort.next_position_N[index_N]
            cohort.requests = [cohort.requests[i] for i in keep]
        last_N1 = torch.tensor([[r.output_ids[-1]] for r in cohort.requests])
        cohort.attention_mask_NL = torch.cat(
            [cohort.attention_mask_NL, torch.ones(len(keep), 1, dtype=torch.long)], dim=1
        )
        out = self.model(
            input_ids=last_N1,
            attention_mask=cohort.attention_mask_NL,
            position_ids=cohort.next_position_N[:, None],
            use_cache=True,
            **{self._cache_kwarg: cohort.cache},
        )
        cohort.next_position_N = cohort.next_position_N + 1
        cohort.logits_NV = out.logits[:, -1].float()
        return finished

    def max_output_tokens(self, req: GenRequest) -> int:
        """``max_new_tokens``, capped as SGLang's scheduler caps it: ``max_req_len - input - 1`` with
        ``max_req_len = context - 1`` (sglang 0.5.23 ``scheduler.py``), i.e. ``context - 2 - input``."""
        return max(0, min(req.params.max_new_tokens, self.max_context - 2 - len(req.input_ids)))

    def sample_into(self, req: GenRequest, logits_V: torch.Tensor) -> bool:
        """Append one sampled token to ``req``; set its finish reason and return True when it ends."""
        params = req.params
        if req.abort_message is not None:
            req.finish_reason = finish_reason_abort(req.abort_message)
        elif len(req.output_ids) >= self.max_output_tokens(req):
            req.finish_reason = finish_reason_length(len(req.output_ids))
        else:
            generator = req.generator or self.default_generator
            token, logprob = sample_token(logits_V, params, generator, self.original_logprob)
            req.output_ids.append(token)
            req.output_logprobs.append(logprob)
            if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
                req.finish_reason = finish_reason_stop(token)
            elif params.stop:
                text = self.decode(req.output_ids, params.skip_special_tokens)
                hits = [(text.find(s), s) for s in params.stop if s in text]
                if hits:
                    where, matched = min(hits)
                    req.finish_reason = finish_reason_stop(matched)
                    req.text = text if params.no_stop_trim else text[:where]
        if req.finish_reason is None:
            return False
        if req.text is None and self.tokenizer is not None:
            ids = req.output_ids
            if isinstance(req.finish_reason.get("matched"), int) and not params.no_stop_trim:
                ids = ids[:-1]
            req.text = self.decode(ids, params.skip_special_tokens)
        return True

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a text that cannot fit the context is refused before tokenising.

        No token covers more than ``max_token_chars`` characters (x4 margin for normalisers that
        merge characters), so a longer text has more tokens than the context holds: tokenising it
        (50 MB took minutes and GBs) is wasted work.
        """
        if self.tokenizer is None:
            raise ValueError("text input needs a tokenizer in --model-path; send input_ids instead")
        if len(text) > 4 * self.max_context * self.max_token_chars:
            raise ValueError(
                f"text of {len(text)} characters cannot fit the context of {self.max_context} tokens"
            )
        return list(self.tokenizer.encode(text))

    # ---------------------------------------------------------------- weights
    def check_tensor_meta(self, name: str, dtype: str, shape: list[int]) -> None:
        """Raise ``ValueError`` unless ``name`` is a parameter of this model with ``shape``."""
        param = self.params_by_name.get(name)
        if param is None:
            raise ValueError(
                f"unknown weight name {name!r} (HF names expected, e.g. {next(iter(self.params_by_name))!r})"
            )
        if list(param.shape) != list(shape):
            raise ValueError(
                f"weight {name!r}: shape {list(shape)} does not match the model's {list(param.shape)}"
            )

    @torch.no_grad()
    def load_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors (HF names) into the model in place; return how many were loaded."""
        count = 0
        for name, tensor in named_tensors:
            self.check_tensor_meta(name, str(tensor.dtype), list(tensor.shape))
            self.params_by_name[name].copy_(tensor)
            count += 1
        return count

    def load_from_disk(self, model_path: str | Path) -> int:
        """Load every ``*.safetensors`` file of ``model_path`` (HF names), all or nothing.

        Every tensor is read and checked (known name, shape, every model weight present) before
        the first one is copied in: a bad directory leaves the served weights as they were.
        """
        from safetensors import SafetensorError, safe_open

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"model_path {model_path}: no *.safetensors files")
        staged: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        self.check_tensor_meta(name, "", list(handle.get_slice(name).get_shape()))
                        staged[name] = handle.get_tensor(name)
            except SafetensorError as err:
                raise ValueError(f"model_path {model_path}: {path.name} is not readable: {err}") from None
        seen = set(staged)
        missing = [n for n in self.params_by_name if n not in seen and not self._is_tied_alias(n, seen)]
        if missing:
            raise ValueError(f"model_path {model_path}: missing weights {missing[:5]} (of {len(missing)})")
        return self.load_tensors(staged.items())

    def _is_tied_alias(self, name: str, seen: set[str]) -> bool:
        param = self.params_by_name[name]
        return any(self.params_by_name[other] is param for other in seen if other in self.params_by_name)


def eos_token_ids(config, tokenizer) -> set[int]:
    """The ids that end a response: the model config's ``eos_token_id`` (one id or a list), else the
    tokenizer's; empty when neither has one."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _load_tokenizer(model_path: str):
    """The directory's tokenizer, or None when it has none (then the server is token-ids-only)."""
    path = Path(model_path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        logger.warning("no usable tokenizer in %s (%s); serving token ids only", model_path, err)
        return None
