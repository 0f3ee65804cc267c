"""The planner's figures that the documents repeat equal what the documented commands print now.

Each row of ``FIGURES`` is (document, text with ``{}`` where the figures stand, the command that
produces them, a function of its JSON giving them as the document rounds them). The text around the
``{}`` is the anchor: it must occur in the document (whitespace-insensitive), and at every occurrence
the figures must read exactly as the function gives them. The commands are those the documents
show (``tools/plan.py ... --json``), each run once: the planner is arithmetic, about a second each.
``test_a_changed_figure_fails`` alters each figure in turn and expects the check to catch it.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdpg_mcore.plan.workload import FUSED_HEAD_BYTES

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
R70, RQWEN = "examples/llama3_70b/recipe.yaml", "examples/qwen3_4b/recipe.yaml"
H100_80 = "--gpus-per-node 8 --gpu-mem-gb 80"
SCALE = "--scale 64,128,256,512,1024"
COMMANDS = {
    "70b 4 nodes": f"--config {R70} --nodes 4 {H100_80} --time",
    "70b 4 nodes, no recompute": f"--config {R70} --nodes 4 {H100_80} --recompute none",
    "70b 4 nodes, no recompute, host": f"--config {R70} --nodes 4 {H100_80} --recompute none --teacher-states host",
    "70b 4 nodes, host": f"--config {R70} --nodes 4 {H100_80} --teacher-states host",
    "70b 8 nodes": f"--config {R70} --nodes 8 {H100_80} --time --search",
    "70b 8 nodes, torch head": f"--config {R70} --nodes 8 {H100_80} --time --logprob-backend torch",
    "70b scale TP8 PP2": f"--config {R70} --nodes 8 --tp 8 --pp 2 {SCALE}",
    "70b scale": f"--config {R70} --nodes 8 {SCALE}",
    "qwen3-4b colocated": f"--config {RQWEN} --nodes 1 {H100_80} --rollout colocated",
    "validate": "--validate",
}
"""``tools/plan.py`` arguments (without ``--json``) of the commands the documents show."""


@functools.cache
def plan(command: str) -> dict:
    """The JSON of ``tools/plan.py`` for ``COMMANDS[command]`` (exit 1, does not fit, is a result too)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        proc = subprocess.run(
            [sys.executable, "tools/plan.py", *COMMANDS[command].split(), "--json", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        return json.loads(out.read_text())


def gib(plan_json: dict, component: str, digits: int = 1) -> str:
    return f"{plan_json['per_gpu_bytes'][component] / GIB:.{digits}f}"


def pct(x: float, digits: int = 0) -> str:
    """``-0.218`` -> ``−22`` (the documents' minus sign; ``0`` for what rounds to zero)."""
    text = f"{100 * x:.{digits}f}"
    return "0" if float(text) == 0 else text.replace("-", "−")


def layout(entry: dict) -> str:
    lay = entry["layout"]
    return f"TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']}"


def phases(p: dict) -> dict:
    return p["time"]["phases"]


def memory_70b(p: dict) -> tuple:
    parts = (
        "parameters",
        "gradients",
        "optimizer_states",
        "activations",
        "kl_head",
        "teacher",
        "teacher_states",
    )
    return (gib(p, "total"), *(gib(p, c) for c in parts), gib(p, "overhead", 0))


def step_70b(p: dict) -> tuple:
    t, ph = p["time"], phases(p)
    d, gen = t["details"], t["generation"]
    s1 = lambda x: f"{x:.1f}"  # noqa: E731
    return (
        f"{t['total_s']:.0f}", f"{t['tokens_per_s_per_gpu']:.0f}", s1(ph["generation"]),
        f"{ph['generation'] / t['total_s']:.0%}".replace("%", ""), f"{gen['sequences_per_engine']:.0f}",
        f"{gen['longest_response_tokens']:,.0f}", s1(ph["old_logprob"]), s1(ph["ref_logprob"]),
        s1(d["reference_swap"]), s1(ph["teacher"]), s1(ph["train"]), s1(d["tp_comm"]),
        s1(d["pipeline_bubble"]), s1(d["lm_head"]), s1(ph["optimizer"]), s1(ph["weight_sync"]),
    )  # fmt: skip


def search_70b(p: dict) -> tuple:
    ranked = p["search"]
    planned = next(i for i, e in enumerate(ranked) if layout(e) == "TP8 PP2 CP1 DP4")
    return (
        str(len(ranked)), layout(ranked[0]), layout(ranked[1]), layout(ranked[2]),
        f"{ranked[0]['total_s']:.0f}", f"{ranked[2]['total_s']:.0f}",
        f"{100 * (ranked[2]['total_s'] / ranked[0]['total_s'] - 1):.1f}", str(planned + 1),
        f"{ranked[planned]['total_s']:.0f}", f"{ranked[planned]['details']['tp_comm'] - ranked[0]['details']['tp_comm']:.1f}",
        f"{ranked[0]['details']['lm_head']:.1f}", f"{ranked[planned]['details']['lm_head']:.1f}",
    )  # fmt: skip


def trainer_passes(entry: dict) -> float:
    return sum(s for name, s in entry["phases"].items() if name not in ("generation", "weight_sync"))


def scaling_row(gpus: int) -> Callable[[dict], tuple]:
    def row(p: dict) -> tuple:
        base, e = p["scaling"][0], next(e for e in p["scaling"] if e["gpus"] == gpus)
        speedup = base["total_s"] / e["total_s"]
        d, ph = e["details"], e["phases"]
        return (
            f"{e['trainer_nodes']} + {e['rollout_nodes']}", layout(e), f"{e['total_s']:.0f}",
            f"{speedup:.2f}x ({speedup * base['gpus'] / gpus:.0%})", f"{ph['generation']:.0f}",
            f"{trainer_passes(e):.0f}", f"{d['pipeline_bubble']:.1f}", f"{d['tp_comm']:.1f}",
            f"{d['dp_comm']:.1f}", f"{ph['weight_sync']:.1f}",
        )  # fmt: skip

    return row


def scaling_limits(p: dict) -> tuple:
    first, last = p["scaling"][0], p["scaling"][-1]
    gen = last["generation"]
    return (
        f"{last['phases']['generation']:.0f}", f"{gen['longest_response_tokens']:,.0f}",
        f"{1000 * gen['decode_s'] / gen['longest_response_tokens']:.0f}",
        f"{100 * first['details']['pipeline_bubble'] / trainer_passes(first):.0f}",
        f"{100 * last['details']['pipeline_bubble'] / trainer_passes(last):.0f}",
        f"{last['phases']['weight_sync']:.1f}", f"{100 * last['phases']['weight_sync'] / last['total_s']:.1f}",
        f"{max(e['details']['dp_comm'] for e in p['scaling']):.1f}",
    )  # fmt: skip


def head_bytes(backend: str) -> tuple[str, str]:
    """The train pass's bytes per pair with a teacher, and a log-prob pass's."""
    head = FUSED_HEAD_BYTES[backend]
    return f"{head.train + head.teacher:g}", f"{head.logprob:g}"


def validation(p: dict) -> dict:
    return {row["run"]: row for row in p["validation"]}


def validate_span(p: dict, upper_digits: int) -> tuple:
    errors = [row["total_error"] for row in p["validation"] if row["checked"]]
    return pct(min(errors)), pct(max(errors), upper_digits)


def phase_span_70b(p: dict) -> tuple:
    errors = [e for _, _, e in validation(p)["nemo_rl_v0.3_llama3.1_70b"]["phases"].values()]
    return pct(min(errors)), pct(max(errors))


def run_total(run: str, digits: int) -> Callable[[dict], tuple]:
    def total(p: dict) -> tuple:
        row = validation(p)[run]
        predicted, published = row["total_s"]
        return f"{predicted:.1f}", f"{published:.1f}", pct(row["total_error"], digits)

    return total


def phase_errors(run: str, names: tuple[str, ...]) -> Callable[[dict], tuple]:
    return lambda p: tuple(pct(validation(p)[run]["phases"][name][2]) for name in names)


@dataclass(frozen=True)
class Figure:
    doc: str
    text: str
    """The document's words with ``{}`` for each figure."""
    command: str | None
    """A key of ``COMMANDS``; None: ``value`` takes nothing (a constant of the package)."""
    value: Callable[..., tuple]

    def pattern(self) -> re.Pattern:
        return re.compile(
            "(.+?)".join(re.escape(re.sub(r"\s+", " ", part)) for part in self.text.split("{}"))
        )

    def expected(self) -> tuple[str, ...]:
        out = self.value(plan(self.command)) if self.command else self.value()
        return out if isinstance(out, tuple) else (out,)


L70, Q4, PLAN, TOOLS, TOP = (
    "examples/llama3_70b/README.md", "examples/qwen3_4b/README.md", "sdpg_mcore/plan/README.md",
    "tools/README.md", "README.md",
)  # fmt: skip
V05_ON, V05_OFF = "nemo_rl_v0.5_llama3.1_8b_on_policy", "nemo_rl_v0.5_llama3.1_8b_one_step_off"
V03_70, V03_70_RERUN, V03_8 = (
    "nemo_rl_v0.3_llama3.1_70b",
    "nemo_rl_v0.3_llama3.1_70b_rerun",
    "nemo_rl_v0.3_llama3.1_8b",
)
FIGURES = [
    # Llama-3.3-70B: parameters, memory on 4 nodes (TP8 PP2 DP2), its variants
    Figure(L70, "config ({} parameters; {} in Megatron with the vocabulary padded to {} at TP8)", "70b 4 nodes",
           lambda p: (f"{p['num_parameters']:,}", f"{p['num_parameters_megatron']:,}", f"{p['padded_vocab_size']:,}")),
    Figure(L70, "→ {} GiB per GPU (weights {}, fp32 grads {}, optimizer states {} sharded over DP2, activations {} "
           "with full recompute, KL head {}, teacher {}, teacher states {}, overhead {})", "70b 4 nodes", memory_70b),
    Figure(L70, "Without recompute the same layout needs {} GiB (activations {} GiB) and does not fit",
           "70b 4 nodes, no recompute", lambda p: (gib(p, "total"), gib(p, "activations", 0))),
    Figure(L70, "does not fit ({} GiB with `trainer.teacher_states=host`: no margin)",
           "70b 4 nodes, no recompute, host", lambda p: gib(p, "total")),
    Figure(L70, "teacher states of the rank's 64 responses ({} GiB,", "70b 4 nodes",
           lambda p: gib(p, "teacher_states", 0)),
    Figure(L70, "one micro-batch's on the GPU (peak {} GiB) and the rest in {} GiB of pinned host RAM per GPU of the "
           "last pipeline stage ({} GiB per node)", "70b 4 nodes, host",
           lambda p: (gib(p, "total"), gib(p, "teacher_states_host", 0),
                      f"{8 * p['per_gpu_bytes']['teacher_states_host'] / GIB:.0f}")),
    # its step time
    Figure(L70, "mean prompt {} tokens, mean response {} (a third", "70b 8 nodes",
           lambda p: (f"{p['time']['assumed']['mean_prompt_len']:.0f}", f"{p['time']['assumed']['mean_response_len']:,.0f}")),
    Figure(L70, "H100: **{} s per step**, {} tokens/s/GPU: generation {} s ({} %; two engines hold ~{} of their 512 "
           "sequences in KV cache, and the step waits for its longest response, {} tokens), old/ref log-probs {} + {} s "
           "(the reference swap {} s of it), teacher pass {} s, train pass {} s (tensor-parallel "
           "all-gathers/reduce-scatters {} s of all passes, pipeline bubble {} s, LM head {} s), optimizer {} s, "
           "weight sync {} s", "70b 8 nodes", step_70b),
    Figure(L70, "The recipe's default 4 + 2 nodes: {} s.", "70b 4 nodes", lambda p: f"{p['time']['total_s']:.0f}"),
    Figure(L70, "runs on a GPU ({} B per (token, vocabulary) pair in training, {} B in a log-prob pass", None,
           lambda: head_bytes("triton")),
    Figure(L70, "with `--logprob-backend torch` ({} and {} B) it takes {} s and the step {} s.", "70b 8 nodes, torch head",
           lambda p: (*head_bytes("torch"), f"{p['time']['details']['lm_head']:.1f}", f"{p['time']['total_s']:.0f}")),
    Figure(L70, "`--time --search` ranks the {} layouts that fit on 8 nodes: the fastest ones ({}, {}, {}: {}–{} s) are "
           "within {} % of each other — less than the model's error, so measure before switching — and beat the "
           "recipe's TP8 PP2 (#{}, {} s) by avoiding most of its exposed tensor-parallel traffic (−{} s), at the price "
           "of a larger LM head per GPU ({} s at TP1 against {} s).", "70b 8 nodes", search_70b),
    *(Figure(L70, f"| {g:,} |" + " {} |" * 10, "70b scale TP8 PP2", scaling_row(g)) for g in (64, 128, 256, 512, 1024)),
    Figure(L70, "**Generation** flattens at ~{} s: {} decode iterations (the longest response of 1,024) at ~{} ms each",
           "70b scale TP8 PP2", lambda p: scaling_limits(p)[:3]),
    Figure(L70, "so its share grows from {} % to {} % of the trainer's time at DP16", "70b scale TP8 PP2",
           lambda p: scaling_limits(p)[3:5]),
    Figure(L70, "**Weight sync**: {} s at every size (each engine GPU receives the whole model); {} % of the step at "
           "1,024 GPUs", "70b scale TP8 PP2", lambda p: scaling_limits(p)[5:7]),
    Figure(L70, "`overlap_grad_reduce` / `overlap_param_gather` (≤ {} s exposed)", "70b scale TP8 PP2",
           lambda p: scaling_limits(p)[7]),
    Figure(L70, "CP-heavy layouts win on paper: {} s at 64 GPUs, {} s at 1,024", "70b scale",
           lambda p: (f"{p['scaling'][0]['total_s']:.0f}", f"{p['scaling'][-1]['total_s']:.0f}")),
    Figure(L70, "`python tools/plan.py --validate`: totals within {} %…{} %, the Llama-3.1-70B phases within {} %…{} %)",
           "validate", lambda p: (*validate_span(p, 0), *phase_span_70b(p))),
    # the 70B recipe's teacher states, where the trainer's options are documented
    Figure("sdpg_mcore/config.py", "on the GPU ({} GiB/GPU for the 70B recipe, which fits: {} of 80 GiB, so no copies",
           "70b 4 nodes", lambda p: (gib(p, "teacher_states", 0), gib(p, "total"))),
    Figure("sdpg_mcore/train/teacher_states.py", "the whole mini-batch's share of the last stage at once ({} GiB per "
           "GPU on the 70B recipe", "70b 4 nodes", lambda p: gib(p, "teacher_states", 0)),
    # Qwen3-4B, colocated on one node
    Figure(Q4, "gives {} and a peak of ≈ {} GiB per GPU in the training turn (bf16 weights {}, fp32 grads {}, "
           "distributed-optimizer states {}, activations {} without recompute, fused KL head {}, teacher {}, teacher "
           "states {}, overhead {}, and 2 for the released SGLang engines' CUDA context)", "qwen3-4b colocated",
           lambda p: (layout(p).replace(" ", " × "), f"{p['per_gpu_bytes']['phase_peaks']['training'] / GIB:.0f}",
                      *(gib(p, c) for c in ("parameters", "gradients", "optimizer_states", "activations", "kl_head",
                                            "teacher", "teacher_states")),
                      gib(p, "overhead", 0))),
    Figure(Q4, "the weight push {} (trainer weights + engine weights), generation {} (engine weights {} + a "
           "16-sequence KV cache {})", "qwen3-4b colocated",
           lambda p: (*(f"{p['per_gpu_bytes']['phase_peaks'][k] / GIB:.1f}" for k in ("weight_push", "generation")),
                      gib(p, "rollout_weights"), gib(p, "rollout_kv_cache"))),
    # the model against the published runs
    Figure(TOP, "| step-time model vs published runs (`tools/plan.py --validate`) | totals within {} % … {} % |",
           "validate", lambda p: validate_span(p, 1)),
    Figure(TOOLS, "totals: Llama-3.1-8B on-policy {} vs {} s ({} %), one-step off-policy {} vs {} s ({} %), "
           "Llama-3.1-70B {} vs {} s ({} %); 70B phases: generation {} %, log-probs {} %, training {} %, weight refit {} %",
           "validate", lambda p: (*run_total(V05_ON, 0)(p), *run_total(V05_OFF, 1)(p), *run_total(V03_70, 0)(p),
                                  *phase_errors(V03_70, ("generation", "logprobs", "training", "refit"))(p))),
    Figure(PLAN, "| v0.5 Llama-3.1-8B GRPO on-policy | {} vs {} s ({} %) |", "validate", run_total(V05_ON, 1)),
    Figure(PLAN, "| v0.5 Llama-3.1-8B one step off-policy | {} vs {} s ({} %) |", "validate", run_total(V05_OFF, 1)),
    Figure(PLAN, "| v0.3 Llama-3.1-70B | {} vs {} s ({} %) | training {} %, refit {} %, log-probs {} %, generation {} % |",
           "validate", lambda p: (*run_total(V03_70, 1)(p),
                                  *phase_errors(V03_70, ("training", "refit", "logprobs", "generation"))(p))),
    Figure(PLAN, "| v0.3 Llama-3.1-70B, a user's rerun (not asserted) | {} vs {} s ({} %) | refit {} %, training {} % |",
           "validate", lambda p: (*run_total(V03_70_RERUN, 1)(p), *phase_errors(V03_70_RERUN, ("refit", "training"))(p))),
    Figure(PLAN, "| v0.3 Llama-3.1-8B | {} vs {} s ({} %) | generation {} %, training {} % |", "validate",
           lambda p: (*run_total(V03_8, 1)(p), *phase_errors(V03_8, ("generation", "training"))(p))),
    # the step-time model's LM-head constants
    Figure(PLAN, "| head bytes per (token, vocab) pair | triton: {} + {} = {} (train + teacher), {} (log-prob); "
           "torch: {} + {} = {}, {} |", None,
           lambda: tuple(f"{x:g}" for b in ("triton", "torch") for x in (
               FUSED_HEAD_BYTES[b].train, FUSED_HEAD_BYTES[b].teacher,
               FUSED_HEAD_BYTES[b].train + FUSED_HEAD_BYTES[b].teacher, FUSED_HEAD_BYTES[b].logprob))),
]  # fmt: skip


def normalised(text: str) -> str:
    """Whitespace runs as one space: figures wrap across lines."""
    return " ".join(text.split())


def mismatches(figure: Figure, text: str) -> list[str]:
    """What in ``text`` (the document) disagrees with ``figure``; empty when every occurrence agrees."""
    expected = figure.expected()
    found = list(figure.pattern().finditer(normalised(text)))
    if not found:
        return [f"{figure.doc}: no text matching {figure.text!r} (expected figures {expected})"]
    return [
        f"{figure.doc}: {figure.text!r} reads {m.groups()}, the planner gives {expected}"
        for m in found
        if m.groups() != expected
    ]


def _name(figure: Figure) -> str:
    return f"{figure.doc}:{' '.join(figure.text.split()[:6])}"


@pytest.mark.parametrize("figure", FIGURES, ids=_name)
def test_the_document_states_what_the_planner_gives(figure):
    assert not mismatches(figure, (REPO / figure.doc).read_text())


@pytest.mark.parametrize("figure", FIGURES, ids=_name)
def test_a_changed_figure_fails(figure):
    """Each figure in turn, one digit changed in the document's text: the check names it."""
    text = normalised((REPO / figure.doc).read_text())
    for group in range(1, len(figure.expected()) + 1):
        m = figure.pattern().search(text)
        digit = re.search(r"\d", m.group(group))
        assert digit, f"figure {group} of {figure.text!r} holds no digit: {m.group(group)!r}"
        at = m.start(group) + digit.start()
        changed = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :]
        assert mismatches(figure, changed), f"figure {group} of {figure.text!r} changed and still passes"
