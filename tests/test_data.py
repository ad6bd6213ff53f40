import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmtune.data import (
    DataError,
    drop_exact_duplicates,
    leaked_prompts,
    normalise_rows,
    prepare_data,
    prompt_key,
    read_rows,
    split_records,
)

COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def kb_csv(tmp_path, rows=12):
    lines = ["instruction,input,output"] + [f"Question {i}?,,Answer {i}." for i in range(rows)]
    return write(tmp_path / "kb.csv", "\n".join(lines) + "\n")


def test_csv_rows_become_records_with_their_source_line(tmp_path):
    records = normalise_rows(read_rows(kb_csv(tmp_path, 3)), COLUMNS, "kb.csv")
    assert records[0] == {
        "source": "kb.csv:2", "instruction": "Question 0?", "input": "", "output": "Answer 0.",
        "system": "", "category": "",
    }  # fmt: skip
    assert [r["source"] for r in records] == ["kb.csv:2", "kb.csv:3", "kb.csv:4"]


def test_jsonl_columns_are_mapped(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"prompt": "Hi?", "response": " Hello. "}) + "\n")
    records = normalise_rows(read_rows(path), {"instruction": "prompt", "output": "response"}, "p.jsonl")
    assert records[0]["instruction"] == "Hi?" and records[0]["output"] == "Hello." and records[0]["input"] == ""


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.csv", None, r"missing\.csv: file not found"),
        ("empty.csv", "", r"empty\.csv: file is empty"),
        ("header.csv", "instruction,input,output\n", r"header\.csv: has a header but no data rows"),
        ("latin1.csv", b"instruction,input,output\ncaf\xe9,,x\n", r"latin1\.csv: not UTF-8 \(byte 0xe9"),
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', r"broken\.jsonl line 2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl line 1: expected a JSON object"),
        ("data.txt", "hello", r"unsupported file type '\.txt'"),
    ],
)
def test_unreadable_files_give_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message) as error:
        read_rows(path)
    assert "\n" not in str(error.value)


def test_wrong_columns_are_named_with_the_fix(tmp_path):
    path = write(tmp_path / "kb.csv", "question,answer\nq?,a.\n")
    with pytest.raises(DataError, match=r"kb\.csv: missing column\(s\) 'instruction', 'output' \(found: answer, question\)"):
        normalise_rows(read_rows(path), COLUMNS, "kb.csv")


def test_empty_required_field_names_the_line(tmp_path):
    path = write(tmp_path / "kb.csv", "instruction,input,output\nq1?,,a1.\nq2?,,  \n")
    with pytest.raises(DataError, match=r"kb\.csv line 3: column 'output' is empty"):
        normalise_rows(read_rows(path), COLUMNS, "kb.csv")


def test_non_text_field_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"instruction": "q", "output": 42}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 1: column 'output' must be text, got int"):
        normalise_rows(read_rows(path), COLUMNS, "d.jsonl")


def test_exact_duplicates_are_dropped_keeping_the_first():
    a = {"source": "f:2", "instruction": "q", "input": "", "output": "a"}
    b = {**a, "source": "f:3"}
    c = {**a, "source": "f:4", "output": "other"}
    kept, dropped = drop_exact_duplicates([a, b, c])
    assert kept == [a, c] and dropped == ["f:3"]


def records_strategy():
    prompt = st.sampled_from([f"q{i}" for i in range(40)])
    record = st.builds(lambda p, o: {"source": "x", "instruction": p, "input": "", "output": o}, prompt, st.text(min_size=1, max_size=5))
    return st.lists(record, min_size=6, max_size=60)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy(), seed=st.integers(0, 1000))
def test_split_partitions_records_and_never_leaks_a_prompt(records, seed):
    if len({prompt_key(r) for r in records}) < 6:
        return
    splits = split_records(records, 0.2, 0.2, seed)
    assert sorted(map(id, sum(splits.values(), []))) == sorted(map(id, records))
    prompts = {name: {prompt_key(r) for r in part} for name, part in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not leaked_prompts(splits["train"], splits["test"]) and splits["test"] and splits["train"]


def test_split_is_deterministic_in_the_seed(tmp_path):
    path = kb_csv(tmp_path, 40)
    first = prepare_data(path, COLUMNS, 0.1, 0.2, seed=7).splits
    again = prepare_data(path, COLUMNS, 0.1, 0.2, seed=7).splits
    other = prepare_data(path, COLUMNS, 0.1, 0.2, seed=8).splits
    assert first == again and first["test"] != other["test"]
    assert [len(first[s]) for s in ("train", "val", "test")] == [28, 4, 8]


def test_leak_check_finds_shared_prompts():
    train = [{"source": "a:2", "instruction": "q", "input": "", "output": "x"}]
    test = [{"source": "a:9", "instruction": "q", "input": "", "output": "y"}]
    assert leaked_prompts(train, test) == ["a:9"]


def test_shipped_knowledge_base_tests_facts_seen_in_new_words():
    """Every test question of the default split asks a fact whose answer is trained, in other words."""
    repo = Path(__file__).resolve().parent.parent
    splits = prepare_data(repo / "data/raw/company_kb.csv", COLUMNS, 0.1, 0.15, 42).splits
    train_answers = {r["output"] for r in splits["train"]}
    assert len(splits["test"]) >= 10
    assert all(r["output"] in train_answers for r in splits["test"])
    assert sum(1 for _ in open(repo / "data/raw/polite_assistant.jsonl")) >= 40
