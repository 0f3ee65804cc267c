"""Synthetic step inputs: a scored batch of random responses, and the step context the trainer builds.

The one builder behind the device audit (``sdpg_mcore.audit.device_audit``), the step benchmark
(``tools/bench_step.py``), the GPU check's step stage (``sdpg_mcore.audit.gpu_check``) and the step
tests (``tests/train/steplib.py``), so that they exercise the step as the trainer runs it:
:func:`synthetic_step_context` takes the trainer's rule for the frozen reference
(``train.model_setup.reference_weights``) and the policy's own micro-batch padding
(``StepContext.pad_multiple``: TP under sequence parallelism).

    responses = synthetic_responses(4, 2, vocab_size=512, prompt_len=12, context_len=3, response_len=(10, 13))
    ctx = synthetic_step_context(policy, layout, algo.SDPGConfig(), reference_dir=model_dir,
                                 token_budget=96, mini_batch_groups=2, total_steps=2)
    metrics = run_step(ctx, 1, responses)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdpg_mcore import algo
from sdpg_mcore.train.batch import Response
from sdpg_mcore.train.model_setup import reference_weights
from sdpg_mcore.train.step import StepContext

Lengths = int | Sequence[int]
"""One length for every response, or one per response, cycled (response ``i`` takes ``lengths[i % len]``)."""

FIRST_ID = 5
"""Smallest token id drawn: the ids below are the tiny tokenizer's special tokens."""


def _length(lengths: Lengths, i: int) -> int:
    return lengths if isinstance(lengths, int) else lengths[i % len(lengths)]


def _ids(generator: torch.Generator, end: int, length: int) -> list[int]:
    return torch.randint(FIRST_ID, end, (length,), generator=generator).tolist()


def synthetic_responses(
    num_groups: int,
    group_size: int,
    *,
    vocab_size: int,
    prompt_len: Lengths,
    response_len: Lengths,
    context_len: Lengths = 0,
    prompt_vocab_size: int | None = None,
    random_logprobs: bool = False,
    seed: int = 0,
) -> list[Response]:
    """``num_groups * group_size`` scored responses, response ``i`` in group ``i // group_size``.

    Token ids are uniform in ``[FIRST_ID, vocab_size)``; prompts and teacher contexts stay below
    ``prompt_vocab_size`` when given (a tokenizer shorter than the model's vocabulary, as Qwen's). The
    teacher prompt is the student prompt followed by its context, as the data's sentinel split makes
    it. Reward and accuracy are 1 for every third response (0, 3, 6, ...), so groups of two or more
    mix right and wrong answers unevenly. Rollout log-probs are -1, or ``-U(0, 1)`` per token with
    ``random_logprobs`` (the engine's differ from the trainer's). The generator draws, per response,
    the prompt, the context, the response and then its log-probs: deterministic in ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt_vocab = prompt_vocab_size or vocab_size
    out = []
    for i in range(num_groups * group_size):
        prompt = _ids(generator, prompt_vocab, _length(prompt_len, i))
        context = _ids(generator, prompt_vocab, _length(context_len, i))
        n = _length(response_len, i)
        response = _ids(generator, vocab_size, n)
        logprobs = (-torch.rand(n, generator=generator)).tolist() if random_logprobs else [-1.0] * n
        correct = float(i % 3 == 0)
        out.append(
            Response(
                group=i // group_size,
                prompt_ids=prompt,
                teacher_prompt_ids=prompt + context,
                response_ids=response,
                rollout_logprobs=logprobs,
                reward=correct,
                acc=correct,
            )
        )
    return out


def synthetic_step_context(
    policy,
    layout,
    loss_cfg: algo.PolicyLossConfig,
    *,
    reference_dir,
    token_budget: int,
    mini_batch_groups: int,
    total_steps: int,
    temperature: float = 1.0,
    pad_id: int = 0,
    teacher_states: str = "device",
    ema=None,
) -> StepContext:
    """The ``StepContext`` the trainer would build for ``policy`` and ``loss_cfg``: its registered
    algorithm, the frozen reference (``cpu_swap``, the weights of ``reference_dir``) when the algorithm
    reads it (sdpg's ``teacher=initial`` included), and the policy's micro-batch padding. ``ema``: the
    ``train.ema_weights.EMAWeights`` of sdpg's ``teacher=ema`` (the step refuses that teacher without it)."""
    needs = loss_cfg.needs()
    return StepContext(
        policy=policy,
        reference=reference_weights(policy, needs, "cpu_swap", reference_dir, layout, None),
        algorithm=algo.algorithm_of(loss_cfg),
        loss_cfg=loss_cfg,
        layout=layout,
        temperature=temperature,
        token_budget=token_budget,
        mini_batch_groups=mini_batch_groups,
        total_steps=total_steps,
        pad_id=pad_id,
        teacher_states=teacher_states,
        ema=ema,
    )
