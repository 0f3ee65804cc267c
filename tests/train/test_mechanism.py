"""The mechanism probe (train/mechanism.py): its log-probs equal transformers' on the same rows, its KL equals
an fp64 reference, and its gradient cosines leave the training gradients untouched."""

import math

import pytest
import torch

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks
from sdpg_mcore.train.mechanism import reverse_kl


def test_reverse_kl_matches_fp64_reference():
    g = torch.Generator().manual_seed(0)
    s_RV = torch.log_softmax(3 * torch.randn(7, 11, generator=g), -1)
    t_RV = torch.log_softmax(3 * torch.randn(7, 11, generator=g), -1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=s_RV.double()),
        torch.distributions.Categorical(logits=t_RV.double()),
    )
    # fp32 sums of 11 terms of size <= ~10: a few ulps of 10 each.
    torch.testing.assert_close(reverse_kl(s_RV, t_RV).double(), ref, atol=1e-5, rtol=1e-5)
    assert float(reverse_kl(s_RV, s_RV).abs().max()) == 0.0


class _Prompt:
    def __init__(self, student_ids, teacher_ids, reference):
        self.student_ids, self.teacher_ids = student_ids, teacher_ids
        self.extra_info = {"reference_response": reference}


class _Sample:
    def __init__(self, output_ids):
        self.output_ids = output_ids


class _Tokenizer:
    """Maps each character to one id (enough to turn a reference string into ids)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 200 for c in text]}


def _probe_rank(rank, world_size, hf_dir):
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train import mechanism
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    optim = OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.0)
    policy = build_policy(
        hf_dir, layout, dtype=torch.float32, optim=optim, total_updates=1, vocab_size=301, chunk_size=16
    )
    g = torch.Generator().manual_seed(1)
    rows = [
        (
            torch.randint(5, 290, (4 + i,), generator=g).tolist(),
            torch.randint(5, 290, (3 + i % 2,), generator=g).tolist(),
        )
        for i in range(5)
    ]
    model = policy.chunks[0]
    logp = mechanism.response_logprobs(model, rows, 301, temperature=0.7)
    prompts = [_Prompt(p, [7, 8, *p], "ab") for p, _ in rows]
    groups = [[_Sample(r)] for _, r in rows]
    grads_before = [p.main_grad.clone() for p in model.parameters() if hasattr(p, "main_grad")]
    cos = mechanism.gradient_alignment(model, prompts, groups, _Tokenizer(), 301, temperature=0.7)
    assert grads_before, "no Megatron main_grad buffers to check"
    untouched = all(
        torch.equal(a, p.main_grad)
        for a, p in zip(grads_before, [p for p in model.parameters() if hasattr(p, "main_grad")])
    ) and all(p.grad is None for p in model.parameters())
    state.destroy()
    return rows, [x.clone() for x in logp], cos, untouched


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )


def test_probe_logprobs_match_transformers_and_grads_stay_clean(hf_dir):
    from transformers import AutoModelForCausalLM

    rows, logp, cos, untouched = spawn_ranks(_probe_rank, 1, args=(hf_dir,))[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for (p, r), lp_RV in zip(rows, logp):
        with torch.no_grad():
            logits = hf(torch.tensor([[*p, *r]])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
        ref = torch.log_softmax(logits.double() / 0.7, -1)
        assert lp_RV.shape == ref.shape == (len(r), 301)
        # Megatron vs transformers logits agree to ~1e-6 in fp32 (tools/check_parity.py); /0.7 and
        # log_softmax keep that order.
        torch.testing.assert_close(lp_RV.double(), ref, atol=1e-4, rtol=0)
    assert set(cos) == {"kl_grad_cos_student", "kl_grad_cos_teacher"}
    assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 and not math.isnan(v) for v in cos.values())
    assert untouched, "gradient_alignment wrote into .grad or Megatron's main_grad"


def test_mechanism_needs_a_single_model_parallel_rank_and_known_sets():
    from pathlib import Path

    from sdpg_mcore.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "bench_algos.yaml"
    assert load_config(recipe, []).eval.mechanism
    with pytest.raises(ConfigError, match=r"eval\.mechanism.*tp=2"):
        load_config(recipe, ["parallel.tp=2"])
    two_sets = load_config(recipe, ["eval.files=[a/heldout.jsonl,b/seen.jsonl]"])
    assert two_sets.eval.mechanism_sets == ["heldout"]
    with pytest.raises(ConfigError, match=r"eval\.mechanism_sets.*\['heldout'\].*\['seen'\]"):
        load_config(recipe, ["eval.files=[b/seen.jsonl]"])
