"""The prepare stage: every reader and record shape, row validation (fail or skip), de-duplication, splits,
leaks and weights; through `dvc repro`, bad data stops prepare with one line and no output."""

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, HUB_ROWS, assert_trained_through_every_stage, bad_data_project, make_project, run
from slmtune.config import DataConfig, SourceConfig
from slmtune.data import (
    RowProblem,
    check_conversation,
    find_duplicates,
    find_leaks,
    normalise_text,
    parse_tagged,
    prepare_data,
    prompt_key,
    random_split,
    read_records,
    weighted,
)
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
        "source": f"{FIXTURES / 'instruction.csv'}:6",
        "origin": "kb",
        "category": "",
        "messages": [
            {"role": "user", "content": "Translate to French.", "input": "good night"},
            {"role": "assistant", "content": "Bonne nuit."},
        ],
    }


def test_tagged_and_plain_prompt_response_rows_read_the_same():
    records, problems, _ = read_records(
        "p", source(FIXTURES / "prompt_response.jsonl", columns={"instruction": "prompt", "output": "response"})
    )
    assert not problems and len(records) == FACT_COUNT
    plain, tagged = records[0]["messages"], records[1]["messages"]
    assert plain == [
        {"role": "user", "content": "What colour is the sky on a clear day?"},
        {"role": "assistant", "content": "Blue."},
    ]
    assert tagged == [
        {"role": "user", "content": "How many days are in a week?"},
        {"role": "assistant", "content": "Seven."},
    ]


def test_tagged_prompt_can_hold_several_turns():
    row = {
        "prompt": "<|system|>Be kind.<|user|>Hi<|assistant|>Hello!<|user|>Bye?<|assistant|>",
        "response": "<|assistant|> Bye.",
    }
    path = FIXTURES.parent / "unused.jsonl"
    from slmtune.data import row_to_record
    from slmtune.formats import Row

    record = row_to_record(Row("f:1", row), source(path, columns={"instruction": "prompt", "output": "response"}), "p")
    assert [(t["role"], t["content"]) for t in record["messages"]] == [
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Bye?"),
        ("assistant", "Bye."),
    ]


def test_dolly_context_becomes_input_and_category_is_kept():
    records, _, _ = read_records(
        "d", source(FIXTURES / "dolly.jsonl", columns={"input": "context", "output": "response"})
    )
    assert records[5]["messages"][0] == {"role": "user", "content": "Add the numbers.", "input": "2 and 3"}
    assert [r["category"] for r in records[:4]] == ["open_qa", "closed_qa", "summarization", "classification"]


def test_openai_and_sharegpt_conversations_read_identically():
    openai, p1, _ = read_records("c", source(FIXTURES / "chat_messages.jsonl", kind="chat"))
    sharegpt, p2, _ = read_records(
        "c", source(FIXTURES / "chat_sharegpt.json", kind="chat", columns={"messages": "conversations"})
    )
    assert not p1 and not p2
    assert [r["messages"] for r in openai] == [r["messages"] for r in sharegpt]
    assert openai[0]["messages"][0]["role"] == "system" and len(assistant_turns(openai[0])) == 2
    assert sharegpt[3]["source"].endswith("chat_sharegpt.json row 4")


def test_dialogue_summary_gets_the_fixed_instruction():
    records, _, _ = read_records(
        "s",
        source(
            FIXTURES / "dialogue_summary.jsonl",
            instruction="Summarize.",
            columns={"input": "dialogue", "output": "summary"},
        ),
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
    records, _, rows = read_records(
        "hub", source("slmtune-test/tiny_corpus", format="hub", kind="text", columns={"text": "content"})
    )
    assert rows == len(HUB_ROWS) and records[0]["text"] == HUB_ROWS[0]["content"]
    assert records[0]["source"] == "hub:slmtune-test/tiny_corpus row 1"


def test_hub_dataset_offline_without_cache_says_exactly_that(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(
        DataError, match=r"hub dataset 'nobody/nothing': not in the local Hugging Face cache and the hub is offline"
    ):
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


@pytest.mark.parametrize(
    "name,content,kind,message",
    [
        (
            "too_many.csv",
            "instruction,input,output\nWhat is A?,,Alpha\nWhat is B?,,Beta,extra\n",
            "instruction",
            r"too_many\.csv:3: more fields than the header has columns; quote fields that contain commas",
        ),
        (
            "bad_quote.csv",
            'instruction,input,output\nWhat is A?,,Alpha\n"What is B?,,Beta\nWhat is C?,,Gamma\n',
            "instruction",
            r"bad_quote\.csv:3: broken CSV from this line on \(unexpected end of data\); a field that opens with",
        ),
        (
            "not_object.jsonl",
            '{"instruction": "a?", "output": "A"}\n["not", "an", "object"]\n',
            "instruction",
            r"not_object\.jsonl:2: expected a JSON object, got list",
        ),
        (
            "turn_type.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
            '{"messages": [{"role": "user", "content": "hi"}, "just text"]}\n',
            "chat",
            r"turn_type\.jsonl:2: column 'messages' turn 2 must be an object with role/content .*, got str",
        ),
    ],
)
def test_reader_errors_name_the_line_and_the_fix(tmp_path, name, content, kind, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        prepare_data(data_config({"s": source(path, kind=kind)}))
    assert "\n" not in str(error.value)


def test_wrong_columns_are_named_with_the_mapping_fix(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text("question,answer\nq?,a.\n")
    with pytest.raises(
        DataError,
        match=r"kb\.csv: missing column\(s\) 'instruction', 'output' \(found: answer, question\)\. "
        r".*data\.sources\.kb\.columns",
    ):
        read_records("kb", source(path))


BAD = FIXTURES / "bad"


PROMPT_RESPONSE = {"instruction": "prompt", "output": "response"}


# Each malformed fixture: the source, the reason counted when skipping, and the message (file:line, column).
BATTERY = {
    "bad encoding": (source(BAD / "bad_encoding.csv"), r"bad_encoding\.csv:5: not UTF-8 \(byte 0xe9 at column 12\)"),
    "broken JSON": (
        source(BAD / "broken_json.jsonl", columns=PROMPT_RESPONSE),
        r"broken_json\.jsonl:5: not valid JSON \(.* at column \d+\)",
    ),
    "missing field": (
        source(BAD / "missing_field.jsonl", columns=PROMPT_RESPONSE),
        r"missing_field\.jsonl:5: column 'response' is missing",
    ),
    "empty field": (source(BAD / "empty_field.csv"), r"empty_field\.csv:5: column 'output' is empty"),
    "wrong type": (
        source(BAD / "wrong_type.jsonl", columns=PROMPT_RESPONSE),
        r"wrong_type\.jsonl:5: column 'response' must be text, got int",
    ),
    "duplicate": (source(BAD / "duplicate.csv"), r"duplicate\.csv:5: duplicate of .*duplicate\.csv:2"),
    "bad conversation": (
        source(BAD / "bad_conversation.jsonl", kind="chat"),
        r"bad_conversation\.jsonl:4: column 'messages' ends with a user turn",
    ),
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
        kind = {"chat_messages.jsonl": "chat", "chat_sharegpt.json": "chat", "raw_text.txt": "text"}.get(
            path.name, "instruction"
        )
        columns = {
            "prompt_response.jsonl": PROMPT_RESPONSE,
            "dolly.jsonl": {"input": "context", "output": "response"},
            "dialogue_summary.jsonl": {"input": "dialogue", "output": "summary"},
            "chat_sharegpt.json": {"messages": "conversations"},
        }.get(path.name, {})
        extra = {"instruction": "Summarize."} if path.name == "dialogue_summary.jsonl" else {}
        prepared = prepare_data(data_config({"f": source(path, kind=kind, columns=columns, **extra)}))
        assert prepared.stats["dropped"] == {} and prepared.stats["rows"]["test"] > 0, path.name
        assert json.loads(json.dumps(prepared.splits)) == prepared.splits  # records are plain JSON data


def test_shipped_presets_point_at_shipped_data():
    repo = Path(__file__).resolve().parent.parent
    import yaml

    for preset in (repo / "conf/data").glob("*.yaml"):
        for src in yaml.safe_load(preset.read_text())["sources"].values():
            assert src.get("format") == "hub" or (repo / src["path"]).exists(), (preset.name, src["path"])


REPO = Path(__file__).resolve().parent.parent


def qa(question, answer, source="f:1", origin="a"):
    return {
        "source": source,
        "origin": origin,
        "category": "",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


def test_normalised_text_ignores_case_spacing_and_punctuation():
    assert (
        normalise_text("  What's the  Wi-Fi password?! ")
        == normalise_text("what s the wi fi password")
        == "what s the wi fi password"
    )
    assert normalise_text("Café über") == "café über"


def test_parse_tagged_keeps_untagged_lead_as_user():
    assert parse_tagged("Hi there <|assistant|> Hello") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
    ]


@pytest.mark.parametrize(
    "roles,message",
    [
        (["assistant"], "turn 1 is from assistant where user was expected"),
        (["system", "user", "user", "assistant"], "turn 3 is from user where assistant was expected"),
        (["user", "assistant", "user"], "ends with a user turn"),
        (["system"], "has no user or assistant turn"),
    ],
)
def test_conversations_must_alternate_and_end_with_the_assistant(roles, message):
    with pytest.raises(RowProblem, match=message):
        check_conversation([{"role": r, "content": "x"} for r in roles], "messages")


def test_empty_turn_is_named():
    with pytest.raises(RowProblem, match=r"turn 2 \(assistant\) is empty"):
        check_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "messages")


def test_duplicates_are_found_after_normalising_and_the_first_is_kept():
    a, b, c = qa("Where?", "Here.", "f:2"), qa("where", "here", "f:3"), qa("Where?", "There.", "f:4")
    kept, problems = find_duplicates([a, b, c])
    assert kept == [a, c] and [(p.location, p.reason) for p in problems] == [("f:3", "duplicate")]


def test_leak_check_compares_normalised_prompts_and_drops_the_training_copy():
    splits = {
        "train": [qa("What is X?", "1", "t:1"), qa("Other", "2", "t:2")],
        "val": [],
        "test": [qa("what is x", "3", "s:1")],
    }
    kept, problems = find_leaks(splits)
    assert (
        [r["source"] for r in kept] == ["t:2"] and problems[0].location == "t:1" and "test (s:1)" in problems[0].message
    )


def records_strategy():
    prompt = st.sampled_from([f"Question {i}?" for i in range(40)])
    case = st.sampled_from([str.lower, str.upper, str.strip])
    record = st.builds(lambda p, f, a: qa(f(p), a), prompt, case, st.text("ab", min_size=1, max_size=4))
    return st.lists(record, min_size=6, max_size=60)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy(), seed=st.integers(0, 1000))
def test_split_partitions_records_and_never_leaks_a_normalised_prompt(records, seed):
    assume(len({prompt_key(r) for r in records}) >= 6)
    splits = random_split(records, 0.2, 0.2, seed)
    assert sorted(map(id, sum(splits.values(), []))) == sorted(map(id, records))
    prompts = {name: {prompt_key(r) for r in part} for name, part in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not find_leaks(splits)[1] and splits["test"] and splits["train"]


def kb(**kwargs):
    return DataConfig(sources={"kb": SourceConfig(path=str(FIXTURES / "instruction.csv"))}, **kwargs)


def test_split_is_deterministic_in_the_seed():
    first = prepare_data(kb(split_seed=7, test_fraction=0.25)).splits
    again = prepare_data(kb(split_seed=7, test_fraction=0.25)).splits
    other = prepare_data(kb(split_seed=8, test_fraction=0.25)).splits
    assert first == again and first["test"] != other["test"]
    assert [len(first[s]) for s in ("train", "val", "test")] == [8, 1, 3]


def test_given_splits_are_used_as_they_are():
    sources = {
        "train": SourceConfig(path=str(FIXTURES / "instruction.csv"), split="train"),
        "test": SourceConfig(
            path=str(FIXTURES / "dialogue_summary.jsonl"),
            split="test",
            instruction="Summarize.",
            columns={"input": "dialogue", "output": "summary"},
        ),
    }
    prepared = prepare_data(DataConfig(sources=sources))
    assert prepared.stats["rows"] == {"train": 12, "val": 0, "test": 12}
    assert prepared.stats["rows_by_source"]["test"] == {"test": 12}


def test_weights_repeat_and_subsample_each_source_deterministically():
    records = [qa(f"a{i}", "x", origin="a") for i in range(10)] + [qa(f"b{i}", "y", origin="b") for i in range(10)]
    mixed = weighted(records, {"a": 2.0, "b": 0.5}, seed=3)
    assert sum(r["origin"] == "a" for r in mixed) == 20 and sum(r["origin"] == "b" for r in mixed) == 5
    assert mixed == weighted(records, {"a": 2.0, "b": 0.5}, seed=3)
    assert len({r["messages"][0]["content"] for r in mixed if r["origin"] == "b"}) == 5


def test_mixed_sources_are_counted_per_split_and_source():
    sources = {
        "kb": SourceConfig(path=str(FIXTURES / "instruction.csv")),
        "text": SourceConfig(path=str(FIXTURES / "raw_text.txt"), kind="text", weight=2.0),
    }
    prepared = prepare_data(DataConfig(sources=sources, val_fraction=0.0, test_fraction=0.25))
    by_source = prepared.stats["rows_by_source"]
    unweighted = 24 - by_source["test"]["kb"] - by_source["test"]["text"]
    assert by_source["train"]["kb"] + by_source["train"]["text"] / 2 == unweighted
    assert prepared.stats["rows"]["train"] == sum(by_source["train"].values())


def test_shipped_knowledge_base_tests_facts_seen_in_new_words():
    """Test questions of the default split mostly ask trained facts in other words (each fact has 3 phrasings)."""
    splits = prepare_data(DataConfig(sources={"kb": SourceConfig(path=str(REPO / "data/raw/company_kb.csv"))})).splits
    answer = lambda r: r["messages"][-1]["content"]  # noqa: E731
    train_answers = {answer(r) for r in splits["train"]}
    assert len(splits["test"]) >= 10
    seen = sum(answer(r) in train_answers for r in splits["test"])
    assert seen >= 0.8 * len(splits["test"])
    assert not {prompt_key(r) for r in splits["test"]} & {prompt_key(r) for r in splits["train"]}


def break_data(project: Path, problem: str) -> None:
    path = project / "data/raw/company_kb.csv"
    if problem == "missing":
        path.unlink()
    elif problem == "empty":
        path.write_text("")
    elif problem == "wrong columns":
        path.write_text("question,answer\nWhat?,That.\n")


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing", "error: data/raw/company_kb.csv: file not found"),
        ("empty", "error: data/raw/company_kb.csv: file is empty"),
        (
            "wrong columns",
            "error: data/raw/company_kb.csv: missing column(s) 'instruction', 'output' (found: answer, question)",
        ),
    ],
)
def test_bad_data_stops_prepare_with_one_line_and_no_outputs(tiny_project: Path, problem, message):
    break_data(tiny_project, problem)
    result = run(["python", "-P", "stages/prepare.py"], tiny_project, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tiny_project / "data/prepared").exists() and not (tiny_project / "reports/data_stats.json").exists()
    assert [p.name for p in (tiny_project / "data").iterdir()] == ["raw"], "no temporary left behind"


def test_failed_prepare_keeps_the_previous_outputs(tiny_project: Path):
    run(["python", "-P", "stages/prepare.py"], tiny_project)
    before = (tiny_project / "data/prepared/train.jsonl").read_text()
    break_data(tiny_project, "wrong columns")
    assert run(["python", "-P", "stages/prepare.py"], tiny_project, check=False).returncode == 1
    assert (tiny_project / "data/prepared/train.jsonl").read_text() == before


def test_dvc_repro_reports_bad_data_and_stops(tiny_project: Path):
    break_data(tiny_project, "empty")
    result = run(["dvc", "repro", "prepare"], tiny_project, check=False)
    assert result.returncode != 0
    assert "error: data/raw/company_kb.csv: file is empty" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.pipeline
def test_hub_dataset_offline_without_cache_stops_prepare_with_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    project = make_project(
        tmp_path / "project", ["data=hub_guanaco", f"model.source={tiny_model_dir}", "model.gguf_file=null"]
    )
    result = run(["python", "-P", "stages/prepare.py"], project, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: hub dataset 'timdettmers/openassistant-guanaco': not in the local Hugging Face cache and the hub is "
        "offline (HF_HUB_OFFLINE=1). Download it once online (HF_HUB_OFFLINE=0 dvc repro) or copy it into "
        "HF_DATASETS_CACHE."
    )


BAD_ROWS = {
    "bad_encoding.csv": "data/raw/bad/bad_encoding.csv:5: not UTF-8 (byte 0xe9 at column 12)",
    "broken_json.jsonl": "data/raw/bad/broken_json.jsonl:5: not valid JSON",
    "missing_field.jsonl": "data/raw/bad/missing_field.jsonl:5: column 'response' is missing",
    "empty_field.csv": "data/raw/bad/empty_field.csv:5: column 'output' is empty",
    "wrong_type.jsonl": "data/raw/bad/wrong_type.jsonl:5: column 'response' must be text, got int",
    "duplicate.csv": "data/raw/bad/duplicate.csv:5: duplicate of data/raw/bad/duplicate.csv:2",
    "bad_conversation.jsonl": "data/raw/bad/bad_conversation.jsonl:4: column 'messages' ends with a user turn",
}


@pytest.mark.pipeline
@pytest.mark.parametrize("fixture", list(BAD_ROWS))
def test_malformed_file_stops_prepare_with_one_line_and_no_outputs(tmp_path, tiny_model_dir, fixture):
    project = bad_data_project(tmp_path / "project", tiny_model_dir, fixture)
    result = run(["python", "-P", "stages/prepare.py"], project, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + BAD_ROWS[fixture]), result.stderr
    assert lines[0].endswith("Fix the data, or set data.on_invalid=skip to drop and count such rows.")
    assert not (project / "data/prepared").exists() and not (project / "reports/data_stats.json").exists()


def test_skipped_rows_are_counted_and_listed_and_training_goes_on(tmp_path, tiny_model_dir):
    project = bad_data_project(tmp_path / "project", tiny_model_dir, "broken_json.jsonl", "data.on_invalid=skip")
    assert_trained_through_every_stage(project)
    stats = json.loads((project / "reports/data_stats.json").read_text())
    assert stats["dropped"] == {"broken JSON": 1} and sum(stats["rows"].values()) == 12
    report = (project / "reports/data_report.md").read_text()
    assert "| broken JSON | 1 | 0 |" in report and "`data/raw/bad/broken_json.jsonl:5` (broken JSON)" in report


def test_an_answer_held_out_in_every_wording_gets_one_wording_into_training():
    from slmtune.data import answers_into_train

    def row(source, question, answer):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"source": source, "messages": messages}

    gold = "CareWell Gold has an annual deductible of 250 euros."
    splits = {
        "train": [row("t1", "How many leave days?", "27 days."), row("t2", "Yearly leave?", "27 days.")],
        "val": [row("v1", "Gold deductible?", gold), row("v2", "Unique val?", "Only here.")],
        "test": [row("s1", "What do I pay first on Gold?", gold), row("s2", "Gold plan deductible?", gold)]
        + [row("s3", "Holiday count?", "27 days."), row("s4", "Unique test?", "Said once.")],
    }
    moved = answers_into_train({name: list(part) for name, part in splits.items()})
    assert [r["source"] for r in moved["train"]] == ["t1", "t2", "v1"]  # a validation wording first
    assert [r["source"] for r in moved["val"]] == ["v2"]  # an answer given once stays held out
    assert [r["source"] for r in moved["test"]] == ["s1", "s2", "s3", "s4"]  # the test split keeps its questions
    only_test = {"train": splits["train"], "val": [], "test": splits["test"]}
    assert [r["source"] for r in answers_into_train(only_test)["train"]] == ["t1", "t2", "s1"]


def test_a_facts_column_becomes_the_records_key_facts(tmp_path):
    path = tmp_path / "raw" / "kb.jsonl"
    path.parent.mkdir()
    rows = [
        {"q": "Gold deductible?", "a": "It is 250 euros.", "facts": "250 euros; CareWell Gold"},
        {"q": "Leave?", "a": "27 days.", "facts": ["27 days"]},
        {"q": "Plans?", "a": "Two.", "facts": ""},
        {"q": "Bad?", "a": "Yes.", "facts": 3},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = SourceConfig(path=str(path), columns={"instruction": "q", "output": "a"})
    records, problems, _ = read_records("kb", source)
    assert [r.get("facts") for r in records] == [["250 euros", "CareWell Gold"], ["27 days"], None]
    assert [p.message for p in problems] == [
        f"{path}:4: column 'facts' must be a list of strings or ';'-separated text."
    ]
