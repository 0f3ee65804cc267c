import json

import pytest
from transformers import AutoTokenizer

from sdpg_mcore.data.tiny_tokenizer import TINY_MODEL_VOCAB_SIZE, build_tiny_tokenizer, save_tiny_tokenizer
from sdpg_mcore.models.tiny import TINY_CONFIGS

TEXT = "What is 12 + 7 * (3 - 4)? x = 5; \\boxed{\\frac{1}{2}}\n\tDone. ~`|^_"


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_saved_tokenizer_round_trips_text_and_fits_the_tiny_models(tmp_path, style):
    path = save_tiny_tokenizer(tmp_path / style, style=style)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= min(cfg["vocab_size"] for cfg in TINY_CONFIGS.values()) == TINY_MODEL_VOCAB_SIZE
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert max(ids) < TINY_MODEL_VOCAB_SIZE
    # Special tokens are single ids, not spelled out character by character.
    specials = (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
        if style == "qwen"
        else ["<|begin_of_text|>", "<|eot_id|>"]
    )
    for special in specials:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert (
        "chat_template" in json.dumps(json.loads((path / "tokenizer_config.json").read_text()))
        or (path / "chat_template.jinja").exists()
    )


def test_build_is_deterministic():
    a, b = build_tiny_tokenizer("qwen"), build_tiny_tokenizer("qwen")
    assert a.get_vocab() == b.get_vocab()
    assert a(TEXT)["input_ids"] == b(TEXT)["input_ids"]


def test_qwen_template_enable_thinking_kwarg(qwen_tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    on = qwen_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    off = qwen_tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


def test_llama_template_has_one_bos_and_trims(llama_tokenizer):
    msgs = [{"role": "user", "content": "  hi  "}]
    text = llama_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    bos = llama_tokenizer.bos_token_id
    # Encoding the rendered template *with* special tokens doubles BOS: the pitfall the loader avoids.
    assert llama_tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_rejects_vocab_larger_than_the_tiny_models():
    with pytest.raises(ValueError, match="vocab_size=400"):
        build_tiny_tokenizer("qwen", vocab_size=400)
