"""Logits parity: a Megatron model built and loaded by this package vs ``transformers`` on the same weights.

``parity_rank`` runs on every rank of a TP x PP job (torchrun, Slurm, or ``spawn_ranks``): it builds
this rank's stage with ``sdpg_mcore.models.build_gpt_model``, loads the weights from the HF
directory (each rank reads its shard) or from a converted Megatron checkpoint, and runs a fixed
batch through the pipeline. The last stage returns the full-vocabulary logits; ``compare_with_hf``
runs the HF model and reports the difference.

    logits = spawn_ranks(parity_rank, tp * pp, args=(hf_dir, tp, pp, None, 2, 16, 0))
    report = compare_with_hf(hf_dir, next(x for x in logits if x is not None), 2, 16, 0)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


def fixed_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """The batch every rank and the HF reference use: ``[batch, seq_len]`` token ids from ``seed``."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _vocab_size(hf_dir: str | Path) -> int:
    return int(json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"])


def parity_rank(
    rank: int,
    world_size: int,
    hf_dir: str,
    tp: int,
    pp: int,
    mcore_dir: str | None,
    batch: int,
    seq_len: int,
    seed: int,
) -> np.ndarray | None:
    """One rank of the parity run; fp32 logits ``[batch, seq_len, vocab]`` on the last stage's
    first TP/DP rank, None elsewhere (numpy, so results cross process boundaries by value)."""
    from megatron.core import parallel_state as ps

    from checkpoints_convert.model_io import load_hf_into_model, load_mcore_into_model
    from sdpg_mcore.models.builder import build_gpt_model, forward_logits
    from sdpg_mcore.parallel.state import initialize_model_parallel

    initialize_model_parallel(tp=tp, pp=pp)
    model = build_gpt_model(hf_dir, params_dtype=torch.float32)
    model.eval()
    if mcore_dir is None:
        load_hf_into_model([model], hf_dir)
    else:
        load_mcore_into_model([model], mcore_dir, hf_dir)
    vocab = _vocab_size(hf_dir)
    logits_BSV = forward_logits(model, fixed_tokens(vocab, batch, seq_len, seed), vocab_size=vocab)
    keep = (
        logits_BSV is not None
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
    return logits_BSV.float().cpu().numpy() if keep else None


@dataclass(frozen=True)
class ParityReport:
    """What ``tools/check_parity.py`` prints as its last line (JSON)."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tokens: int
    arch: str
    tp: int
    pp: int
    source: str
    """"hf" (weights read from the HF directory) or "mcore" (from a converted checkpoint)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def hf_reference_logits(hf_dir: str | Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    """``transformers`` fp32 logits ``[B, S, V]`` for the same tokens (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens_BS).logits


def compare_with_hf(
    hf_dir: str | Path,
    megatron_logits_BSV: np.ndarray,
    *,
    tp: int,
    pp: int,
    source: str,
    batch: int,
    seq_len: int,
    seed: int,
) -> ParityReport:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    tokens = fixed_tokens(int(config["vocab_size"]), batch, seq_len, seed)
    ref_BSV = hf_reference_logits(hf_dir, tokens)
    got_BSV = torch.from_numpy(megatron_logits_BSV)
    if got_BSV.shape != ref_BSV.shape:
        raise AssertionError(f"Megatron logits {tuple(got_BSV.shape)} vs HF {tuple(ref_BSV.shape)}")
    diff = (got_BSV.double() - ref_BSV.double()).abs()
    return ParityReport(
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        tokens=batch * seq_len,
        arch=config["model_type"],
        tp=tp,
        pp=pp,
        source=source,
    )
