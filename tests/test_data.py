"""Pure record logic: conversations, normalisation, splitting, leaks and weighted mixing."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
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
    weighted,
)

REPO = Path(__file__).resolve().parent.parent


def qa(question, answer, source="f:1", origin="a"):
    return {"source": source, "origin": origin, "category": "",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}  # fmt: skip


def test_normalised_text_ignores_case_spacing_and_punctuation():
    assert normalise_text("  What's the  Wi-Fi password?! ") == normalise_text("what s the wi fi password") == "what s the wi fi password"
    assert normalise_text("Café über") == "café über"


def test_parse_tagged_keeps_untagged_lead_as_user():
    assert parse_tagged("Hi there <|assistant|> Hello") == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]


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
    splits = {"train": [qa("What is X?", "1", "t:1"), qa("Other", "2", "t:2")], "val": [], "test": [qa("what is x", "3", "s:1")]}
    kept, problems = find_leaks(splits)
    assert [r["source"] for r in kept] == ["t:2"] and problems[0].location == "t:1" and "test (s:1)" in problems[0].message


def records_strategy():
    prompt = st.sampled_from([f"Question {i}?" for i in range(40)])
    case = st.sampled_from([str.lower, str.upper, str.strip])
    record = st.builds(lambda p, f, a: qa(f(p), a), prompt, case, st.text("ab", min_size=1, max_size=4))
    return st.lists(record, min_size=6, max_size=60)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy(), seed=st.integers(0, 1000))
def test_split_partitions_records_and_never_leaks_a_normalised_prompt(records, seed):
    if len({prompt_key(r) for r in records}) < 6:
        return
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
        "test": SourceConfig(path=str(FIXTURES / "dialogue_summary.jsonl"), split="test", instruction="Summarize.",
                             columns={"input": "dialogue", "output": "summary"}),
    }  # fmt: skip
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
