"""A tiny tokenizer, built locally, for tests, tools and the CPU example.

No hub: a byte-pair tokenizer is trained with ``tokenizers`` on a small built-in corpus (arithmetic,
the instruction and teacher-context templates, ``\\boxed{}``) so that the prompts of the synthetic
arithmetic task stay well inside the tiny models' 256 positions. Every printable ASCII character,
``\\n`` and ``\\t`` is in the base alphabet, so any ASCII text round-trips through encode/decode.

Two chat-template styles exercise what differs between model families:

* ``qwen``: ChatML (``<|im_start|>role\\n...<|im_end|>``) with Qwen3's ``enable_thinking`` kwarg
  (``enable_thinking=False`` appends an empty ``<think></think>`` block to the generation prompt);
  no BOS token.
* ``llama``: Llama-3 headers (``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n``),
  message contents trimmed as the real template does, and a post-processor that adds BOS on plain
  ``encode`` — so a loader that tokenises a rendered template with special tokens gets a double BOS.

    path = save_tiny_tokenizer(tmp_path / "tok", style="qwen")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

#: The tiny models' vocabulary size (``sdpg_mcore/models/tiny.py``); the tokenizer must not exceed it.
TINY_MODEL_VOCAB_SIZE = 301

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
LLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_WORDS = (
    "What is the value of Compute Calculate Find Solve answer question problem number sum product "
    "difference result step first then so we get have equals because therefore Let total each "
    "assistant user system Please reason step by step, and put your final answer within \\boxed{}. "
    "The correct answer to this problem is: Use this to verify your reasoning, but show your full "
    "solution process. Answer: Think think The Therefore, I"
)


def _training_corpus() -> list[str]:
    """A fixed corpus: the merges it yields are deterministic, so every build is identical."""
    lines = [_WORDS] * 20
    for a in range(0, 100, 3):
        for b, op in ((7, "+"), (13, "-"), (4, "*"), (52, "+")):
            result = eval(f"{a} {op} {b}")  # noqa: S307 - fixed literal arithmetic
            lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {result}. The answer is \\boxed{{{result}}}.")
    return lines


def build_tiny_tokenizer(style: Literal["qwen", "llama"] = "qwen", vocab_size: int = TINY_MODEL_VOCAB_SIZE):
    """Train the tiny tokenizer and wrap it as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in ("qwen", "llama"):
        raise ValueError(f"style={style!r}: choose 'qwen' or 'llama'")
    specials = QWEN_SPECIAL_TOKENS if style == "qwen" else LLAMA_SPECIAL_TOKENS
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    minimum = len(alphabet) + len(specials) + 1
    if not minimum <= vocab_size <= TINY_MODEL_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size}: must lie in [{minimum}, {TINY_MODEL_VOCAB_SIZE}] (the base alphabet "
            f"plus special tokens, and at most the tiny models' vocabulary)"
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", *specials],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    if style == "qwen":
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token="<unk>",
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    else:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=bos,
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            unk_token="<unk>",
            chat_template=LLAMA_CHAT_TEMPLATE,
        )
    assert len(wrapped) <= vocab_size, (len(wrapped), vocab_size)
    return wrapped


def save_tiny_tokenizer(
    out_dir: str | Path, style: Literal["qwen", "llama"] = "qwen", vocab_size: int = TINY_MODEL_VOCAB_SIZE
) -> Path:
    """Build the tiny tokenizer of ``style`` and ``save_pretrained`` it to ``out_dir``; returns the path."""
    out = Path(out_dir)
    build_tiny_tokenizer(style, vocab_size).save_pretrained(out)
    return out
