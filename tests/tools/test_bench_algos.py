"""tools/bench_algos.py: the task files load as SDPG prompts, and the summary is the seeds' mean ± std."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import bench_algos  # noqa: E402


def test_task_records_split_into_student_and_teacher_prompts(tmp_path):
    from sdpg_mcore.data import PromptConfig, load_prompt_dataset
    from sdpg_mcore.data.tiny_tokenizer import build_tiny_tokenizer

    paths = bench_algos.write_task(tmp_path, num_train=20, num_heldout=6, max_operand=4)
    tok = build_tiny_tokenizer("qwen")
    data = load_prompt_dataset([str(paths["heldout"])], tok, PromptConfig(max_prompt_length=96))
    assert len(data) == 6
    for i in range(len(data)):
        p = data.batch([i])[0]
        question, answer = p.extra_info["question"], p.extra_info["answer"]
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert 0 <= int(a) <= 4 and 0 <= int(b) <= 4
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert p.ground_truth == answer
        assert p.extra_info["reference_response"].endswith(f"\\boxed{{{answer}}}.")
        student, teacher = tok.decode(p.student_ids), tok.decode(p.teacher_ids)
        assert f"The correct answer to this problem is: {answer}" in teacher
        assert "correct answer" not in student and teacher.startswith(student.split("<|im_end|>")[0])
    train = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    held = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    assert len(train) == 20 and [r["extra_info"]["question"] for r in train[:6]] != [
        r["extra_info"]["question"] for r in held
    ]


def _fake_run(out, algo, seed, accs, interval=5):
    rdir = bench_algos.run_dir(out, algo, seed)
    rdir.mkdir(parents=True)
    rows = []
    for i, acc in enumerate(accs):
        step = (i + 1) * interval
        rows.append({"step": step - 1, "acc": 0.1})
        rows.append(
            {
                "step": step,
                "acc": 0.1,
                "eval/heldout/avg@8": acc,
                "mech/heldout/teacher_acc": 0.9,
                "mech/heldout/kl_correct": 0.5 + seed,
            }
        )
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    finals = {"sdpg": [0.5, 0.7, 0.6], "grpo": [0.2, 0.1, 0.3]}
    for algo, accs in finals.items():
        for seed, final in enumerate(accs):
            _fake_run(tmp_path, algo, seed, [0.1, 0.05 * seed, final])
    summary = bench_algos.summarize(tmp_path, ["sdpg", "grpo"], [0, 1, 2], k=8)
    for algo, accs in finals.items():
        e = summary[algo]
        assert e["final_acc"] == accs
        assert e["final_acc_mean"] == pytest.approx(statistics.mean(accs))
        assert e["final_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert e["final_kl_correct_mean"] == pytest.approx(1.5)
        assert math.isnan(e["final_kl_incorrect_mean"])  # never logged
        assert e["seeds"]["2"]["curve"]["step"] == [5, 10, 15]
        assert e["seeds"]["2"]["curve"]["acc"] == [0.1, 0.1, accs[2]]
    g = bench_algos.goal(summary)
    assert g["sdpg_minus_grpo"] == pytest.approx(0.4) and g["sdpg_worst_seed"] == 0.5 and g["met"]
    table = bench_algos.table(summary, 3)
    assert "| sdpg | 0.600 ± 0.100 |" in table and "| grpo | 0.200 ± 0.100 |" in table
    bench_algos.plot(summary, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_end_to_end_two_algorithms(tmp_path):
    """The real thing, tiny: warm start, two trainer runs with the probe, JSON with final_acc per seed."""
    import subprocess

    out = tmp_path / "b"
    cmd = [sys.executable, str(REPO / "tools" / "bench_algos.py"), "--out", str(out), "--algos", "sdpg,grpo"]
    cmd += ["--seeds", "0", "--steps", "2", "--sft-steps", "20", "--num-heldout", "4", "eval.interval=2"]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900, capture_output=True)
    result = json.loads((out / "bench.json").read_text())
    for algo in ("sdpg", "grpo"):
        e = result["algos"][algo]
        assert len(e["final_acc"]) == 1 and 0.0 <= e["final_acc"][0] <= 1.0
        curve = e["seeds"]["0"]["curve"]
        assert curve["step"] == [2]
        assert 0.0 <= curve["teacher_acc"][0] <= 1.0 and curve["teacher_logp_ref"][0] < 0
        assert -1.0 <= curve["kl_grad_cos_student"][0] <= 1.0
    assert result["cpu_s"] > 0 and (out / "bench.png").exists()
