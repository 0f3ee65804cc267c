"""Make the tiny CPU example's policy: a Qwen3-architecture model + tokenizer, warm-started on arithmetic.

    python tools/make_tiny_model.py --out examples/tiny/model            # ~1-2 min on 2 CPU cores
    python tools/make_tiny_model.py --out /tmp/m --sft-steps 20 --json   # quick smoke run

Everything is local (no hub): the tokenizer is ``sdpg_mcore.data.tiny_tokenizer`` (ChatML, Qwen
style), the model is ``sdpg_mcore.models.tiny``'s Qwen3 config. A random model never writes
``\\boxed{N}``, so every reward would be 0 and RL would have nothing to learn from. The warm start is
a short supervised run (plain ``transformers`` on CPU) on the synthetic arithmetic task, with
responses ``a + b = c. The answer is \\boxed{c}.``, half of them under the teacher prompt (which
states the answer) so that the model learns to use the context the SDPG teacher sees. It stops
early, on purpose: the example needs accuracy at temperature 1 well between 0 and 1 so that groups
have reward variance. Deterministic for a given ``--seed`` (single-threaded math, seeded sampling).
The accuracy reached and the time taken are written to ``OUT/warmstart.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

#: Prompt wording of the synthetic task; identical to ``tools/prepare_data.py --synthetic arithmetic``.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CONTEXT_TEMPLATE = (
    "The correct answer to this problem is: {answer}\n"
    "Use this to verify your reasoning, but show your full solution process."
)


def arithmetic_problem(rng: random.Random, max_operand: int = 9) -> tuple[str, str]:
    """(question, answer) of one problem: a + b or a - b with operands in [0, max_operand]."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def worked_response(question: str, answer: str) -> str:
    """The warm-start target: the expression, its value, and the boxed answer."""
    expr = question.removeprefix("What is ").removesuffix("?")
    return f"{expr} = {answer}. The answer is \\boxed{{{answer}}}."


def render(tokenizer, question: str, answer: str | None) -> str:
    """Chat-templated student prompt (``answer=None``) or teacher prompt (context appended)."""
    content = f"{question} {INSTRUCTION}"
    if answer is not None:  # tools/prepare_data.py's default separator and the reference template
        content += "\n\n" + CONTEXT_TEMPLATE.format(answer=answer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=True,
    )


def sft_batch(tokenizer, rng: random.Random, batch_size: int, teacher_fraction: float, max_operand: int = 9):
    """Right-padded ``input_ids``, ``attention_mask`` and response-only ``labels`` (-100 elsewhere)."""
    rows = []
    for _ in range(batch_size):
        question, answer = arithmetic_problem(rng, max_operand)
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


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (no nesting needed for integers)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = text.find("}", start)
    return text[start + 7 : end].strip() if end > 0 else None


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
):
    """Fraction of correct boxed answers at temperature 1 on held-out problems (student or teacher prompt)."""
    rng = random.Random(10_000 + seed)
    problems = [arithmetic_problem(rng, max_operand) for _ in range(num_prompts)]
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
    return sum(boxed_answer(t) == a for t, (_, a) in zip(texts, problems)) / num_prompts


def make_tiny_model(
    out: Path,
    *,
    seed: int = 0,
    sft_steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    teacher_fraction: float = 0.5,
    eval_prompts: int = 128,
    max_operand: int = 9,
) -> dict:
    """Build, warm-start and save the tiny model + tokenizer to ``out``; returns the measurements."""
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(sft_steps):
        input_ids, mask, labels = sft_batch(tokenizer, rng, batch_size, teacher_fraction, max_operand)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    sft_seconds = time.perf_counter() - start
    model.eval()
    stats = {
        "seed": seed,
        "sft_steps": sft_steps,
        "teacher_fraction": teacher_fraction,
        "max_operand": max_operand,
        "final_sft_loss": round(float(loss.detach()), 4),
        "sft_seconds": round(sft_seconds, 1),
        "student_acc_t1": sample_accuracy(
            model, tokenizer, num_prompts=eval_prompts, seed=seed, teacher=False, max_operand=max_operand
        ),
        "teacher_acc_t1": sample_accuracy(
            model, tokenizer, num_prompts=eval_prompts, seed=seed, teacher=True, max_operand=max_operand
        ),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    stats["total_seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "warmstart.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=400, help="warm-start optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--teacher-fraction",
        type=float,
        default=0.5,
        help="share of warm-start rows under the teacher prompt",
    )
    parser.add_argument("--max-operand", type=int, default=9, help="largest operand of the arithmetic task")
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out problems for the accuracy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps results bit-exact)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stats = make_tiny_model(
        args.out,
        seed=args.seed,
        sft_steps=args.sft_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_prompts=args.eval_prompts,
        teacher_fraction=args.teacher_fraction,
        max_operand=args.max_operand,
    )
    if args.json:
        sys.stdout.write(json.dumps(stats) + "\n")
    else:
        for key, value in stats.items():
            sys.stdout.write(f"{key:>16}  {value}\n")
        sys.stdout.write(f"{'saved':>16}  {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
