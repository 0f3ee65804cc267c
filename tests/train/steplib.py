"""Shared pieces of the step-level tests: a fixed scored batch and the step context (both from the
package's one builder, ``sdpg_mcore.audit.synthetic``), and an fp64 Hugging Face reference."""

import torch


def fixed_responses():
    """8 responses in 4 groups of 2 (rewards [1,0], [0,1], [0,0], [1,0]), student and teacher prompts,
    rollout log-probs that differ from the trainer's; token ids in [5, 290) of the tiny model's 301."""
    from sdpg_mcore.audit.synthetic import synthetic_responses

    return synthetic_responses(
        4, 2, vocab_size=290, prompt_len=(4, 5, 6, 7), context_len=(7, 8, 9), response_len=(3, 4, 5),
        random_logprobs=True,
    )  # fmt: skip


def hf_log_softmax(hf_dir, responses, *, teacher: bool, temperature: float):
    """fp64 ``[n, V]`` log-probabilities at the positions predicting each response: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    out = []
    for r in responses:
        prompt = r.teacher_prompt_ids if teacher else r.prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + r.response_ids])).logits[0, len(prompt) - 1 : -1]
        out.append(torch.log_softmax(logits / temperature, dim=-1))
    return out


def hf_token_stats(hf_dir, responses, *, teacher: bool, temperature: float):
    """fp64 ``(logprob_N, entropy_N)`` per response of the sampled tokens."""
    out = []
    for r, logp in zip(
        responses, hf_log_softmax(hf_dir, responses, teacher=teacher, temperature=temperature)
    ):
        lp = logp.gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
        out.append((lp, -(logp.exp() * logp).sum(-1)))
    return out


def step_context(policy, hf_dir, layout, loss_cfg, **fields):
    """The ``StepContext`` of the step tests (the trainer's, ``sdpg_mcore.audit.synthetic``): the tiny
    model's policy, ``loss_cfg``'s algorithm, the reference weights of ``hf_dir`` when the algorithm
    reads them, pad id 0, a 40-token budget, two groups per mini-batch; ``fields`` override any of it
    (temperature, total_steps, ...)."""
    from sdpg_mcore.audit.synthetic import synthetic_step_context

    defaults = dict(temperature=0.9, token_budget=40, mini_batch_groups=2, total_steps=4, pad_id=0)
    return synthetic_step_context(policy, layout, loss_cfg, reference_dir=hf_dir, **{**defaults, **fields})
