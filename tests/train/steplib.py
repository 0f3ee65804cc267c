"""Shared pieces of the step-level tests: a fixed scored batch and an fp64 Hugging Face reference."""

import torch


def fixed_responses():
    """8 responses in 4 groups of 2 (rewards [1,0], [0,1], [0,0], [1,0]), student and teacher prompts."""
    from sdpg_mcore.train.batch import Response

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        n = 3 + i % 3
        out.append(
            Response(
                group=i // 2,
                prompt_ids=torch.randint(5, 290, (4 + i % 4,), generator=g).tolist(),
                teacher_prompt_ids=torch.randint(5, 290, (7 + i % 3,), generator=g).tolist(),
                response_ids=torch.randint(5, 290, (n,), generator=g).tolist(),
                rollout_logprobs=(-torch.rand(n, generator=g)).tolist(),
                reward=float((i * 7) % 3 == 0),
                acc=float((i * 7) % 3 == 0),
            )
        )
    return out


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
