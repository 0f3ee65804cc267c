"""The head normalises over the model's ``config.vocab_size`` rows, not ``len(tokenizer)``.

The tiny model has 301 embedding rows (Megatron pads them to 384); its tokenizer is trained to 200
entries, like Qwen3's 151,669-entry tokenizer under a 151,936-row embedding. HF logits, the
built-in engine and SGLang normalise over all 301 rows, and a sampled id may lie past the
tokenizer, so the trainer's log-probs must too.
"""

from __future__ import annotations

import pytest
import torch

from sdpg_mcore.data.tiny_tokenizer import save_tiny_tokenizer
from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

VOCAB, TOKENIZER = 301, 200


def _responses():
    from sdpg_mcore.train.batch import Response

    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((7, 11, 5)):
        response = torch.randint(5, VOCAB, (n,), generator=g).tolist()
        response[-1] = VOCAB - 1 - i  # ids past the tokenizer, up to the last row
        out.append(
            Response(group=0, prompt_ids=[3, 4, 5 + i], teacher_prompt_ids=[3, 4, 5 + i], response_ids=response,
                     rollout_logprobs=[0.0] * n)
        )  # fmt: skip
    return out


def _trainer_logprobs(rank, world_size, model_dir):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train import batch as B
    from sdpg_mcore.train.forward import logprob_pass
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=1)
    optim = OptimizerConfig(lr=1e-6, lr_warmup_steps=0, weight_decay=0.0, use_distributed_optimizer=False)
    policy = build_policy(model_dir, layout, dtype=torch.float32, optim=optim, total_updates=1, chunk_size=4)
    responses = _responses()
    mbs = B.build_micro_batches(responses, [0, 1, 2], 10_000, 0, with_teacher=False)
    logprobs = logprob_pass(policy.chunks, mbs, policy.head, temperature=1.0)
    with pytest.raises(ValueError, match="vocab_size=200 differs"):
        build_policy(model_dir, layout, dtype=torch.float32, optim=optim, total_updates=1, chunk_size=4,
                     vocab_size=TOKENIZER)  # fmt: skip
    state.destroy()
    return policy.head.vocab_size, B.scatter_rows(logprobs, mbs, responses)


def test_trainer_logprobs_cover_every_embedding_row_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny_hf_model(tmp_path / "m", "qwen3", vocab_size=VOCAB)
    save_tiny_tokenizer(model_dir, vocab_size=TOKENIZER)
    assert len(AutoTokenizer.from_pretrained(model_dir)) < VOCAB
    head_vocab, per_row = spawn_ranks(_trainer_logprobs, 1, args=(str(model_dir),))[0]
    assert head_vocab == VOCAB
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row, r in enumerate(_responses()):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            log_p = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)  # over all 301 rows
        p = len(r.prompt_ids)
        want = log_p[p - 1 : -1].gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
        # fp32 model on both sides: logits agree to ~1e-6 (parity tests); a 200-row softmax would be off by
        # log(Z_301 / Z_200) ~ 0.4 here.
        torch.testing.assert_close(per_row[row].double(), want, rtol=0, atol=2e-5)
