"""The tiny model's warm start: deterministic, loadable, and trained on the response tokens only."""

import json
import random

import torch
from safetensors.torch import load_file

from sdpg_mcore.data.arithmetic import problem_of, split_problems
from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer
from sdpg_mcore.train.warm_start import render, sft_batch, warm_start_tiny_model


def test_makes_loadable_deterministic_model(tmp_path):
    torch.set_num_threads(1)
    a = warm_start_tiny_model(tmp_path / "a", seed=3, sft_steps=4, batch_size=4, eval_prompts=4)
    b = warm_start_tiny_model(tmp_path / "b", seed=3, sft_steps=4, batch_size=4, eval_prompts=4)
    for key in ("student_acc_t1", "teacher_acc_t1", "final_sft_loss"):
        assert a[key] == b[key]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["eos_token_id"] is not None
    assert json.loads((tmp_path / "a" / "warmstart.json").read_text())["sft_steps"] == 4

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert len(tok) <= model.config.vocab_size
    prompt = render(tok, "What is 2 + 3?", None)
    assert prompt.endswith("<|im_start|>assistant\n") and "\\boxed{}" in prompt
    assert "The correct answer to this problem is: 5" in render(tok, "What is 2 + 3?", "5")


def test_batch_labels_cover_only_the_response():
    tok = build_tiny_tokenizer("qwen")
    ids, mask, labels = sft_batch(tok, random.Random(0), 3, teacher_fraction=0.0)
    for row in range(3):
        target = tok.decode(labels[row][labels[row] >= 0])
        assert target.startswith(tuple("0123456789")) and target.endswith("}.<|im_end|>")
        assert mask[row].sum() == (ids[row] != tok.pad_token_id).sum()


def test_warm_start_draws_only_the_training_problems():
    """The benchmark's warm start sees no held-out problem, under either prompt."""
    tok = build_tiny_tokenizer("qwen")
    split = split_problems(max_operand=9, heldout_fraction=0.25, seed=2)
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        ids, _, _ = sft_batch(tok, rng, 32, teacher_fraction=0.5, problems=split.train)
        for row in tok.batch_decode(ids, skip_special_tokens=True):
            seen.add(row.split("What is ")[1].split("?")[0])
    train = {problem_of(t)[0].removeprefix("What is ").removesuffix("?") for t in split.train}
    heldout = {problem_of(t)[0].removeprefix("What is ").removesuffix("?") for t in split.heldout}
    assert seen <= train and not seen & heldout
    assert len(seen) > 100  # 640 draws from 150 problems: the check covers most of them
