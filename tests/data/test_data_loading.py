"""Record files: parquet, JSON-lines, JSON, saved dataset directories; errors name file, record, field."""

import json

import datasets
import pytest

from sdpg_mcore.data import TEACHER_CONTEXT_TOKEN, DataError, PromptConfig, load_prompt_dataset, load_records


def rec(i, truth=None):
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"What is {i} + 1?{TEACHER_CONTEXT_TOKEN} Answer: {i + 1}"}],
        "reward_model": {"ground_truth": str(i + 1) if truth is None else truth, "style": "rule"},
        "extra_info": {"index": i},
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_all_formats_load_to_the_same_prompts(tmp_path, qwen_tokenizer):
    rows = [rec(i) for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    paths = ["d.parquet", "d.jsonl", "d.json", "saved", "saved_dict"]
    loaded = [load_prompt_dataset(tmp_path / p, qwen_tokenizer, PromptConfig()) for p in paths]
    for other in loaded[1:]:
        assert len(other) == 5
        for i in range(5):
            assert other[i] == loaded[0][i]
    assert loaded[0][3].ground_truth == "4" and loaded[0][3].extra_info == {"index": 3}
    test_split = load_prompt_dataset(tmp_path / "saved_dict", qwen_tokenizer, PromptConfig(), split="test")
    assert len(test_split) == 1


def test_several_files_concatenate_with_global_index_and_stats(tmp_path, qwen_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [rec(i) for i in range(3, 5)])
    ds = load_prompt_dataset([a, b], qwen_tokenizer, PromptConfig())
    assert [ds[i].index for i in range(len(ds))] == [0, 1, 2, 3, 4]
    assert ds.stats.num_records == ds.stats.num_kept == 5
    assert ds[-1] == ds[4]
    assert list(ds.student_lengths()) == [len(ds[i].student_ids) for i in range(5)]
    assert len(load_records([a, b])) == 5
    with pytest.raises(IndexError):
        ds[5]


def test_error_in_second_file_names_that_file_and_its_row(tmp_path, qwen_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [rec(0), rec(1)])
    b = write_jsonl(tmp_path / "b.jsonl", [rec(2), rec(3, truth="")])
    with pytest.raises(DataError, match=r"b.jsonl, record 1, field 'reward_model.ground_truth': empty"):
        load_prompt_dataset([a, b], qwen_tokenizer, PromptConfig())


def test_missing_column_names_file_and_column(tmp_path, qwen_tokenizer):
    rows = [{k: v for k, v in rec(i).items() if k != "reward_model"} for i in range(2)]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(
        DataError, match=r"x.jsonl, field 'reward_model': missing column\(s\) \['reward_model'\]"
    ):
        load_prompt_dataset(path, qwen_tokenizer, PromptConfig())


def test_default_data_source_makes_the_column_optional(tmp_path, qwen_tokenizer):
    rows = [{k: v for k, v in rec(i).items() if k != "data_source"} for i in range(2)]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match="'data_source'"):
        load_prompt_dataset(path, qwen_tokenizer, PromptConfig())
    ds = load_prompt_dataset(path, qwen_tokenizer, PromptConfig(default_data_source="math"))
    assert ds[0].data_source == "math"


def test_missing_sentinel_in_file(tmp_path, qwen_tokenizer):
    row = rec(1)
    row["prompt"][0]["content"] = "What is 1 + 1?"
    path = write_jsonl(tmp_path / "nosent.jsonl", [rec(0), row])
    with pytest.raises(DataError, match=r"nosent.jsonl, record 1, field 'prompt': no message contains"):
        load_prompt_dataset(path, qwen_tokenizer, PromptConfig())


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("broken.parquet", b"PAR1 this is not parquet", "unreadable"),
        ("broken.jsonl", b'{"prompt": 1}\n{not json\n', "record 1: line 2 is not valid JSON"),
        ("latin.jsonl", '{"a": "\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
        ("data.csv", b"a,b\n1,2\n", "unsupported file type '.csv'"),
        ("empty.jsonl", b"\n", "contains no records"),
    ],
)
def test_unreadable_files_are_named(tmp_path, qwen_tokenizer, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}.*{problem}"):
        load_prompt_dataset(path, qwen_tokenizer, PromptConfig())


def test_missing_file_and_non_dataset_directory(tmp_path, qwen_tokenizer):
    with pytest.raises(DataError, match=r"nope.parquet: file or directory does not exist"):
        load_prompt_dataset(tmp_path / "nope.parquet", qwen_tokenizer, PromptConfig())
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"plain_dir: not a saved dataset directory"):
        load_prompt_dataset(tmp_path / "plain_dir", qwen_tokenizer, PromptConfig())


def test_everything_filtered_is_an_error(tmp_path, qwen_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [rec(0)])
    with pytest.raises(DataError, match="every record was filtered"):
        load_prompt_dataset(path, qwen_tokenizer, PromptConfig(max_prompt_length=3, overlong="filter"))
