"""train/forward.py on one gloo rank: each pass of the step against an fp64 Hugging Face reference.

``logprob_pass`` (student and teacher prompts, at a temperature), ``hidden_pass`` (the teacher's final
hidden states: through the output layer they give the teacher's log-probs) and ``train_pass`` (what
the loss function receives: log-probs, entropies and, with teacher states, the reverse KL).
"""

import dataclasses

import pytest
import torch
from steplib import fixed_responses, hf_log_softmax, hf_token_stats

from sdpg_mcore.models.tiny import save_tiny_hf_model
from sdpg_mcore.parallel.spawn import spawn_ranks

T, TEACHER_T = 0.8, 1.0


def _passes(rank, world_size, hf_dir):
    from sdpg_mcore import algo
    from sdpg_mcore.config import OptimizerConfig
    from sdpg_mcore.parallel import state
    from sdpg_mcore.train import batch as B
    from sdpg_mcore.train.forward import hidden_pass, logprob_pass, output_weight, train_pass
    from sdpg_mcore.train.model_setup import build_policy

    layout = state.initialize_model_parallel(tp=1, pp=1, cp=1, seed=3)
    policy = build_policy(
        hf_dir,
        layout,
        dtype=torch.float32,
        optim=OptimizerConfig(),
        total_updates=1,
        vocab_size=301,
        chunk_size=16,
    )
    responses = fixed_responses()
    mbs = B.build_micro_batches(responses, list(range(8)), 40, 0, with_teacher=True)
    assert len(mbs) > 1  # several micro-batches through the schedule
    chunks, head = policy.chunks, policy.head
    out = {
        "student": B.scatter_rows(logprob_pass(chunks, mbs, head, temperature=T), mbs, responses),
        "teacher": B.scatter_rows(
            logprob_pass(chunks, mbs, head, temperature=TEACHER_T, teacher=True), mbs, responses
        ),
    }
    hidden = hidden_pass(chunks, mbs, head)
    weight = output_weight(chunks[0]).detach()[:301]
    from_hidden = [
        torch.log_softmax(h @ weight.T / TEACHER_T, -1).gather(1, mb.targets_N[:, None])[:, 0]
        for h, mb in zip(hidden, mbs)
    ]
    out["from_hidden"] = B.scatter_rows(from_hidden, mbs, responses)
    seen = []

    def loss_fn(mb, kl_N, logprob_N, entropy_N):
        seen.append((kl_N if kl_N is None else kl_N.detach(), logprob_N.detach(), entropy_N.detach()))
        return logprob_N.sum() * 0.0, algo.MetricSums()

    for with_teacher in (False, True):
        mbs_in = (
            [dataclasses.replace(mb, teacher_hidden_NH=h) for mb, h in zip(mbs, hidden)]
            if with_teacher
            else mbs
        )
        policy.zero_grad()
        train_pass(chunks, mbs_in, head, loss_fn, temperature=T, teacher_temperature=TEACHER_T)
    n = len(mbs)
    out["train_logprob"] = B.scatter_rows([s[1] for s in seen[:n]], mbs, responses)
    out["train_entropy"] = B.scatter_rows([s[2] for s in seen[:n]], mbs, responses)
    out["kl_without_teacher"] = [s[0] for s in seen[:n]]
    out["kl"] = B.scatter_rows([s[0] for s in seen[n:]], mbs, responses)
    state.destroy()
    return out


@pytest.fixture(scope="module")
def passes(tmp_path_factory):
    hf_dir = str(
        save_tiny_hf_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", num_hidden_layers=2, seed=1)
    )
    responses = fixed_responses()
    reference = {
        "student": hf_token_stats(hf_dir, responses, teacher=False, temperature=T),
        "teacher": hf_token_stats(hf_dir, responses, teacher=True, temperature=TEACHER_T),
        "student_full": hf_log_softmax(hf_dir, responses, teacher=False, temperature=T),
        "teacher_full": hf_log_softmax(hf_dir, responses, teacher=True, temperature=TEACHER_T),
    }
    return spawn_ranks(_passes, 1, args=(hf_dir,))[0], reference


def _close(got, want):  # fp32 forward vs fp64 reference on a 2-layer model
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_logprob_pass_student_and_teacher(passes):
    out, ref = passes
    for i, (lp, _) in enumerate(ref["student"]):
        _close(out["student"][i], lp)
    for i, (lp, _) in enumerate(ref["teacher"]):
        _close(out["teacher"][i], lp)


def test_hidden_pass_gives_the_teachers_final_states(passes):
    out, ref = passes
    for i, (lp, _) in enumerate(ref["teacher"]):
        _close(out["from_hidden"][i], lp)


def test_train_pass_hands_the_loss_logprobs_entropy_and_kl(passes):
    out, ref = passes
    assert all(kl is None for kl in out["kl_without_teacher"])  # no teacher states: no KL, no teacher matmul
    for i, (lp, ent) in enumerate(ref["student"]):
        _close(out["train_logprob"][i], lp)
        _close(out["train_entropy"][i], ent)
    # Reverse KL(student at T || teacher at TEACHER_T) per token, from the full fp64 distributions.
    for i, (s, t) in enumerate(zip(ref["student_full"], ref["teacher_full"])):
        _close(out["kl"][i], (s.exp() * (s - t)).sum(-1))
