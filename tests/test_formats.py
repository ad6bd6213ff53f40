"""Every accepted format read into records, and every malformed row reported with its file, line and column."""

import json
from pathlib import Path

import pytest

from conftest import FIXTURES, HUB_ROWS
from slmtune.config import DataConfig, SourceConfig
from slmtune.data import prepare_data, read_records
from slmtune.formats import DataError, read_source, source_format

FACT_COUNT = 12


def source(path, **kwargs):
    return SourceConfig(path=str(path), **kwargs)


def assistant_turns(record):
    return [t["content"] for t in record["messages"] if t["role"] == "assistant"]


def test_instruction_csv_rows_become_one_turn_conversations():
    records, problems, rows = read_records("kb", source(FIXTURES / "instruction.csv"))
    assert not problems and rows == len(records) == FACT_COUNT
    assert records[4] == {
        "source": f"{FIXTURES / 'instruction.csv'}:6", "origin": "kb", "category": "",
        "messages": [{"role": "user", "content": "Translate to French.", "input": "good night"},
                     {"role": "assistant", "content": "Bonne nuit."}],
    }  # fmt: skip


def test_tagged_and_plain_prompt_response_rows_read_the_same():
    records, problems, _ = read_records("p", source(FIXTURES / "prompt_response.jsonl", columns={"instruction": "prompt", "output": "response"}))
    assert not problems and len(records) == FACT_COUNT
    plain, tagged = records[0]["messages"], records[1]["messages"]
    assert plain == [{"role": "user", "content": "What colour is the sky on a clear day?"}, {"role": "assistant", "content": "Blue."}]
    assert tagged == [{"role": "user", "content": "How many days are in a week?"}, {"role": "assistant", "content": "Seven."}]


def test_tagged_prompt_can_hold_several_turns():
    row = {"prompt": "<|system|>Be kind.<|user|>Hi<|assistant|>Hello!<|user|>Bye?<|assistant|>", "response": "<|assistant|> Bye."}
    path = FIXTURES.parent / "unused.jsonl"
    from slmtune.data import row_to_record
    from slmtune.formats import Row

    record = row_to_record(Row("f:1", row), source(path, columns={"instruction": "prompt", "output": "response"}), "p")
    assert [(t["role"], t["content"]) for t in record["messages"]] == [
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye?"), ("assistant", "Bye.")
    ]  # fmt: skip


def test_dolly_context_becomes_input_and_category_is_kept():
    records, _, _ = read_records("d", source(FIXTURES / "dolly.jsonl", columns={"input": "context", "output": "response"}))
    assert records[5]["messages"][0] == {"role": "user", "content": "Add the numbers.", "input": "2 and 3"}
    assert [r["category"] for r in records[:4]] == ["open_qa", "closed_qa", "summarization", "classification"]


def test_openai_and_sharegpt_conversations_read_identically():
    openai, p1, _ = read_records("c", source(FIXTURES / "chat_messages.jsonl", kind="chat"))
    sharegpt, p2, _ = read_records("c", source(FIXTURES / "chat_sharegpt.json", kind="chat", columns={"messages": "conversations"}))
    assert not p1 and not p2
    assert [r["messages"] for r in openai] == [r["messages"] for r in sharegpt]
    assert openai[0]["messages"][0]["role"] == "system" and len(assistant_turns(openai[0])) == 2
    assert sharegpt[3]["source"].endswith("chat_sharegpt.json row 4")


def test_dialogue_summary_gets_the_fixed_instruction():
    records, _, _ = read_records(
        "s", source(FIXTURES / "dialogue_summary.jsonl", instruction="Summarize.", columns={"input": "dialogue", "output": "summary"})
    )
    user, answer = records[0]["messages"]
    assert user["content"] == "Summarize." and user["input"].startswith("Ann: Meet at the station")
    assert answer["content"] == "Ann and Bob will meet at the station at 6."


def test_raw_text_paragraphs_are_documents_with_their_first_line():
    records, _, rows = read_records("t", source(FIXTURES / "raw_text.txt", kind="text"))
    assert rows == FACT_COUNT and records[1]["text"].startswith("Paragraph 1. How many days")
    assert records[1]["source"] == f"{FIXTURES / 'raw_text.txt'}:3"


def test_parquet_and_save_to_disk_read_like_the_csv(tmp_path, kb_parquet, kb_disk):
    csv_records, _, _ = read_records("kb", source(FIXTURES / "instruction.csv"))
    mapped = {"instruction": "question", "input": "context", "output": "answer"}
    parquet, _, _ = read_records("kb", source(kb_parquet, columns=mapped))
    disk, _, _ = read_records("kb", source(kb_disk, columns=mapped, dataset_split="train"))
    assert [r["messages"] for r in parquet] == [r["messages"] for r in csv_records]
    assert [r["messages"] for r in disk] == [r["messages"] for r in csv_records[:8]]
    assert parquet[2]["source"] == f"{kb_parquet} row 3"
    with pytest.raises(DataError, match=r"holds splits train, test; set the source's dataset_split"):
        read_records("kb", source(kb_disk, columns=mapped))


def test_hub_dataset_reads_from_the_local_cache(hub_cache):
    records, _, rows = read_records("hub", source("slmtune-test/tiny_corpus", format="hub", kind="text", columns={"text": "content"}))
    assert rows == len(HUB_ROWS) and records[0]["text"] == HUB_ROWS[0]["content"]
    assert records[0]["source"] == "hub:slmtune-test/tiny_corpus row 1"


def test_hub_dataset_offline_without_cache_says_exactly_that(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(DataError, match=r"hub dataset 'nobody/nothing': not in the local Hugging Face cache and the hub is offline"):
        read_source("nobody/nothing", "hub")


def test_format_comes_from_the_suffix_or_the_config(tmp_path):
    assert source_format("a/b.JSONL", "auto") == "jsonl"
    assert source_format("a/b.data", "csv") == "csv"
    with pytest.raises(DataError, match=r"cannot tell the format from '\.data'"):
        source_format("a/b.data", "auto")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.csv", None, r"missing\.csv: file not found"),
        ("empty.csv", "", r"empty\.csv: file is empty"),
        ("header.csv", "instruction,input,output\n", r"header\.csv: has a header but no data rows"),
        ("list.json", '{"a": 1}', r"list\.json: expected a JSON list of objects"),
        ("broken.json", '[{"a": 1},\n{"a": ]', r"broken\.json:2: not valid JSON"),
        ("bad.parquet", "not parquet", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_unreadable_sources_stop_with_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_source(str(path), source_format(str(path), "auto"))
    assert "\n" not in str(error.value)


def test_wrong_columns_are_named_with_the_mapping_fix(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text("question,answer\nq?,a.\n")
    with pytest.raises(DataError, match=r"kb\.csv: missing column\(s\) 'instruction', 'output' \(found: answer, question\)\. .*data\.sources\.kb\.columns"):
        read_records("kb", source(path))


BAD = FIXTURES / "bad"
PROMPT_RESPONSE = {"instruction": "prompt", "output": "response"}
# Each malformed fixture: the source, the reason counted when skipping, and the message (file:line, column).
BATTERY = {
    "bad encoding": (source(BAD / "bad_encoding.csv"), r"bad_encoding\.csv:5: not UTF-8 \(byte 0xe9 at column 12\)"),
    "broken JSON": (source(BAD / "broken_json.jsonl", columns=PROMPT_RESPONSE), r"broken_json\.jsonl:5: not valid JSON \(.* at column \d+\)"),
    "missing field": (source(BAD / "missing_field.jsonl", columns=PROMPT_RESPONSE), r"missing_field\.jsonl:5: column 'response' is missing"),
    "empty field": (source(BAD / "empty_field.csv"), r"empty_field\.csv:5: column 'output' is empty"),
    "wrong type": (source(BAD / "wrong_type.jsonl", columns=PROMPT_RESPONSE), r"wrong_type\.jsonl:5: column 'response' must be text, got int"),
    "duplicate": (source(BAD / "duplicate.csv"), r"duplicate\.csv:5: duplicate of .*duplicate\.csv:2"),
    "bad conversation": (source(BAD / "bad_conversation.jsonl", kind="chat"), r"bad_conversation\.jsonl:4: column 'messages' ends with a user turn"),
}


def data_config(sources, **kwargs):
    return DataConfig(sources=sources, val_fraction=0.0, test_fraction=0.2, **kwargs)


@pytest.mark.parametrize("reason", list(BATTERY))
def test_malformed_row_fails_by_default_with_one_line(reason):
    src, message = BATTERY[reason]
    with pytest.raises(DataError, match=message + r".*set data\.on_invalid=skip") as error:
        prepare_data(data_config({"bad": src}))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("reason", list(BATTERY))
def test_malformed_row_is_skipped_and_counted_when_asked(reason):
    src, message = BATTERY[reason]
    prepared = prepare_data(data_config({"bad": src}, on_invalid="skip"))
    assert prepared.stats["dropped"] == {reason: 1}
    [skipped] = prepared.stats["skipped"]
    assert skipped["reason"] == reason and skipped["location"].endswith((":5", ":4"))
    kept = sum(prepared.stats["rows"].values())
    assert kept == prepared.stats["sources"]["bad"]["rows_read"] - 1


def test_leak_between_given_splits_is_found_ignoring_case_and_punctuation():
    sources = {
        "train": source(BAD / "leak_train.jsonl", columns=PROMPT_RESPONSE, split="train"),
        "test": source(BAD / "leak_test.jsonl", columns=PROMPT_RESPONSE, split="test"),
    }
    with pytest.raises(DataError, match=r"leak_train\.jsonl:1: training prompt also in test \(.*leak_test\.jsonl:1\)"):
        prepare_data(data_config(sources))
    prepared = prepare_data(data_config(sources, on_invalid="skip"))
    assert prepared.stats["dropped"] == {"leak": 1}
    assert prepared.stats["rows"] == {"train": FACT_COUNT - 1, "val": 0, "test": 2}


def test_every_fixture_prepares_cleanly():
    for path in FIXTURES.glob("*.*"):
        kind = {"chat_messages.jsonl": "chat", "chat_sharegpt.json": "chat", "raw_text.txt": "text"}.get(path.name, "instruction")
        columns = {
            "prompt_response.jsonl": PROMPT_RESPONSE,
            "dolly.jsonl": {"input": "context", "output": "response"},
            "dialogue_summary.jsonl": {"input": "dialogue", "output": "summary"},
            "chat_sharegpt.json": {"messages": "conversations"},
        }.get(path.name, {})
        extra = {"instruction": "Summarize."} if path.name == "dialogue_summary.jsonl" else {}
        prepared = prepare_data(data_config({"f": source(path, kind=kind, columns=columns, **extra)}))
        assert prepared.stats["dropped"] == {} and prepared.stats["rows"]["test"] > 0, path.name
        assert json.dumps(prepared.splits)  # records are plain JSON data


def test_shipped_presets_point_at_shipped_data():
    repo = Path(__file__).resolve().parent.parent
    import yaml

    for preset in (repo / "conf/data").glob("*.yaml"):
        for src in yaml.safe_load(preset.read_text())["sources"].values():
            assert src.get("format") == "hub" or (repo / src["path"]).exists(), (preset.name, src["path"])
