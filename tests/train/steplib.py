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


def step_context(policy, hf_dir, layout, loss_cfg, **fields):
    """The ``StepContext`` of the step tests: the tiny model's policy, ``loss_cfg``'s algorithm, the
    reference weights swapped in from ``hf_dir`` when the algorithm reads them, pad id 0, a 40-token
    budget, two groups per mini-batch; ``fields`` override any of it (temperature, total_steps, ...)."""
    from sdpg_mcore import algo
    from sdpg_mcore.train.model_setup import ReferenceWeights
    from sdpg_mcore.train.step import StepContext

    algorithm = algo.algorithm_of(loss_cfg)
    needs = loss_cfg.needs()
    frozen = needs.ref_logprobs or needs.teacher_weights is algo.TeacherWeights.FROZEN_REFERENCE
    reference = ReferenceWeights(policy, "cpu_swap", hf_dir, layout, torch.float32) if frozen else None
    defaults = dict(temperature=0.9, token_budget=40, mini_batch_groups=2, total_steps=4, pad_id=0)
    return StepContext(
        policy=policy, reference=reference, algorithm=algorithm, loss_cfg=loss_cfg, layout=layout,
        **{**defaults, **fields},
    )  # fmt: skip
