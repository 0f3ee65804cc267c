"""Write the test fixtures that hold the SDPG reference's own outputs (lauyikfung/SDPG, a verl fork).

Tests that claim agreement with the reference compare against these JSON files instead of values
written by hand. The reference's code is not part of this repository: this script imports it from a
checkout named on the command line, runs its functions on the tests' inputs, and writes their outputs
with the provenance (repository, commit, file and function, package versions, this command) into

- ``tests/rewards/fixtures/reference_scores.json`` (``--only rewards``):
  ``verl/utils/reward_score/__init__.py`` ``default_compute_score`` in both answer formats on the reward
  table and trap cases (``tests/rewards/trap_cases.py``) and on ``sdpg_mcore/rewards/agreement.py``'s
  generated cases;
- ``tests/algo/fixtures/reference_losses.json`` (``--only algo``): ``verl/trainer/ppo/core_algos.py``'s
  registered losses, ``agg_loss`` and beta schedule, and ``ray_trainer.py``'s KL-in-reward and GRPO
  advantage, on fixed fp64 inputs;
- ``tests/data/fixtures/reference_prompts.json`` (``--only data``): ``verl/utils/dataset/rl_dataset.py``
  ``RLHFDataset`` on a parquet in the reference's teacher-context layout, and its split and
  answer-format methods on message lists;
- ``tests/ops/fixtures/reference_kl.json`` (``--only kl``): ``verl/workers/actor/dp_actor.py``'s
  per-token KL, log-prob and entropy of SDPG on a toy model.

The reference needs a Python of its own (verl pins ``transformers<5``); with the checkout and that
Python, this command rewrites all four (about a minute on two cores)::

    git clone https://github.com/lauyikfung/SDPG /tmp/sdpg_ref
    git -C /tmp/sdpg_ref checkout f71329ee8a69b6778c2083958872ff8ca425ddde
    python3.11 -m venv /tmp/sdpg_ref_venv
    /tmp/sdpg_ref_venv/bin/pip install torch==2.13.0 omegaconf codetiming ray pillow \\
        "tensordict>=0.8,<=0.10,!=0.9.0" "transformers<5" "huggingface-hub<1" "datasets<4.3" torchdata \\
        pydantic peft "math-verify[antlr4_13_2]==0.9.0" pylatexenc pandas pyarrow
    PYTHONPATH=. /tmp/sdpg_ref_venv/bin/python tests/make_reference_fixtures.py --reference /tmp/sdpg_ref

``PYTHONPATH=.`` lets the script build its inputs with this repository's case lists and generators
(the reward cases, the tiny tokenizer); the outputs come only from the reference's functions. A
toy model or an instance built without ``__init__`` drives a reference method where it needs one;
nothing of the reference is replaced.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_REPOSITORY = "https://github.com/lauyikfung/SDPG"
PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "tokenizers",
    "datasets",
    "math-verify",
    "latex2sympy2_extended",
)

# The generated agreement cases: sdpg_mcore/rewards/agreement.py's generator, this many (--cases), this seed.
AGREEMENT_CASES = 300
AGREEMENT_SEED = 0


def load_module(path: Path, name: str):
    """Import one file of this repository by path (the tests' case lists, the agreement generator)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def provenance(reference: Path, functions: list[str], section: str, options: str = "") -> dict:
    commit = subprocess.run(
        ["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "repository": REFERENCE_REPOSITORY,
        "commit": commit,
        "functions": functions,
        "command": "PYTHONPATH=. <reference python> tests/make_reference_fixtures.py "
        f"--reference <checkout of {commit}> --only {section}{options}",
        "python": sys.version.split()[0],
        "packages": versions,
    }


def reward_fixture(reference: Path, num_cases: int = AGREEMENT_CASES) -> dict:
    """``default_compute_score`` in both answer formats on the table, the traps and the generated cases."""
    from verl.utils.reward_score import default_compute_score

    cases = load_module(REPO / "tests" / "rewards" / "trap_cases.py", "trap_cases")
    tool = load_module(REPO / "sdpg_mcore" / "rewards" / "agreement.py", "agreement")

    def both_formats(data_source: str, response: str, truth: str) -> dict:
        return {
            fmt: tool.outcome(default_compute_score, data_source, response, truth, answer_format=fmt)
            for fmt in ("answer_colon", "boxed")
        }

    listed = {
        "table": [("math_dapo", r, t) for r, t, _ in cases.TABLE],
        "traps": [("math", r, t) for r, t in cases.TRAPS],
        "correct": [("math", r, t) for r, t in cases.CORRECT],
    }
    fixture = {
        "provenance": provenance(
            reference,
            ["verl/utils/reward_score/__init__.py:default_compute_score"],
            "rewards",
            "" if num_cases == AGREEMENT_CASES else f" --cases {num_cases} --out <path>",
        ),
        "note": "Each case: data_source, response and ground truth (listed cases), or their digest "
        "(generated cases: sdpg_mcore/rewards/agreement.py generate(n, seed, SOURCES + UNKNOWN_SOURCES)); "
        "the reference's outcome per answer_format.",
    }
    for name, triples in listed.items():
        fixture[name] = [
            {"data_source": s, "response": r, "truth": t, "reference": both_formats(s, r, t)}
            for s, r, t in triples
        ]
    generated = tool.generate(num_cases, AGREEMENT_SEED, tool.SOURCES + tool.UNKNOWN_SOURCES)
    fixture["generated"] = {
        "n": num_cases,
        "seed": AGREEMENT_SEED,
        "cases": [
            {"digest": tool.case_digest(s, r, t), "reference": both_formats(s, r, t)} for s, r, t in generated
        ],
    }
    return fixture


LOSS_LENGTHS = [4, 3, 5]  # three responses, padded to 5 tokens
LOSS_ADVANTAGES = [1.3, -0.8, 0.6]
LEGACY_LENGTHS = [5, 1, 7, 3, 2, 6, 4, 3]  # one mini-batch of eight responses
LEGACY_SPLITS = {"1": [list(range(8))], "2": [[0, 1, 2, 3], [4, 5, 6, 7]], "4": [[0, 1], [2, 3], [4, 5], [6, 7]],
                 "uneven": [[0], [1, 2, 3, 4, 5], [6, 7]]}  # fmt: skip


def loss_inputs(seed: int, lengths: list[int], advantages: list[float]) -> dict[str, list]:
    """Padded ``[B, T]`` fp64 inputs in verl's layout, with the corner cases the losses treat apart.

    A ratio e^2.5 on a positive advantage (upper clip), e^3 on a negative one (dual clip at c = 10),
    e^-1 (lower clip), two KL values above the clamp of 20, a NaN teacher log-prob; padding holds
    ordinary values, so a loss that forgets the mask shows.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    f64 = {"generator": gen, "dtype": torch.float64}
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)
    old = -torch.rand(rows, width, **f64) * 4 - 0.1
    log_ratio = torch.randn(rows, width, **f64) * 0.6
    kl = torch.rand(rows, width, **f64) * 3
    if lengths == LOSS_LENGTHS:
        log_ratio[0, 0], log_ratio[1, 1], log_ratio[2, 0] = 2.5, 3.0, -1.0
        kl[0, 2], kl[2, 1] = 25.0, 40.0
    teacher = old + torch.randn(rows, width, **f64)
    teacher[0, 1] = float("nan")
    return {
        "response_mask": mask.tolist(),
        "old_log_prob": old.tolist(),
        "log_prob": (old + log_ratio).tolist(),
        "ref_log_prob": (old + torch.randn(rows, width, **f64) * 0.5).tolist(),
        "teacher_log_prob": teacher.tolist(),
        "kl": kl.tolist(),
        "entropy": (torch.rand(rows, width, **f64) * 2).tolist(),
        "advantages": (torch.tensor(advantages, dtype=torch.float64)[:, None] * mask).tolist(),
    }


def actor_config(loss_mode: str, clip: tuple[float, float, float | None], **policy_loss):
    """The reference's actor config: clip ratios low/high/c (None: its default) and its policy_loss fields."""
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    low, high, c = clip
    extra = {} if c is None else {"clip_ratio_c": c}
    return FSDPActorConfig(
        strategy="fsdp", rollout_n=1, use_dynamic_bsz=True, clip_ratio_low=low, clip_ratio_high=high,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss), **extra,
    )  # fmt: skip


def reference_loss(loss_mode: str, inputs: dict, clip, policy_loss: dict, rows=None, **call) -> dict:
    """One call of the reference's registered policy loss: the loss, its gradients, its metrics.

    The SDPG loss gets the KL clamped at 20 and the reference log-probs as ``old_log_prob`` (with the
    rollout's as ``rollout_log_prob``), as ``dp_actor.update_policy`` passes them.
    """
    import torch
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()}
    if rows is not None:
        t = {k: v[rows] for k, v in t.items()}
    log_prob = t["log_prob"].requires_grad_(True)
    kl = t["kl"].requires_grad_(True)
    config = actor_config(loss_mode, clip, **policy_loss)
    args = {"log_prob": log_prob, "advantages": t["advantages"], "response_mask": t["response_mask"],
            "loss_agg_mode": "token-mean", "config": config, **call}  # fmt: skip
    if loss_mode == "sdpg":
        args.update(old_log_prob=t["ref_log_prob"], rollout_log_prob=t["old_log_prob"],
                    kl_distill_per_token=kl.clamp(max=20.0))  # fmt: skip
    else:
        args["old_log_prob"] = t["old_log_prob"]
    if loss_mode in ("opsd", "rlsd"):
        args["teacher_log_prob"] = t["teacher_log_prob"]
    loss, metrics = get_policy_loss_fn(loss_mode)(**args)
    loss.backward()
    return {
        "loss": loss.item(),
        "grad_log_prob": log_prob.grad.tolist(),
        "grad_kl": kl.grad.tolist() if loss_mode == "sdpg" else None,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def loss_cases(inputs: dict) -> list[dict]:
    """The reference's losses under the paper scripts' clip settings (``examples/rpg2_trainer``)."""
    sdpg = {"beta": 0.3, "alpha": 0.05, "beta_warmup_steps": 10}
    cases = []
    for kl_mode in ("fkl", "rkl", "ufkl", "urkl"):
        for gating in (False, True):
            policy = dict(sdpg, kl_mode=kl_mode, beta_distill_positive_advantage_only=gating)
            call = {"current_step": 4, "total_steps": 100}
            cases.append(("sdpg", (0.2, 0.28, 10.0), policy, call))
    decay = dict(sdpg, kl_mode="urkl", beta_warmup_steps=0, beta_decay_steps=30)
    cases.append(("sdpg", (0.2, 0.28, 10.0), decay, {"current_step": 80, "total_steps": 100}))
    cases.append(("vanilla", (0.2, 0.28, 10.0), {}, {}))  # dapo
    cases.append(("vanilla", (0.2, 0.2, 1000.0), {}, {}))  # grpo
    cases.append(("opsd", (0.2, 0.2, None), {}, {}))
    for step in (1, 20, 50, 77):
        cases.append(("rlsd", (0.2, 0.2, None), {}, {"current_step": step, "total_steps": 100}))
    out = [
        {"loss_mode": mode, "clip": list(clip), "policy_loss": policy, "call": call,
         "reference": reference_loss(mode, inputs, clip, policy, **call)}
        for mode, clip, policy, call in cases
    ]  # fmt: skip
    # opsd on a micro-batch without a positive advantage: its token mean divides by zero tokens.
    no_positive = [[a * m for m in row] for a, row in zip([-1.0, 0.0, -0.5], inputs["response_mask"])]
    out.append({"loss_mode": "opsd", "clip": [0.2, 0.2, None], "policy_loss": {}, "call": {},
                "advantages": no_positive,
                "reference": reference_loss("opsd", dict(inputs, advantages=no_positive), (0.2, 0.2, None), {})})  # fmt: skip
    return out


def legacy_cases(inputs: dict) -> dict:
    """Each micro-batch's own token-mean loss (verl's ``agg_loss`` with no global batch info, as the
    FSDP ``dp_actor`` calls it) and its gradient, for several splits of one mini-batch."""
    return {
        name: [
            {"rows": rows, "reference": reference_loss("vanilla", inputs, (0.2, 0.28, 10.0), {}, rows=rows)}
            for rows in split
        ]
        for name, split in LEGACY_SPLITS.items()
    }


def agg_cases(inputs: dict) -> list[dict]:
    """``agg_loss`` of the entropy matrix in each of the three modes the project keeps."""
    import torch
    from verl.trainer.ppo.core_algos import agg_loss

    mask = torch.tensor(inputs["response_mask"], dtype=torch.float64)
    mask[1] = 0.0  # a response with no counted token drops out of the sequence means
    values = torch.tensor(inputs["entropy"], dtype=torch.float64)
    return [
        {"mode": mode, "mask": mask.tolist(), "reference": agg_loss(values, mask, mode).item()}
        for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
    ]


def schedule_cases() -> list[dict]:
    """``_compute_effective_beta`` over warm-up, decay and both, at 1-based steps."""
    from verl.trainer.ppo.core_algos import _compute_effective_beta

    settings = [(0, 0, 0), (10, 0, 0), (0, 30, 100), (10, 30, 100), (50, 60, 100)]
    return [
        {"beta": 0.3, "step": step, "warmup_steps": w, "decay_steps": d, "total_steps": n,
         "reference": _compute_effective_beta(0.3, step, n, w, d)}
        for w, d, n in settings for step in (1, 4, 9, 10, 40, 69, 70, 71, 99, 100, 120)
    ]  # fmt: skip


def advantage_cases() -> dict:
    """verl's GRPO pipeline on outcome rewards: ``apply_kl_penalty`` (k1, fixed coefficient) then
    ``compute_advantage(GRPO)`` (``ray_trainer.py``), on groups with a singleton and an all-equal one."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.trainer.ppo.core_algos import AdvantageEstimator, FixedKLController
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty, compute_advantage

    lengths = [3, 1, 4, 2, 5, 2, 3, 2]
    rewards = [1.0, -1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 2.0]
    groups = ["a", "a", "a", "b", "b", "c", "c", "d"]  # c: all equal; d: a group of one
    inputs = loss_inputs(7, lengths, [0.0] * len(lengths))
    mask = torch.tensor(inputs["response_mask"], dtype=torch.float64)
    scores = torch.zeros_like(mask)
    scores[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = torch.tensor(rewards, dtype=torch.float64)
    out = {"lengths": lengths, "rewards": rewards, "groups": groups, "old_log_prob": inputs["old_log_prob"],
           "ref_log_prob": inputs["ref_log_prob"]}  # fmt: skip
    for coef in (0.0, 1e-3):
        data = DataProto.from_dict(
            tensors={"response_mask": mask, "token_level_scores": scores,
                     "old_log_probs": torch.tensor(inputs["old_log_prob"], dtype=torch.float64),
                     "ref_log_prob": torch.tensor(inputs["ref_log_prob"], dtype=torch.float64)},
            non_tensors={"uid": np.array(groups, dtype=object)},
        )  # fmt: skip
        if coef:
            data, _ = apply_kl_penalty(data, FixedKLController(coef), kl_penalty="kl")
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]
        data = compute_advantage(data, AdvantageEstimator.GRPO)
        out[f"kl_coef_{coef}"] = {
            "token_level_rewards": data.batch["token_level_rewards"].tolist(),
            "advantages": data.batch["advantages"].tolist(),
        }
    return out


def algo_fixture(reference: Path) -> dict:
    inputs = loss_inputs(0, LOSS_LENGTHS, LOSS_ADVANTAGES)
    legacy_inputs = loss_inputs(1, LEGACY_LENGTHS, [1.1, -0.4, -0.9, 0.7, 0.3, 1.6, -1.2, 0.5])
    core = "verl/trainer/ppo/core_algos.py"
    functions = [f"{core}:{name}" for name in (
        "compute_sdpg_loss", "compute_policy_loss_vanilla", "compute_opsd_loss", "compute_rlsd_loss",
        "agg_loss", "_compute_effective_beta")] + [
        "verl/trainer/ppo/ray_trainer.py:apply_kl_penalty", "verl/trainer/ppo/ray_trainer.py:compute_advantage"]  # fmt: skip
    return {
        "provenance": provenance(reference, functions, "algo"),
        "note": "Inputs are padded [B, T] fp64 lists in verl's layout (advantages already times the mask). "
        "Every loss is the registered policy loss with loss_agg_mode=token-mean and the config in the case.",
        "inputs": inputs,
        "losses": loss_cases(inputs),
        "legacy_inputs": legacy_inputs,
        "legacy": legacy_cases(legacy_inputs),
        "agg_loss": agg_cases(inputs),
        "beta_schedule": schedule_cases(),
        "grpo_advantages": advantage_cases(),
    }


PROMPT_RECORDS = 16
PROMPT_LONG_ROW = 5  # its question is made far longer than the limit
PROMPT_MAX_LENGTH = 120  # tokens of the tiny tokenizer (sdpg_mcore.data.tiny_tokenizer, style qwen)
# (max_prompt_length, filter_overlong_prompts): the tests' limit both ways, and a limit its filter passes.
PROMPT_RUNS = [(PROMPT_MAX_LENGTH, True), (PROMPT_MAX_LENGTH, False), (160, True)]


def reference_strings(reference: Path) -> dict[str, str]:
    """The layout's strings as the reference has them: the sentinel and the two answer-format
    instructions from ``RLHFDataset`` (code), the teacher-context template from its README (no code of
    the reference writes it: its data files were made outside the repository)."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    readme = (reference / "README.md").read_text()
    template = readme.split("The teacher context format is:", 1)[1].split("```")[1].strip("\n")
    return {
        "sentinel": RLHFDataset.TEACHER_CONTEXT_TOKEN,
        "answer_colon_instruction": RLHFDataset._ANSWER_COLON_INSTRUCTION,
        "boxed_instruction": RLHFDataset._BOXED_INSTRUCTION,
        "context_template": template,
    }


def prompt_records(strings: dict[str, str]) -> list[dict]:
    """Rows of a parquet in the reference's teacher layout: arithmetic questions with the Answer:-line
    instruction, then the sentinel, a blank line and the context template with the answer."""
    import random

    rng = random.Random(0)
    records = []
    for i in range(PROMPT_RECORDS):
        a, b, op = rng.randrange(10), rng.randrange(10), rng.choice("+-")
        question = f"What is {a} {op} {b}?" + (" and 1" * 150 if i == PROMPT_LONG_ROW else "")
        answer = str(a + b if op == "+" else a - b)
        context = strings["context_template"].format(answer=answer)
        content = f"{question} {strings['answer_colon_instruction']}{strings['sentinel']}\n\n{context}"
        records.append({
            "data_source": "math_dapo", "prompt": [{"role": "user", "content": content}], "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"dapo-{i}"},
        })  # fmt: skip
    return records


def reference_dataset(
    records: list[dict], tokenizer, workdir: Path, limit: int, filter_overlong: bool
) -> dict:
    """``RLHFDataset`` on the records (``answer_format=boxed``): which rows it keeps, and for each its
    actor messages (``raw_prompt``) and its teacher prompt ids (left padding removed)."""
    import pandas as pd
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    workdir.mkdir(parents=True)
    path = workdir / "math-dapo-teacher.parquet"
    pd.DataFrame(records).to_parquet(path)
    config = OmegaConf.create({
        "max_prompt_length": limit, "filter_overlong_prompts": filter_overlong,
        "filter_overlong_prompts_workers": 1, "answer_format": "boxed", "truncation": "left",
        "apply_chat_template_kwargs": {"enable_thinking": True}, "cache_dir": str(workdir / "cache"),
    })  # fmt: skip
    dataset = RLHFDataset([str(path)], tokenizer, config)
    rows = []
    for i in range(len(dataset)):
        row = dataset[i]
        teacher_ids = row["teacher_input_ids"][row["teacher_attention_mask"].bool()].tolist()
        rows.append({"index": row["extra_info"]["index"], "raw_prompt": row["raw_prompt"],
                     "teacher_ids": teacher_ids, "teacher_text": tokenizer.decode(teacher_ids)})  # fmt: skip
    return {"max_prompt_length": limit, "filter_overlong_prompts": filter_overlong, "rows": rows}


def message_cases(strings: dict[str, str]) -> list[dict]:
    """``RLHFDataset._apply_answer_format`` then ``_split_teacher_context`` (the order ``__getitem__``
    uses) on message lists, in both answer formats: run on an instance built without ``__init__``
    (the two methods read only ``answer_format`` and the class's sentinel)."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    token, colon = strings["sentinel"], strings["answer_colon_instruction"]
    cases = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"A{token}B{token}C"},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": f"D{token}E"}],
        [{"role": "user", "content": f"Find x. {colon}{token}\n\nHint: {colon}"}],
        [{"role": "user", "content": f"Find x. {colon}"}, {"role": "user", "content": f"And y. {colon}{token}ctx"}],
        [{"role": "user", "content": "No context here."}],
        [{"role": "assistant", "content": f"x{token}y"}, {"role": "user", "content": f"q{token}c"}],
        [{"role": "user", "content": f"{token}only context"}],
    ]  # fmt: skip
    out = []
    for messages in cases:
        for answer_format in ("answer_colon", "boxed"):
            dataset = RLHFDataset.__new__(RLHFDataset)
            dataset.answer_format = answer_format
            actor, teacher = dataset._split_teacher_context(dataset._apply_answer_format(messages))
            out.append(
                {"messages": messages, "answer_format": answer_format, "actor": actor, "teacher": teacher}
            )
    return out


def data_fixture(reference: Path) -> dict:
    import tempfile

    from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer

    strings = reference_strings(reference)
    records = prompt_records(strings)
    tokenizer = build_tiny_tokenizer("qwen")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            reference_dataset(records, tokenizer, Path(tmp) / str(i), limit, filter_overlong)
            for i, (limit, filter_overlong) in enumerate(PROMPT_RUNS)
        ]
    functions = [
        "verl/utils/dataset/rl_dataset.py:RLHFDataset (__init__ with its overlong filter, __getitem__, "
        "_apply_answer_format, _split_teacher_context)",
        "verl/utils/dataset/rl_dataset.py:RLHFDataset.TEACHER_CONTEXT_TOKEN, _ANSWER_COLON_INSTRUCTION, "
        "_BOXED_INSTRUCTION",
        "README.md: the teacher context format",
    ]
    return {
        "provenance": provenance(reference, functions, "data"),
        "note": "records: the parquet rows given to RLHFDataset (answer_format=boxed, enable_thinking=True, the tiny qwen tokenizer built by "
        "sdpg_mcore.data.tiny_tokenizer); runs: what it returned for each max_prompt_length and "
        "filter_overlong_prompts.",
        "strings": strings,
        "max_prompt_length": PROMPT_MAX_LENGTH,
        "long_row": PROMPT_LONG_ROW,
        "records": records,
        "runs": runs,
        "messages": message_cases(strings),
    }


KL_VOCAB, KL_HIDDEN = 128, 16
KL_PROMPTS = {"student": [[0, 0, 5, 9, 17, 3], [0, 0, 0, 8, 8, 2], [11, 4, 19, 6, 7, 1]],
              "teacher": [[0, 5, 9, 17, 3, 40, 41, 42, 43], [0, 0, 0, 8, 8, 2, 44, 45, 46], [11, 4, 19, 6, 7, 1, 47, 48, 49]]}  # fmt: skip
KL_RESPONSES = [[21, 22, 23, 24, 25], [26, 27, 28, 0, 0], [29, 30, 31, 32, 0]]  # right-padded with 0


class FirstTokenLM:
    """A toy causal LM for the reference's KL code: ``hidden_t = sum of E[id_s]`` over the real
    tokens ``s <= t`` and ``logits = hidden @ W.T``, so a response position sees the whole prompt
    (the teacher's privileged context included). E and W hold multiples of 1/64: the fp32 sums are
    exact, so the hidden states the bf16 autocast rounds are known exactly."""

    @staticmethod
    def build(embed_int, head_int):
        import types

        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding.from_pretrained(embed_int.float() / 64, freeze=False)
                self.head = torch.nn.Linear(embed_int.shape[1], head_int.shape[0], bias=False)
                self.head.weight.data = head_int.float() / 64

            def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
                hidden = (self.embed(input_ids) * attention_mask[..., None]).cumsum(dim=1)
                return types.SimpleNamespace(logits=self.head(hidden))

        return Module()


def reference_kl(embed_int, head_int, temperature: float) -> dict:
    """``DataParallelPPOActor._compute_kl_distill_micro_batch`` (its default bf16 autocast) on the
    toy model, with the teacher inputs from its ``_build_teacher_inputs_for_sdpg``."""
    import torch
    import torch.distributed as dist
    from verl.workers.actor.dp_actor import DataParallelPPOActor
    from verl.workers.config import FSDPActorConfig

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=True, use_torch_compile=False)
    actor = DataParallelPPOActor(config, FirstTokenLM.build(embed_int, head_int))
    student, teacher = (torch.tensor(KL_PROMPTS[k]) for k in ("student", "teacher"))
    responses = torch.tensor(KL_RESPONSES)
    response_mask = (responses != 0).long()
    attention_mask = torch.cat([(student != 0).long(), response_mask], dim=1)
    actor_inputs = {
        "input_ids": torch.cat([student, responses], dim=1), "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0), "responses": responses,
        "response_mask": response_mask,
    }  # fmt: skip
    teacher_inputs = actor._build_teacher_inputs_for_sdpg(
        {"teacher_input_ids": teacher, "teacher_attention_mask": (teacher != 0).long(), **actor_inputs}
    )
    log_prob, kl, entropy = actor._compute_kl_distill_micro_batch(actor_inputs, teacher_inputs, temperature)
    return {"temperature": temperature, "dtype": str(kl.dtype), "kl": kl.float().tolist(),
            "log_prob": log_prob.float().tolist(), "entropy": entropy.float().tolist()}  # fmt: skip


def kl_fixture(reference: Path) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    embed_int = torch.randint(-24, 25, (KL_VOCAB, KL_HIDDEN), generator=gen)
    head_int = torch.randint(-48, 49, (KL_VOCAB, KL_HIDDEN), generator=gen)
    functions = ["verl/workers/actor/dp_actor.py:DataParallelPPOActor._compute_kl_distill_micro_batch",
                 "verl/workers/actor/dp_actor.py:DataParallelPPOActor._build_teacher_inputs_for_sdpg"]  # fmt: skip
    return {
        "provenance": provenance(reference, functions, "kl"),
        "note": "The toy model: hidden_t = sum of E[id_s] over the real (attention_mask 1) tokens s <= t, "
        "logits = hidden @ W.T, with E = embed_int / 64 and W = head_int / 64. Prompts left-padded with 0, responses "
        "right-padded with 0. Outputs are [B, response_length], zero past each response.",
        "embed_int": embed_int.tolist(),
        "head_int": head_int.tolist(),
        "prompts": KL_PROMPTS,
        "responses": KL_RESPONSES,
        "runs": [reference_kl(embed_int, head_int, t) for t in (1.0, 0.7)],
    }


SECTIONS = {
    "rewards": (reward_fixture, REPO / "tests" / "rewards" / "fixtures" / "reference_scores.json"),
    "algo": (algo_fixture, REPO / "tests" / "algo" / "fixtures" / "reference_losses.json"),
    "data": (data_fixture, REPO / "tests" / "data" / "fixtures" / "reference_prompts.json"),
    "kl": (kl_fixture, REPO / "tests" / "ops" / "fixtures" / "reference_kl.json"),
}


def to_json(value, indent: str = "") -> str:
    """JSON with one line per item of a list of records (small, and a regenerated fixture diffs by case)."""
    inner = indent + " "
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict | list) for v in value):
        items = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="git checkout of lauyikfung/SDPG")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="write only these")
    parser.add_argument("--cases", type=int, default=AGREEMENT_CASES, help="generated reward cases")
    parser.add_argument("--out", type=Path, default=None, help="write the one --only section here instead")
    args = parser.parse_args()
    sections = args.only or sorted(SECTIONS)
    if args.out is not None and len(sections) != 1:
        parser.error("--out needs exactly one --only section")
    reference = args.reference.resolve()
    sys.path.insert(0, str(reference))  # the reference's package `verl`, from the checkout
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "no prediction extracted" warnings
    for section in sections:
        build, path = SECTIONS[section]
        fixture = build(reference, args.cases) if section == "rewards" else build(reference)
        path = args.out or path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(fixture) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
