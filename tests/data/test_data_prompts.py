"""Student and teacher prompts from records: the split, chat templates, length policy and counts.

The split and the answer-format rewrite are checked against the reference's own ``RLHFDataset``
methods on the message lists of ``fixtures/reference_prompts.json`` (written by
``tests/make_reference_fixtures.py``); the rest against the chat template written out here.
"""

import json
from pathlib import Path

import pytest

from sdpg_mcore.data import (
    ANSWER_COLON_INSTRUCTION,
    REFERENCE_CONTEXT_TEMPLATE,
    TEACHER_CONTEXT_TOKEN,
    DataError,
    PromptConfig,
    apply_answer_format,
    build_prompt_samples,
)
from sdpg_mcore.data.prompts import shared_prefix_length
from sdpg_mcore.data.records import split_record
from sdpg_mcore.train.batch import Response, make_micro_batch

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference_prompts.json").read_text())

QUESTION = "What is 12 + 7? Put the final answer in \\boxed{}."
CONTEXT = "\n\n" + REFERENCE_CONTEXT_TEMPLATE.format(answer="19")


def record(question=QUESTION, context=CONTEXT, truth="19", sentinel=True, **extra):
    content = question + (TEACHER_CONTEXT_TOKEN + context if sentinel else "")
    rec = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": content}],
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"index": 7},
    }
    rec.update(extra)
    return rec


def template(tok, messages, **kwargs):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_student_never_sees_context_and_teacher_sees_question_then_context(tokenizer):
    (sample,), stats = build_prompt_samples([record()], tokenizer, PromptConfig())
    student_text = tokenizer.decode(sample.student_ids)
    teacher_text = tokenizer.decode(sample.teacher_ids)
    assert "correct answer" not in student_text and TEACHER_CONTEXT_TOKEN not in student_text
    assert TEACHER_CONTEXT_TOKEN not in teacher_text
    assert teacher_text.index(QUESTION) < teacher_text.index("The correct answer to this problem is: 19")
    # Exactly the chat template of the split messages, joined with no separator for the teacher.
    assert sample.student_ids == template(tokenizer, [{"role": "user", "content": QUESTION}])
    assert sample.teacher_ids == template(tokenizer, [{"role": "user", "content": QUESTION + CONTEXT}])
    assert (
        sample.ground_truth == "19"
        and sample.data_source == "math_dapo"
        and sample.extra_info == {"index": 7}
    )
    assert sample.has_teacher_context and stats.num_kept == 1 and stats.num_without_teacher_context == 0
    # Exactly one BOS for the llama style (the rendered template carries it already).
    if tokenizer.bos_token_id is not None:
        assert sample.student_ids.count(tokenizer.bos_token_id) == 1
        assert sample.teacher_ids.count(tokenizer.bos_token_id) == 1


def test_response_tokens_are_identical_in_student_and_teacher_sequences(tokenizer):
    (prompt,), _ = build_prompt_samples([record()], tokenizer, PromptConfig())
    response = tokenizer("12 + 7 = 19, so \\boxed{19}.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    rollout = Response(0, prompt.student_ids, prompt.teacher_ids, response, [0.0] * len(response))
    mb = make_micro_batch([rollout], [0], pad_id=0)
    # The positions each mask marks predict the response, token for token, in both sequences.
    for ids_BT, mask_BT in (
        (mb.input_ids_BT, mb.loss_mask_BT),
        (mb.teacher_input_ids_BT, mb.teacher_loss_mask_BT),
    ):
        predicted = ids_BT[0, 1:][mask_BT[0, :-1]]
        assert predicted.tolist() == response == mb.targets_N.tolist()
    # Both prompts end with the same generation prompt, so the response follows the same tokens.
    tail = template(tokenizer, [{"role": "user", "content": "x"}])[-3:]
    assert prompt.student_ids[-3:] == prompt.teacher_ids[-3:] == tail


@pytest.mark.parametrize(
    "case", REFERENCE["messages"], ids=lambda c: f"{c['answer_format']}-{len(c['messages'])}msg"
)
def test_split_and_answer_format_are_the_reference_s(case):
    """``split_record`` against ``RLHFDataset._apply_answer_format`` then ``_split_teacher_context``: the
    first message with the sentinel is split once (a later sentinel stays in the teacher's text);
    every message's first Answer:-line instruction is rewritten, also one after the sentinel."""
    rec = record()
    rec["prompt"] = case["messages"]
    has_context = case["teacher"] is not None
    fallback = "error" if has_context else "no_teacher_context"
    student, teacher, has = split_record(
        rec, "f", 0, answer_format=case["answer_format"], missing_sentinel=fallback
    )
    assert (student, has) == (case["actor"], has_context)
    assert teacher == (case["teacher"] if has_context else case["actor"])  # no context: the student's prompt


def test_split_uses_first_message_with_sentinel_and_keeps_the_others(qwen_tokenizer):
    (case,) = [c for c in REFERENCE["messages"] if len(c["messages"]) == 4 and c["answer_format"] == "boxed"]
    rec = record()
    rec["prompt"] = case["messages"]
    (sample,), _ = build_prompt_samples([rec], qwen_tokenizer, PromptConfig(system_prompt="ignored: has one"))
    assert (
        case["actor"][1]["content"] == "A"
        and case["teacher"][1]["content"] == "AB" + TEACHER_CONTEXT_TOKEN + "C"
    )
    assert sample.student_ids == template(qwen_tokenizer, case["actor"])
    assert sample.teacher_ids == template(qwen_tokenizer, case["teacher"])


def test_system_prompt_and_template_kwargs_reach_both_prompts(qwen_tokenizer):
    config = PromptConfig(system_prompt="Think.", chat_template_kwargs={"enable_thinking": False})
    (sample,), _ = build_prompt_samples([record()], qwen_tokenizer, config)
    system = {"role": "system", "content": "Think."}
    kwargs = {"enable_thinking": False}
    assert sample.student_ids == template(
        qwen_tokenizer, [system, {"role": "user", "content": QUESTION}], **kwargs
    )
    assert sample.teacher_ids == template(
        qwen_tokenizer, [system, {"role": "user", "content": QUESTION + CONTEXT}], **kwargs
    )
    assert qwen_tokenizer.decode(sample.student_ids).endswith("<think>\n\n</think>\n\n")


def lengths_of(tokenizer, records):
    student = [len(template(tokenizer, [{"role": "user", "content": r["question"]}])) for r in records]
    teacher = [
        len(template(tokenizer, [{"role": "user", "content": r["question"] + CONTEXT}])) for r in records
    ]
    return student, teacher


@pytest.fixture
def mixed_records():
    questions = ["What is 1 + 1?", "What is 12 + 7 * 3?" + " and 5" * 10, "What is 3 * 4?" + " then 2" * 25]
    return [dict(record(question=q), question=q) for q in questions]


def test_filter_drops_prompts_over_either_limit_and_counts_them(qwen_tokenizer, mixed_records):
    student, teacher = lengths_of(qwen_tokenizer, mixed_records)
    limit = sorted(teacher)[1]  # the longest teacher prompt is over the limit, the middle one is not
    config = PromptConfig(max_prompt_length=limit, overlong="filter")
    samples, stats = build_prompt_samples(mixed_records, qwen_tokenizer, config)
    expected_kept = [i for i in range(3) if student[i] <= limit and teacher[i] <= limit]
    assert [s.index for s in samples] == expected_kept
    assert stats.num_records == 3 and stats.num_filtered == 3 - len(expected_kept) == 1
    assert stats.num_student_truncated == stats.num_teacher_truncated == 0
    assert stats.max_teacher_length == max(teacher[i] for i in expected_kept)


@pytest.mark.parametrize("tok_name", ["qwen", "llama"])
def test_truncate_never_cuts_the_teacher_context_or_the_assistant_header(request, tok_name, mixed_records):
    tok = request.getfixturevalue(f"{tok_name}_tokenizer")
    student, teacher = lengths_of(tok, mixed_records)
    limit = sorted(student)[1]
    samples, stats = build_prompt_samples(
        mixed_records, tok, PromptConfig(max_prompt_length=limit, overlong="truncate")
    )
    assert len(samples) == 3 and stats.num_filtered == 0
    assert stats.num_student_truncated == sum(n > limit for n in student) == 1
    assert stats.num_teacher_truncated == sum(n > limit for n in teacher) >= 1
    with_x, with_y = (template(tok, [{"role": "user", "content": c}]) for c in ("x", "y"))
    header = with_x[-shared_prefix_length(with_x[::-1], with_y[::-1]) :]  # end of turn + assistant header
    assert len(header) >= 2
    for rec, sample in zip(mixed_records, samples):
        full_s = template(tok, [{"role": "user", "content": rec["question"]}])
        full_t = template(tok, [{"role": "user", "content": rec["question"] + CONTEXT}])
        assert (
            sample.student_ids == full_s[-limit:]
        )  # from the left (the reference scripts' truncation='left')
        assert len(sample.student_ids) <= limit and len(sample.teacher_ids) <= limit
        # The teacher keeps its own part (context + assistant header) whole and a suffix of the question.
        own = len(full_t) - shared_prefix_length(full_s, full_t)
        assert sample.teacher_ids[-own:] == full_t[-own:]
        assert sample.teacher_ids == full_t[-len(sample.teacher_ids) :] or len(full_t) <= limit
        assert tok.decode(sample.teacher_ids).count("The correct answer to this problem is: 19") == 1
        assert sample.teacher_ids[-len(header) :] == header and sample.student_ids[-len(header) :] == header


def test_truncate_drops_a_prompt_whose_teacher_context_alone_is_over_the_limit(qwen_tokenizer):
    long_context = "\n\n" + REFERENCE_CONTEXT_TEMPLATE.format(answer="19 " * 200)
    records = [record(), record(context=long_context)]
    limit = len(template(qwen_tokenizer, [{"role": "user", "content": QUESTION + CONTEXT}]))
    samples, stats = build_prompt_samples(
        records, qwen_tokenizer, PromptConfig(max_prompt_length=limit, overlong="truncate")
    )
    assert [s.index for s in samples] == [0] and stats.num_filtered == 1


def test_answer_format_boxed_rewrites_the_reference_instruction(qwen_tokenizer):
    question = "Find x. " + ANSWER_COLON_INSTRUCTION
    (colon,), _ = build_prompt_samples([record(question=question)], qwen_tokenizer, PromptConfig())
    (boxed,), _ = build_prompt_samples(
        [record(question=question)], qwen_tokenizer, PromptConfig(answer_format="boxed")
    )
    assert "Answer: $Answer" in qwen_tokenizer.decode(colon.student_ids)
    for ids in (boxed.student_ids, boxed.teacher_ids):
        text = qwen_tokenizer.decode(ids)
        assert "Answer: $Answer" not in text and "inside \\boxed{}, for example \\boxed{42}." in text
    assert "correct answer to this problem is: 19" in qwen_tokenizer.decode(boxed.teacher_ids)
    messages, changed = apply_answer_format([{"role": "user", "content": QUESTION}], "boxed")
    assert not changed and messages[0]["content"] == QUESTION
    with pytest.raises(ValueError, match="answer_format='latex'"):
        build_prompt_samples([record()], qwen_tokenizer, PromptConfig(answer_format="latex"))


def test_separate_teacher_limit(qwen_tokenizer, mixed_records):
    student, teacher = lengths_of(qwen_tokenizer, mixed_records)
    config = PromptConfig(max_prompt_length=max(student), max_teacher_prompt_length=max(teacher))
    samples, stats = build_prompt_samples(mixed_records, qwen_tokenizer, config)
    assert len(samples) == 3 and stats.num_filtered == 0


def test_overlong_error_names_record(qwen_tokenizer, mixed_records):
    student, teacher = lengths_of(qwen_tokenizer, mixed_records)
    limit = max(teacher[:2])
    assert student[2] > limit
    with pytest.raises(
        DataError, match=r"train.parquet, record 2, field 'prompt': student prompt has \d+ tokens"
    ):
        build_prompt_samples(
            mixed_records,
            qwen_tokenizer,
            PromptConfig(max_prompt_length=limit, overlong="error"),
            "train.parquet",
        )


def test_missing_sentinel_errors_or_falls_back(qwen_tokenizer):
    records = [record(), record(sentinel=False)]
    with pytest.raises(
        DataError, match=r"d.jsonl, record 1, field 'prompt': no message contains the sentinel"
    ):
        build_prompt_samples(records, qwen_tokenizer, PromptConfig(), "d.jsonl")
    samples, stats = build_prompt_samples(
        records, qwen_tokenizer, PromptConfig(missing_sentinel="no_teacher_context")
    )
    assert samples[1].teacher_ids == samples[1].student_ids and not samples[1].has_teacher_context
    assert samples[0].teacher_ids != samples[0].student_ids
    assert stats.num_without_teacher_context == 1


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ({"reward_model": {"ground_truth": "  "}}, "reward_model.ground_truth", "empty"),
        ({"reward_model": {"style": "rule"}}, "reward_model.ground_truth", "missing"),
        ({"reward_model": None}, "reward_model.ground_truth", "missing"),
        ({"prompt": []}, "prompt", "non-empty list"),
        ({"prompt": [{"content": "x"}]}, r"prompt\[0\]", "role"),
        ({"prompt": [{"role": "user", "content": 3}]}, r"prompt\[0\].content", "string"),
        ({"data_source": None}, "data_source", "missing"),
        ({"extra_info": [1]}, "extra_info", "dict"),
    ],
)
def test_bad_records_name_file_record_and_field(qwen_tokenizer, bad, field, problem):
    records = [record(), record(), dict(record(), **bad)]
    with pytest.raises(DataError, match=rf"f.parquet, record 2, field '{field}': .*{problem}"):
        build_prompt_samples(records, qwen_tokenizer, PromptConfig(), "f.parquet")


def test_numeric_ground_truth_and_plain_string_prompt(qwen_tokenizer):
    rec = dict(record(), prompt="Q?" + TEACHER_CONTEXT_TOKEN + " ctx", reward_model={"ground_truth": 42})
    (sample,), _ = build_prompt_samples([rec], qwen_tokenizer, PromptConfig())
    assert sample.ground_truth == "42"
    assert sample.student_ids == template(qwen_tokenizer, [{"role": "user", "content": "Q?"}])


def test_invalid_config_is_rejected(qwen_tokenizer):
    with pytest.raises(ValueError, match="overlong='drop'"):
        build_prompt_samples([record()], qwen_tokenizer, PromptConfig(overlong="drop"))
    with pytest.raises(ValueError, match="missing_sentinel='skip'"):
        build_prompt_samples([record()], qwen_tokenizer, PromptConfig(missing_sentinel="skip"))


def test_default_policy_drops_overlong_prompts():
    assert PromptConfig().overlong == "filter"


def test_prompt_key_and_plain_rendering_without_chat_template(llama_tokenizer):
    rec = record()
    rec["messages"] = rec.pop("prompt")
    config = PromptConfig(prompt_key="messages", apply_chat_template=False)
    (sample,), _ = build_prompt_samples([rec], llama_tokenizer, config)
    assert sample.student_ids == llama_tokenizer(QUESTION)["input_ids"]  # one BOS from the tokenizer
    assert sample.teacher_ids == llama_tokenizer(QUESTION + CONTEXT)["input_ids"]
    with pytest.raises(DataError, match="record 0, field 'messages'"):
        build_prompt_samples([dict(rec, messages=[])], llama_tokenizer, config)
