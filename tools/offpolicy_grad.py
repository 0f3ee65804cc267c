"""How far the loss gradient on stale samples is from the one on fresh samples, at fixed weights.

    python tools/offpolicy_grad.py --config examples/tiny/sdpg.yaml --policy HF_DIR_V --behaviour HF_DIR_V-1 \\
        --prompts 256 --repeats 5 --json offpolicy.json [--set key=value ...]

Asynchronous rollouts (``rollout.async_steps = k``) train weights v on samples drawn by older weights
v - k. This tool asks whether a correction makes that harmless for one update: on the same prompts it
draws two independent sample sets from the policy (fresh) and two from the behaviour weights (stale),
and takes the loss gradient at the policy's weights (the first mini-batch's: PPO ratio 1) on each,
split into the policy-gradient term and the self-distillation KL term. Stale gradients are taken
with each correction of the policy-gradient term: none, the per-token truncated weight
``min(pi / pi_b, c)`` (``algorithm.rollout_is_cap = c``, what the trainer does) and, for comparison,
the per-sequence ``min(prod_t pi / pi_b, c)``.

With each gradient the mean of its two halves, the squared bias ``|E g_stale - E g_fresh|^2`` is
estimated without the sampling noise as ``|g_s - g_f|^2 - |g_s1 - g_s2|^2 / 4 - |g_f1 - g_f2|^2 / 4``,
and reported relative to the noise-corrected ``|E g_fresh|^2``, averaged over ``--repeats`` prompt
draws (mean and standard error); ``--advantages fresh-baseline`` replaces the group-normalised
advantages of all four sets by ``R`` minus the mean reward of a fifth, fresh set, to see how much of
the bias the group statistics of stale samples add. ``--behaviour`` equal to ``--policy`` is the
control: every row's bias is then zero up to the estimate's noise. ``along`` splits the bias: the
stale gradient's length along the fresh one (1: none of the bias shortens or lengthens the step).
``noise`` is the squared noise of a stale gradient from ``2 x prompts x n`` samples relative to the
same signal, the price of a correction's variance; ``fresh noise`` the same for fresh samples. A
training mini-batch of m prompts has ``2 x prompts / m`` times that noise and the same bias, and its
noise averages out over steps while the bias does not.

Two consecutive versions of a run: train with ``trainer.save_interval=1``, then
``tools/convert_hf.py to-hf --mcore RUN/checkpoints/step_0000000V --out DIR`` for each. Sampling and
forwards run in Hugging Face transformers (fp32, CPU); the per-token loss is the trainer's
(``sdpg_mcore.algo.losses.sdpg_loss``). SDPG recipes only; TP = PP = 1 sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from sdpg_mcore.algo.advantages import grpo_advantages  # noqa: E402
from sdpg_mcore.algo.config import SDPGConfig  # noqa: E402
from sdpg_mcore.algo.losses import TokenInputs, sdpg_loss  # noqa: E402
from sdpg_mcore.bench.offpolicy import bias_estimate, fresh_baseline_advantages, summarise_draws  # noqa: E402


def load_model(model_dir: Path, weights_dir: Path):
    """The HF model of ``model_dir``'s config with the safetensors of ``weights_dir`` (fp32, eval)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{weights_dir}: no *.safetensors; give an HF model directory")
    state = {k: v for f in files for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{weights_dir}: weights do not fit {model_dir}'s config: "
                         f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")  # fmt: skip
    model.tie_weights()
    return model.eval()


def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """``[N, V]`` logits predicting each response token, flat over the responses in order."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    row = torch.cat([torch.full((len(r),), i) for i, r in enumerate(responses)])
    pos = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(r)) for p, r in zip(prompts, responses)])
    return logits[row, pos]


class Sampler:
    """Rollouts as the trainer sees them: responses, rewards, advantages, rollout log-probs, teacher."""

    def __init__(self, cfg, tokenizer, n: int):
        from transformers import AutoConfig

        from sdpg_mcore.rewards.scorer import RewardScorer
        from sdpg_mcore.rollout.engine import eos_token_ids

        self.cfg, self.tok, self.n = cfg, tokenizer, n
        rw = cfg.reward
        self.scorer = RewardScorer(rw.scorer, strict=rw.strict, answer_format=rw.answer_format, num_workers=0)
        config = AutoConfig.from_pretrained(cfg.model.path)
        self.eos = sorted(eos_token_ids(config, tokenizer))  # the stop tokens of the dev server
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    @torch.no_grad()
    def draw(self, sampler_model, teacher_model, samples) -> dict:
        from sdpg_mcore.rewards.scorer import RewardRequest

        reps = [s for s in samples for _ in range(self.n)]
        width = max(len(s.student_ids) for s in reps)
        ids = torch.full((len(reps), width), self.pad)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(reps):  # left-padded prompts
            ids[i, width - len(s.student_ids) :], mask[i, width - len(s.student_ids) :] = (
                torch.tensor(s.student_ids),
                1,
            )
        out = sampler_model.generate(
            ids, attention_mask=mask, do_sample=True, temperature=self.cfg.rollout.temperature, top_k=0,
            top_p=1.0, max_new_tokens=self.cfg.data.max_response_length, eos_token_id=self.eos, pad_token_id=self.pad,
        )  # fmt: skip
        responses = [_until_eos(row, self.eos) for row in out[:, width:].tolist()]
        requests = [
            RewardRequest(
                s.data_source, self.tok.decode(r, skip_special_tokens=True), s.ground_truth, s.extra_info
            )
            for s, r in zip(reps, responses)
        ]
        rewards = torch.tensor([res.score for res in self.scorer.score(requests)], dtype=torch.float64)
        groups = torch.arange(len(samples)).repeat_interleave(self.n)
        tokens = torch.tensor([t for r in responses for t in r])
        temp = self.cfg.rollout.temperature
        student = response_logits(sampler_model, [s.student_ids for s in reps], responses, self.pad) / temp
        teacher = response_logits(teacher_model, [s.teacher_ids for s in reps], responses, self.pad)
        return {
            "reps": reps,
            "responses": responses,
            "tokens": tokens,
            "rewards": rewards,
            "groups": groups,
            "adv": grpo_advantages(rewards, groups).float(),
            "rollout_lp": torch.log_softmax(student, -1).gather(1, tokens[:, None])[:, 0],
            "teacher_logp": torch.log_softmax(teacher, -1),
        }


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def term_grads(policy, sampler: Sampler, data: dict, corrections: list[tuple[str, float]]) -> dict:
    """Flat fp64 gradients at the policy's weights (token-mean), from one forward of ``data``: the KL
    term's (never weighted, as in the trainer) under ``"kl"``, and the policy-gradient term's under
    ``("pg", correction, cap)`` for each correction: ``none``, ``token`` (the trainer's
    ``rollout_is_cap``) or ``sequence``."""
    from sdpg_mcore.train.mechanism import reverse_kl

    reps, responses, cfg = data["reps"], data["responses"], sampler.cfg.algorithm
    logits = response_logits(policy, [s.student_ids for s in reps], responses, sampler.pad)
    logp_NV = torch.log_softmax(logits / sampler.cfg.rollout.temperature, -1)
    lp_N = logp_NV.gather(1, data["tokens"][:, None])[:, 0]
    seq_N = torch.cat([torch.full((len(r),), i) for i, r in enumerate(responses)])
    inputs = TokenInputs(
        logprob_N=lp_N, old_logprob_N=lp_N.detach(), advantages_N=data["adv"][seq_N], seq_index_N=seq_N,
        num_seqs=len(responses), kl_N=reverse_kl(logp_NV, data["teacher_logp"]), rollout_logprob_N=data["rollout_lp"],
    )  # fmt: skip
    kl_inputs, kl_cfg = (
        replace(inputs, advantages_N=torch.zeros_like(lp_N)),
        replace(cfg, alpha=0.0, rollout_is_cap=0.0),
    )
    losses = {"kl": sdpg_loss(kl_inputs, kl_cfg, step=cfg.beta_warmup_steps + 1, total_steps=10**9).loss_N}
    log_w_S = torch.zeros(len(responses), dtype=torch.float64)  # log prod_t pi / pi_b per response
    log_w_S.index_add_(0, seq_N, (lp_N.detach() - data["rollout_lp"]).double())
    for correction, cap in corrections:
        pg_cfg = replace(cfg, beta=0.0, alpha=0.0, rollout_is_cap=cap if correction == "token" else 0.0)
        pg_N = sdpg_loss(inputs, pg_cfg, step=1, total_steps=1).loss_N
        if correction == "sequence":
            pg_N = pg_N * log_w_S.clamp(max=20.0).exp().clamp(max=cap)[seq_N].to(pg_N.dtype)
        losses[("pg", correction, cap)] = pg_N
    params = list(policy.parameters())
    out = {}
    for key, loss_N in losses.items():
        grads = torch.autograd.grad(loss_N.mean(), params, retain_graph=True, allow_unused=True)
        out[key] = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]
        ).double()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the run's recipe (an sdpg algorithm)")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of the recipe")
    p.add_argument("--policy", type=Path, required=True, help="HF weights the update starts from (version v)")
    p.add_argument("--behaviour", type=Path, required=True, help="HF weights that sampled (version v - k)")
    p.add_argument("--prompts", type=int, default=256, help="prompts per draw (each sampled n times, 4 sets)")
    p.add_argument("--repeats", type=int, default=5, help="independent prompt draws")
    p.add_argument("--caps", type=float, nargs="+", default=[2.0, 10.0], help="truncation caps to compare")
    p.add_argument(
        "--advantages",
        choices=["group", "fresh-baseline"],
        default="group",
        help="group: the recipe's group-normalised advantages; fresh-baseline: R minus the mean reward "
        "of a fifth, fresh sample set of the prompt (a diagnostic: no advantage couples a group)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from sdpg_mcore.config import load_config
    from sdpg_mcore.train.trainer import load_prompts

    cfg = load_config(a.config, a.set)
    if not isinstance(cfg.algorithm, SDPGConfig):
        raise SystemExit(
            f"algorithm.name={cfg.algorithm.name!r}: this tool measures the sdpg loss; use a sdpg recipe"
        )
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = load_prompts(cfg, cfg.data.train_files, tok, needs_teacher=True)
    policy, behaviour = (
        load_model(Path(cfg.model.path), a.policy),
        load_model(Path(cfg.model.path), a.behaviour),
    )
    sampler = Sampler(cfg, tok, cfg.rollout.n)
    corrections = [("none", 0.0), *[(c, cap) for cap in a.caps for c in ("token", "sequence")]]
    fresh_of = {("pg", *c): ("pg", "none", 0.0) for c in corrections} | {"kl": "kl"}  # fresh: no correction
    results: dict[str, list[dict]] = {_name(key): [] for key in fresh_of}
    for rep in range(a.repeats):
        picked = [dataset[i] for i in torch.randperm(len(dataset))[: a.prompts].tolist()]
        fresh = [sampler.draw(policy, policy, picked) for _ in range(2)]
        stale = [sampler.draw(behaviour, policy, picked) for _ in range(2)]
        if a.advantages == "fresh-baseline":
            baseline = sampler.draw(policy, policy, picked)
            for d in fresh + stale:
                d["adv"] = fresh_baseline_advantages(d, baseline, sampler.n)
        g_fresh = [term_grads(policy, sampler, d, [("none", 0.0)]) for d in fresh]
        g_stale = [term_grads(policy, sampler, d, corrections) for d in stale]
        for key, fresh_key in fresh_of.items():
            f1, f2 = (g[fresh_key] for g in g_fresh)
            results[_name(key)].append(bias_estimate(f1, f2, *(g[key] for g in g_stale)))
        print(f"draw {rep + 1}/{a.repeats} done", file=sys.stderr, flush=True)
    summary = {name: summarise_draws(runs) for name, runs in results.items()}
    print(
        f"{'term / correction':<26} {'|grad|':>8} {'bias^2/signal (se)':>22} {'along (se)':>16} "
        f"{'noise/signal':>13} {'fresh noise':>12}"
    )
    for name, s in summary.items():
        print(
            f"{name:<26} {s['signal_norm']:>8.4f} {s['bias2']:>+13.4f} ({s['bias2_se']:.4f}) "
            f"{s['along']:>9.3f} ({s['along_se']:.3f}) {s['noise']:>13.4f} {s['noise_fresh']:>12.4f}"
        )
    if a.json is not None:
        a.json.write_text(
            json.dumps({"summary": summary, "draws": results, "args": vars(a)}, indent=2, default=str)
        )
    return 0


def _name(key) -> str:
    """``"kl none"``, ``"pg none"``, ``"pg token cap 2"``, ... for a :func:`term_grads` key."""
    if key == "kl":
        return "kl none"
    _, correction, cap = key
    return f"pg {correction}" + (f" cap {cap:g}" if correction != "none" else "")


if __name__ == "__main__":
    sys.exit(main())
