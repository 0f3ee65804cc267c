"""The fused KL head against the SDPG reference's own KL code, and the precision it fixes.

``fixtures/reference_kl.json`` holds what the reference's ``DataParallelPPOActor._compute_kl_distill_micro_batch``
(its FSDP actor, default bf16 autocast; commit and command in the fixture's ``provenance``) returned on a
toy model whose bf16 hidden states and head weight are known exactly: the per-token KL(student ‖
teacher), the student's log-prob of the response token and its entropy. Both implementations get the
same bf16 inputs; an fp64 computation from those inputs is the truth. The quantity is the same (KL
direction, the rollout temperature on the student logits only, the positions that predict the
response); the precision is not, on purpose: the reference rounds logits and softmax statistics to
bf16, the fused head keeps them in fp32.
"""

import json
from pathlib import Path

import pytest
import torch

from sdpg_mcore.ops import fused_kl_head

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "reference_kl.json").read_text())


def _inputs():
    """bf16 student/teacher hidden states at the response-predicting positions, the bf16 head, the
    targets and the response mask, built as the fixture's toy model builds them."""
    embed = torch.tensor(FIXTURE["embed_int"], dtype=torch.float64) / 64
    weight = (torch.tensor(FIXTURE["head_int"], dtype=torch.float64) / 64).to(torch.bfloat16)
    responses = torch.tensor(FIXTURE["responses"])
    hidden = {}
    for side, prompts in FIXTURE["prompts"].items():
        ids = torch.cat([torch.tensor(prompts), responses], dim=1)
        sums = (embed[ids] * (ids != 0)[..., None]).cumsum(dim=1)  # exact: multiples of 1/64
        start = len(prompts[0]) - 1  # the last prompt position predicts the first response token
        hidden[side] = sums[:, start : start + responses.shape[1]].to(torch.bfloat16)
    mask = responses != 0
    return hidden["student"][mask], hidden["teacher"][mask], weight, responses[mask], mask


def _fp64_truth(h_s, h_t, weight, targets, temperature, teacher_temperature=1.0):
    w = weight.double()
    log_p = torch.log_softmax(h_s.double() @ w.t() / temperature, dim=-1)
    log_q = torch.log_softmax(h_t.double() @ w.t() / teacher_temperature, dim=-1)
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1), log_p.gather(1, targets[:, None])[:, 0], -(p * log_p).sum(-1)


@pytest.mark.parametrize("run", FIXTURE["runs"], ids=lambda r: f"T{r['temperature']}")
def test_same_kl_as_the_reference_with_fp32_instead_of_bf16_error(run):
    h_s, h_t, weight, targets, mask = _inputs()
    temperature = run["temperature"]
    ours = fused_kl_head(h_s, h_t, weight, targets, vocab_size=weight.shape[0], temperature=temperature)
    truth = _fp64_truth(h_s, h_t, weight, targets, temperature)
    assert run["dtype"] == "torch.bfloat16"
    for name, got, want, ref in zip(
        ("kl", "log_prob", "entropy"), ours, truth, (run["kl"], run["log_prob"], run["entropy"])
    ):
        ref_N = torch.tensor(ref, dtype=torch.float64)[mask]
        err_ours = (got.double() - want).abs().max().item()
        err_ref = (ref_N - want).abs().max().item()
        scale = want.abs().max().item()
        # fp32 logits over a 128-token vocabulary with |logit| < 10: well under 1e-5.
        assert err_ours < 1e-5 * max(1.0, scale), (name, err_ours)
        # bf16 keeps 8 significant bits: the reference is within a few units of 2^-8 of the truth
        # (measured: 0.014 on the KL, 0.040 on the entropy) ...
        assert err_ref < 8 * 2**-8 * max(1.0, scale), (name, err_ref)
        # ... and at least 100x further from it than the fused head (the intended difference).
        assert err_ref > 100 * err_ours, (name, err_ref, err_ours)


def test_the_reference_applies_the_temperature_to_the_student_only():
    """At T = 0.7 the reference's KL matches a teacher at temperature 1 (as ``teacher_temperature=1.0``
    here), not a teacher at 0.7: the two differ by far more than bf16 rounding."""
    (run,) = [r for r in FIXTURE["runs"] if r["temperature"] != 1.0]
    h_s, h_t, weight, targets, mask = _inputs()
    ref_N = torch.tensor(run["kl"], dtype=torch.float64)[mask]
    teacher_at_1 = _fp64_truth(h_s, h_t, weight, targets, run["temperature"])[0]
    teacher_at_t = _fp64_truth(h_s, h_t, weight, targets, run["temperature"], run["temperature"])[0]
    assert (ref_N - teacher_at_1).abs().max() < 4 * 2**-8
    assert (ref_N - teacher_at_t).abs().max() > 0.05
