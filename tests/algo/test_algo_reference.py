"""The losses, aggregation, beta schedule and GRPO advantages against the SDPG reference's own outputs.

``fixtures/reference_losses.json`` holds what the reference's functions (its verl fork's
``core_algos.py`` and ``ray_trainer.py``; commit, files and command in the fixture's ``provenance``)
returned on fixed fp64 inputs in verl's padded ``[B, T]`` layout: each loss and its gradient with
respect to the log-probs and the KL. Here the same inputs, flattened to this project's ``[N]`` tokens,
go through ``sdpg_mcore.algo``; values and gradients must agree to fp64 rounding. Where the project
departs from the reference on purpose (aggregation that does not depend on the micro-batch split,
opsd without a positive advantage) the test shows the reference's number beside ours.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from sdpg_mcore.algo import (
    DAPOConfig,
    GRPOConfig,
    Normaliser,
    OPSDConfig,
    RLSDConfig,
    SDPGConfig,
    TokenInputs,
    aggregate,
    beta_schedule,
    get_algorithm,
    grpo_advantages,
    kl_in_reward,
    loss_counts,
    micro_batch_loss,
    normalisers_from_counts,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "reference_losses.json").read_text())
F64 = {"rtol": 1e-12, "atol": 1e-14}


def _padded(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _token_inputs(inputs: dict, advantages=None, rows=None) -> tuple[TokenInputs, torch.Tensor]:
    """The fixture's ``[B, T]`` inputs as flat ``[N]`` response tokens; also the ``[B, T]`` mask."""
    mask_BT = _padded(inputs["response_mask"]).bool()
    if rows is not None:
        mask_BT = mask_BT[rows]

    def flat(name, values=None):
        t = _padded(values if values is not None else inputs[name])
        return (t if rows is None else t[rows])[mask_BT]

    seq_index_N = torch.nonzero(mask_BT)[:, 0]
    token_inputs = TokenInputs(
        logprob_N=flat("log_prob").requires_grad_(True),
        old_logprob_N=flat("old_log_prob"),
        advantages_N=flat("advantages", advantages),
        seq_index_N=seq_index_N,
        num_seqs=mask_BT.shape[0],
        kl_N=flat("kl").requires_grad_(True),
        entropy_N=flat("entropy"),
        ref_logprob_N=flat("ref_log_prob"),
        teacher_logprob_N=flat("teacher_log_prob"),
    )
    return token_inputs, mask_BT


def _project_config(case: dict):
    """This project's config for the reference's loss_mode, clip ratios and policy_loss fields."""
    low, high, c = case["clip"]
    policy = case["policy_loss"]
    if case["loss_mode"] == "sdpg":
        return "sdpg", SDPGConfig(
            beta=policy["beta"], alpha=policy["alpha"], alpha_mode=policy["kl_mode"],
            positive_advantage_only=policy.get("beta_distill_positive_advantage_only", False),
            beta_warmup_steps=policy.get("beta_warmup_steps", 0), beta_decay_steps=policy.get("beta_decay_steps", 0),
            clip_eps_low=low, clip_eps_high=high, clip_c=c,
        )  # fmt: skip
    if case["loss_mode"] == "vanilla":
        return ("dapo", DAPOConfig()) if high == 0.28 else ("grpo", GRPOConfig())
    if case["loss_mode"] == "opsd":
        return "opsd", OPSDConfig(entropy_coef=0.0)  # the reference adds its entropy bonus outside the loss
    return "rlsd", RLSDConfig()


def _run(name, cfg, inputs: TokenInputs, step=1, total_steps=0, mini_batch_rows=0):
    algo = get_algorithm(name)
    counts = loss_counts(algo, cfg, inputs.advantages_N, inputs.seq_index_N, inputs.num_seqs)
    norms = normalisers_from_counts(counts, cfg.loss_agg_mode, mini_batch_rows=mini_batch_rows)
    return micro_batch_loss(algo, cfg, inputs, norms, step=step, total_steps=total_steps)


def _grads(out, inputs: TokenInputs):
    grads = torch.autograd.grad(out.loss, [inputs.logprob_N, inputs.kl_N], allow_unused=True)
    return [torch.zeros_like(inputs.logprob_N) if g is None else g for g in grads]


def _case_id(case: dict) -> str:
    policy, call = case["policy_loss"], case["call"]
    parts = [
        case["loss_mode"],
        policy.get("kl_mode", ""),
        "gated" * bool(policy.get("beta_distill_positive_advantage_only")),
    ]
    parts += [f"step{call['current_step']}" if "current_step" in call else "", "c%g" % (case["clip"][2] or 3)]
    return "-".join(p for p in parts if p) + ("-no_positive" if "advantages" in case else "")


DEFINED_CASES = [c for c in FIXTURE["losses"] if not math.isnan(c["reference"]["loss"])]


@pytest.mark.parametrize("case", DEFINED_CASES, ids=[_case_id(c) for c in DEFINED_CASES])
def test_losses_and_gradients_match_the_reference(case):
    """Our loss (the project clamps the KL at 20 itself; the reference's dp_actor clamps before its
    loss) and our gradients, per response token, against the reference's on the same tokens."""
    name, cfg = _project_config(case)
    inputs, mask_BT = _token_inputs(FIXTURE["inputs"], case.get("advantages"))
    out = _run(
        name,
        cfg,
        inputs,
        step=case["call"].get("current_step", 1),
        total_steps=case["call"].get("total_steps", 0),
    )
    ref = case["reference"]
    torch.testing.assert_close(out.loss.detach(), torch.tensor(ref["loss"], dtype=torch.float64), **F64)
    g_lp, g_kl = _grads(out, inputs)
    torch.testing.assert_close(g_lp, _padded(ref["grad_log_prob"])[mask_BT], **F64)
    if ref["grad_kl"] is not None:
        torch.testing.assert_close(g_kl, _padded(ref["grad_kl"])[mask_BT], **F64)
        assert out.scalars["beta"] == pytest.approx(ref["metrics"]["actor/beta_effective"], rel=1e-15)
    if name == "rlsd":
        assert out.scalars["rlsd_lambda"] == pytest.approx(ref["metrics"]["actor/rlsd_lambda"], rel=1e-15)


def test_fixture_covers_every_reference_loss_mode():
    modes = {(c["loss_mode"], c["policy_loss"].get("kl_mode")) for c in DEFINED_CASES}
    assert {("sdpg", m) for m in ("fkl", "rkl", "ufkl", "urkl")} | {
        ("vanilla", None),
        ("opsd", None),
        ("rlsd", None),
    } == modes
    assert (
        FIXTURE["provenance"]["repository"].endswith("lauyikfung/SDPG")
        and len(FIXTURE["provenance"]["commit"]) == 40
    )


def test_opsd_without_a_positive_advantage_is_zero_where_the_reference_is_nan():
    """Intended difference: the reference's token mean over zero gated tokens is 0/0 = NaN; ours is 0."""
    (case,) = [c for c in FIXTURE["losses"] if "advantages" in c]
    assert math.isnan(case["reference"]["loss"])
    inputs, _ = _token_inputs(FIXTURE["inputs"], case["advantages"])
    out = _run("opsd", OPSDConfig(entropy_coef=0.0), inputs)
    assert out.loss.item() == 0.0
    g_lp, _ = _grads(out, inputs)
    assert torch.equal(g_lp, torch.zeros_like(g_lp))


def test_token_mean_legacy_is_the_reference_per_micro_batch_mean():
    """``token-mean-legacy`` reproduces the reference's FSDP update: each micro-batch's own token mean
    (``agg_loss`` without global batch info, fixture) times ``micro-batch rows / mini-batch rows``
    (``dp_actor.update_policy``'s ``loss_scale_factor`` with dynamic batch sizes), summed. Its value
    depends on the split; this project's ``token-mean`` is the same for every split (intended fix)."""
    legacy_cfg, fixed_cfg = DAPOConfig(loss_agg_mode="token-mean-legacy"), DAPOConfig()
    whole, whole_mask = _token_inputs(FIXTURE["legacy_inputs"])
    fixed = _run("dapo", fixed_cfg, whole)
    reference_by_split = {}
    for split, micro_batches in FIXTURE["legacy"].items():
        reference_loss, ours = 0.0, 0.0
        for micro in micro_batches:
            scale = len(micro["rows"]) / whole_mask.shape[0]
            inputs, mask_BT = _token_inputs(FIXTURE["legacy_inputs"], rows=micro["rows"])
            out = _run("dapo", legacy_cfg, inputs, mini_batch_rows=whole_mask.shape[0])
            g_lp, _ = _grads(out, inputs)
            ref = micro["reference"]
            torch.testing.assert_close(g_lp, scale * _padded(ref["grad_log_prob"])[mask_BT], **F64)
            reference_loss += scale * ref["loss"]
            ours += out.loss.item()
        assert ours == pytest.approx(reference_loss, rel=1e-12)
        reference_by_split[split] = reference_loss
    assert fixed.loss.item() == pytest.approx(reference_by_split["1"], rel=1e-12)  # one micro-batch: the same
    spread = max(reference_by_split.values()) - min(reference_by_split.values())
    assert spread > 0.05, reference_by_split  # the reference's loss moves with the split; token-mean does not


@pytest.mark.parametrize("case", FIXTURE["agg_loss"], ids=[c["mode"] for c in FIXTURE["agg_loss"]])
def test_aggregation_modes_match_reference_agg_loss(case):
    """Same value; ``seq-mean-token-mean`` within 1e-8 relative: the reference adds 1e-8 to each
    response's token count (ours divides by the count itself)."""
    mask_BT = _padded(case["mask"]).bool()
    values_N = _padded(FIXTURE["inputs"]["entropy"])[mask_BT]
    seq_index_N = torch.nonzero(mask_BT)[:, 0]
    live = int(mask_BT.any(dim=1).sum())
    norm = Normaliser(case["mode"], float(mask_BT.sum()), float(live))
    got = aggregate(
        values_N, torch.ones_like(values_N, dtype=torch.bool), seq_index_N, mask_BT.shape[0], norm
    ).item()
    rel = 1e-8 if case["mode"] == "seq-mean-token-mean" else 1e-12
    assert got == pytest.approx(case["reference"], rel=rel)


def test_beta_schedule_matches_the_reference():
    cases = FIXTURE["beta_schedule"]
    got = [beta_schedule(c["beta"], c["step"], warmup_steps=c["warmup_steps"], decay_steps=c["decay_steps"],
                         total_steps=c["total_steps"]) for c in cases]  # fmt: skip
    assert got == pytest.approx([c["reference"] for c in cases], rel=1e-15, abs=0)
    assert len({c["reference"] for c in cases}) > 10  # the grid reaches warm-up, decay and both


@pytest.mark.parametrize("coef", [0.0, 1e-3])
def test_grpo_advantages_and_kl_in_reward_match_the_reference_pipeline(coef):
    """``kl_in_reward`` then ``grpo_advantages`` against verl's ``apply_kl_penalty`` then
    ``compute_advantage(GRPO)``: one advantage per response, on every one of its tokens.

    The group of one differs by 4.6e-8 relative: the reference divides it by ``std + 1e-6`` with its
    stand-in std held in fp32 (``torch.tensor(1.0)``), i.e. by fp32(1 + 1e-6) = 1.00000095...; ours
    divides by 1 + 1e-6 in fp64.
    """
    adv = FIXTURE["grpo_advantages"]
    lengths = adv["lengths"]
    mask_BT = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    seq_index_N = torch.nonzero(mask_BT)[:, 0]
    rewards_B = _padded(adv["rewards"])
    if coef:
        rewards_B, _ = kl_in_reward(rewards_B, _padded(adv["old_log_prob"])[mask_BT],
                                    _padded(adv["ref_log_prob"])[mask_BT], seq_index_N, coef=coef)  # fmt: skip
    groups = torch.tensor([sorted(set(adv["groups"])).index(g) for g in adv["groups"]])
    got_B = grpo_advantages(rewards_B, groups)
    ref = adv[f"kl_coef_{coef}"]
    ref_B = _padded(ref["advantages"])[:, 0]
    torch.testing.assert_close(rewards_B, _padded(ref["token_level_rewards"]).sum(dim=1), **F64)
    torch.testing.assert_close(_padded(ref["advantages"])[mask_BT], ref_B[seq_index_N], rtol=0, atol=0)
    single = [adv["groups"].count(g) == 1 for g in adv["groups"]]
    grouped = torch.tensor([not s for s in single])
    torch.testing.assert_close(got_B[grouped], ref_B[grouped], **F64)
    fp32_denominator = (torch.tensor(1.0) + 1e-6).item()
    assert fp32_denominator != 1 + 1e-6
    for b in (b for b, s in enumerate(single) if s):
        assert ref_B[b].item() == pytest.approx(rewards_B[b].item() / fp32_denominator, rel=1e-15)
        assert got_B[b].item() == pytest.approx(rewards_B[b].item() / (1 + 1e-6), rel=1e-15)
        assert got_B[b].item() == pytest.approx(ref_B[b].item(), rel=1e-7)
