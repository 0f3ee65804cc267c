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


def hf_token_stats(hf_dir, responses, *, teacher: bool, temperature: float, state_dict=None):
    """fp64 ``(logprob_N, entropy_N)`` per response from the HF model: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    if state_dict is not None:
        model.load_state_dict({k: v.double() for k, v in state_dict.items()}, strict=False)
    out = []
    for r in responses:
        prompt = r.teacher_prompt_ids if teacher else r.prompt_ids
        ids = torch.tensor([prompt + r.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp.gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
        out.append((lp, -(logp.exp() * logp).sum(-1)))
    return out
