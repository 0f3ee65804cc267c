"""The tiny CPU example's policy: a Qwen3-architecture model + tokenizer, warm-started on arithmetic.

    stats = warm_start_tiny_model(Path("examples/tiny/model"))   # ~1-2 min on 2 CPU cores
    stats["student_acc_t1"], stats["teacher_acc_t1"]

Everything is local (no hub): the tokenizer is ``sdpg_mcore.data.tiny_tokenizer`` (ChatML, Qwen
style), the model is ``sdpg_mcore.models.tiny``'s Qwen3 config. A random model never writes
``\\boxed{N}``, so every reward would be 0 and RL would have nothing to learn from. The warm start is
a short supervised run (plain ``transformers`` on CPU) on the synthetic arithmetic task
(``sdpg_mcore.data.arithmetic``), with responses ``a + b = c. The answer is \\boxed{c}.``, a share of
them under the teacher prompt (which states the answer) so that the model learns to use the context
the SDPG teacher sees. It stops early, on purpose: the example needs accuracy at temperature 1 well
between 0 and 1 so that groups have reward variance. Deterministic for a given seed with one torch
thread (the caller sets ``torch.set_num_threads(1)``; sampling is seeded). Accuracy is read with
the rewards package's box parser (``sdpg_mcore.rewards.last_boxed``), as training scores it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sdpg_mcore.data.arithmetic import Triple, arithmetic_problem, problem_of, worked_response
from sdpg_mcore.data.records import DEFAULT_INSTRUCTION_TEMPLATE, REFERENCE_CONTEXT_TEMPLATE
from sdpg_mcore.rewards.math_scorer import last_boxed


def render(tokenizer, question: str, answer: str | None) -> str:
    """Chat-templated student prompt (``answer=None``) or teacher prompt (the reference's context appended
    after a blank line, as ``tools/prepare_data.py`` writes it)."""
    content = DEFAULT_INSTRUCTION_TEMPLATE.format(question=question)
    if answer is not None:
        content += "\n\n" + REFERENCE_CONTEXT_TEMPLATE.format(answer=answer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=True,
    )


def sft_batch(
    tokenizer,
    rng: random.Random,
    batch_size: int,
    teacher_fraction: float,
    max_operand: int = 9,
    problems: Sequence[Triple] | None = None,
):
    """Right-padded ``input_ids``, ``attention_mask`` and response-only ``labels`` (-100 elsewhere).

    Rows are drawn from ``problems`` (a benchmark's training problems, so held-out ones never reach the
    warm start) or, without it, from every problem with operands in ``[0, max_operand]``."""
    rows = []
    for _ in range(batch_size):
        if problems is None:
            question, answer = arithmetic_problem(rng, max_operand=max_operand)
        else:
            question, answer = problem_of(rng.choice(problems))
        prompt = render(tokenizer, question, answer if rng.random() < teacher_fraction else None)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(worked_response(question, answer), add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, response_ids + [tokenizer.eos_token_id]))
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
    labels = torch.full((batch_size, length), -100)
    mask = torch.zeros((batch_size, length), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids = torch.tensor(p + r)
        input_ids[i, : len(ids)] = ids
        labels[i, len(p) : len(ids)] = torch.tensor(r)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def _boxed(text: str) -> str | None:
    box = last_boxed(text)
    return None if box is None else box.strip()


@torch.no_grad()
def sample_accuracy(
    model,
    tokenizer,
    *,
    num_prompts: int,
    seed: int,
    teacher: bool,
    max_new_tokens: int = 24,
    max_operand: int = 9,
    problems: Sequence[Triple] | None = None,
) -> float:
    """Fraction of correct boxed answers at temperature 1 (student or teacher prompt) on ``num_prompts``
    problems drawn from ``problems`` or, without it, from operands in ``[0, max_operand]``."""
    rng = random.Random(10_000 + seed)
    if problems is None:
        problems = [arithmetic_problem(rng, max_operand=max_operand) for _ in range(num_prompts)]
    else:
        problems = [problem_of(rng.choice(problems)) for _ in range(num_prompts)]
    prompts = [render(tokenizer, q, a if teacher else None) for q, a in problems]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(_boxed(t) == a for t, (_, a) in zip(texts, problems)) / num_prompts


def _supervised_steps(
    model, tokenizer, *, seed, sft_steps, batch_size, lr, teacher_fraction, max_operand, problems
):
    """AdamW with a 20-step linear warm-up and grad-norm clipping at 1; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(sft_steps):
        input_ids, mask, labels = sft_batch(
            tokenizer, rng, batch_size, teacher_fraction, max_operand, problems
        )
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss


def warm_start_tiny_model(
    out: Path,
    *,
    seed: int = 0,
    sft_steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    teacher_fraction: float = 0.5,
    eval_prompts: int = 128,
    max_operand: int = 9,
    problems: Sequence[Triple] | None = None,
    eval_problems: Sequence[Triple] | None = None,
) -> dict:
    """Build, warm-start and save the tiny model + tokenizer to ``out``; returns the measurements, also
    written to ``OUT/warmstart.json``.

    ``problems``: train on these triples only (a benchmark's training split); ``eval_problems``: measure
    the accuracies on these (its held-out split). Without them both draw operands in ``[0, max_operand]``."""
    from transformers import AutoModelForCausalLM

    from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer
    from sdpg_mcore.models.tiny import tiny_hf_config

    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer("qwen")
    config = tiny_hf_config(
        "qwen3", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loss = _supervised_steps(
        model, tokenizer, seed=seed, sft_steps=sft_steps, batch_size=batch_size, lr=lr,
        teacher_fraction=teacher_fraction, max_operand=max_operand, problems=problems,
    )  # fmt: skip
    sft_seconds = time.perf_counter() - start
    accuracy = dict(num_prompts=eval_prompts, seed=seed, max_operand=max_operand, problems=eval_problems)
    stats = {
        "seed": seed,
        "sft_steps": sft_steps,
        "teacher_fraction": teacher_fraction,
        "max_operand": max_operand,
        "train_problems": None if problems is None else len(problems),
        "eval_problems": None if eval_problems is None else len(eval_problems),
        "final_sft_loss": round(float(loss.detach()), 4),
        "sft_seconds": round(sft_seconds, 1),
        "student_acc_t1": sample_accuracy(model, tokenizer, teacher=False, **accuracy),
        "teacher_acc_t1": sample_accuracy(model, tokenizer, teacher=True, **accuracy),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    stats["total_seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "warmstart.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
