"""The tokenize stage: templates, masks that train exactly the answers, generation prompts, raw-text chunks,
length limits, and the data report."""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import bad_data_project, data_report_rows, run
from slmtune.config import DataConfig
from slmtune.data import Issues
from slmtune.formats import DataError
from slmtune.prompting import (
    IGNORE_INDEX,
    Example,
    SpecialTokenInText,
    TokenizationError,
    TooLong,
    build_example,
    chunk_texts,
    fit_length,
    generation_prompt,
    length_stats,
    tokenize_split,
    tokenize_splits,
)

CUSTOM = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


TWO_TURNS = {
    "source": "chat.jsonl:1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many leave days?", "input": "I am new."},
        {"role": "assistant", "content": "27 days."},
        {"role": "user", "content": "And sick days?"},
        {"role": "assistant", "content": "12 days."},
    ],
}


def data(template, **kwargs):
    return DataConfig(template=template, chat_template=CUSTOM if template == "custom" else None, **kwargs)


def spans(example, tokenizer):
    """The example as decoded runs of (text, trained), split where the mask changes."""
    runs, current, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_trained = label != IGNORE_INDEX
        if current and is_trained != trained:
            runs.append((tokenizer.decode(current), trained))
            current = []
        current.append(token)
        trained = is_trained
    runs.append((tokenizer.decode(current), trained))
    return runs


EXPECTED = {
    "chat": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many leave days?\n\nI am new.<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("27 days.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd sick days?<|im_end|>\n<|im_start|>assistant\n", False),
        ("12 days.<|im_end|>\n", True),
    ],
    "alpaca": [
        (
            "Be brief.\n\nBelow is an instruction that describes a task, paired with an input that provides further "
            "context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nHow many leave days?\n\n"
            "### Input:\nI am new.\n\n### Response:\n",
            False,
        ),
        ("27 days.<|im_end|>", True),
        ("\n\n### Instruction:\nAnd sick days?\n\n### Response:\n", False),
        ("12 days.<|im_end|>", True),
    ],
    "tags": [
        ("<|system|>\nBe brief.\n<|user|>\nHow many leave days?\n\nI am new.\n<|assistant|>\n", False),
        ("27 days.<|im_end|>", True),
        ("\n<|user|>\nAnd sick days?\n<|assistant|>\n", False),
        ("12 days.<|im_end|>", True),
    ],
    "custom": [
        ("[system] Be brief.\n[user] How many leave days?\n\nI am new.\n[assistant] ", False),
        ("27 days.\n<|im_end|>", True),
        ("[user] And sick days?\n[assistant] ", False),
        ("12 days.\n<|im_end|>", True),
    ],
}


@pytest.mark.parametrize("template", list(EXPECTED))
def test_multi_turn_masks_system_and_user_and_trains_every_answer_with_its_end_of_turn(tiny_tokenizer, template):
    example = build_example(TWO_TURNS, data(template), tiny_tokenizer)
    assert spans(example, tiny_tokenizer) == EXPECTED[template]
    assert example.labels[-1] == tiny_tokenizer.eos_token_id or template == "chat"


def test_auto_template_is_the_tokenizers_chat_template(tiny_tokenizer):
    auto = build_example(TWO_TURNS, data("auto"), tiny_tokenizer)
    assert auto == build_example(TWO_TURNS, data("chat"), tiny_tokenizer)


def test_train_on_prompt_trains_every_token(tiny_tokenizer):
    example = build_example(TWO_TURNS, data("chat", train_on_prompt=True), tiny_tokenizer)
    assert example.labels == example.input_ids


def test_configured_system_prompt_applies_only_without_one(tiny_tokenizer):
    one_turn = {"source": "s", "messages": TWO_TURNS["messages"][1:3]}
    with_default = spans(
        build_example(one_turn, data("tags", system_prompt="Be kind."), tiny_tokenizer), tiny_tokenizer
    )
    assert with_default[0][0].startswith("<|system|>\nBe kind.\n<|user|>")
    own = spans(build_example(TWO_TURNS, data("tags", system_prompt="Be kind."), tiny_tokenizer), tiny_tokenizer)
    assert own[0][0].startswith("<|system|>\nBe brief.\n")


@pytest.mark.parametrize("template", list(EXPECTED))
def test_generation_prompt_is_exactly_the_training_prefix_before_the_last_answer(tiny_tokenizer, template):
    example = build_example(TWO_TURNS, data(template), tiny_tokenizer)
    text, ids, reference = generation_prompt(TWO_TURNS, data(template), tiny_tokenizer, 16)
    assert example.input_ids[: len(ids)] == ids and reference == "12 days."
    assert text == "".join(t for t, _ in EXPECTED[template][:3])
    assert example.labels[len(ids)] != IGNORE_INDEX and example.labels[len(ids) - 1] == IGNORE_INDEX


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(TokenizationError, match=r"chat\.jsonl:1: the chat template renders earlier turns differently"):
        build_example(TWO_TURNS, DataConfig(template="custom", chat_template=last_only), tiny_tokenizer)


def test_broken_custom_template_names_the_key(tiny_tokenizer):
    with pytest.raises(TokenizationError, match=r"data\.chat_template failed to render"):
        build_example(TWO_TURNS, DataConfig(template="custom", chat_template="{% for %}"), tiny_tokenizer)


def test_chat_template_required_for_chat():
    class NoTemplate:
        chat_template = None

    with pytest.raises(TokenizationError, match="no chat template"):
        build_example(TWO_TURNS, data("chat"), NoTemplate())


# What breaks masks: newlines and control characters, other templates' markers and this one's special tokens
# spelled out in the text, long texts, empty optional inputs. Contents arrive stripped and non-empty (prepare).
MARKERS = [
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "\x00",
    "\x1b[0m",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|assistant|>",
    "<|user|>",
    "### Response:\n",
    "### Instruction:",
    "[assistant] ",
    "[INST]",
    "</s>",
    "assistant\n",
    " ",
]
piece = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(MARKERS),
    st.text("abc .,\n", min_size=100, max_size=400),
)
text = st.lists(piece, min_size=1, max_size=8).map(lambda parts: "".join(parts).strip()).filter(bool)


@st.composite
def conversations(draw):
    turns = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        user = {"role": "user", "content": draw(text)}
        if draw(st.booleans()):
            user["input"] = draw(st.one_of(st.just(""), text))
        turns += [user, {"role": "assistant", "content": draw(text)}]
    return {"source": "h:1", "messages": turns}


@pytest.mark.parametrize("template", list(EXPECTED))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=conversations())
def test_random_conversations_train_exactly_the_answers(tiny_tokenizer, template, record):
    texts = [turn.get(field, "") for turn in record["messages"] for field in ("content", "input")]
    if any(token in text for text in texts for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        with pytest.raises(SpecialTokenInText, match=r"^h:1: the \w+ turn's \w+ contains '<\|"):
            build_example(record, data(template, max_length=1 << 20), tiny_tokenizer)
        return
    example = build_example(record, data(template, max_length=1 << 20), tiny_tokenizer)
    trained = [t for t, is_trained in spans(example, tiny_tokenizer) if is_trained]
    answers = [t["content"] for t in record["messages"] if t["role"] == "assistant"]
    end = {"chat": "<|im_end|>\n", "custom": "\n<|im_end|>"}.get(template, "<|im_end|>")
    assert trained == [a + end for a in answers]
    prompt = "".join(t for t, is_trained in spans(example, tiny_tokenizer) if not is_trained)
    for turn in record["messages"]:
        if turn["role"] != "assistant":
            assert turn["content"] in prompt and turn.get("input", "") in prompt


def test_a_special_token_spelled_in_a_row_fails_it_or_is_skipped_and_counted(tiny_tokenizer):
    bad = {
        "source": "kb.csv:4",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye<|im_end|> then more"}],
    }
    with pytest.raises(DataError, match=r"^kb\.csv:4: the assistant turn's content contains '<\|im_end\|>'.*Fix the"):
        tokenize_split([TWO_TURNS, bad], data("alpaca"), tiny_tokenizer, Issues("fail"))
    issues = Issues("skip")
    examples = tokenize_split([TWO_TURNS, bad], data("alpaca"), tiny_tokenizer, issues)
    assert [e.source for e in examples] == ["chat.jsonl:1"]
    assert issues.stats()["dropped"] == {"special token in text": 1}


def test_raw_text_is_chunked_to_max_length_and_fully_trained(tiny_tokenizer):
    records = [{"source": f"t.txt:{i}", "text": f"Document number {i} talks about leave days."} for i in range(6)]
    chunks = chunk_texts(records, tiny_tokenizer, max_length=16)
    stream = [t for r in records for t in tiny_tokenizer(r["text"])["input_ids"] + [tiny_tokenizer.eos_token_id]]
    assert [t for c in chunks for t in c.input_ids] == stream
    assert all(len(c.input_ids) == 16 for c in chunks[:-1]) and 0 < len(chunks[-1].input_ids) <= 16
    assert all(c.labels == c.input_ids for c in chunks) and chunks[0].source == "t.txt:0"


def test_too_long_example_is_an_error_unless_truncation_is_on():
    example = Example([1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 2 + [3, 4, 5, 6], False, "kb.csv:7")
    with pytest.raises(TooLong, match=r"kb\.csv:7: 6 tokens, longer than data\.max_length=4"):
        fit_length(example, 4, truncate=False)
    cut = fit_length(example, 4, truncate=True)
    assert cut.input_ids == [1, 2, 3, 4] and cut.labels == [IGNORE_INDEX, IGNORE_INDEX, 3, 4] and cut.truncated
    with pytest.raises(TooLong, match="the prompt alone fills data.max_length=2"):
        fit_length(example, 2, truncate=True)


def test_max_length_null_is_chosen_from_the_data_within_the_model_context(tiny_tokenizer):
    """Long and short examples in one split: none is cut or dropped, max_length becomes the longest; only an
    example longer than the model's context follows on_invalid."""
    short = {
        "source": "kb.csv:2",
        "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
    }
    long = {
        "source": "kb.csv:3",
        "messages": [
            {"role": "user", "content": "Tell me all."},
            {"role": "assistant", "content": "leave days " * 300},
        ],
    }
    config = DataConfig(max_length=None)
    records = {"train": [short, long], "val": [], "test": [short]}
    lengths = [len(build_example(r, config, tiny_tokenizer).input_ids) for r in (short, long)]
    assert lengths[1] > 512  # above the old default of 256, and the tiny model's 512 context below
    examples, stats = tokenize_splits(records, config, tiny_tokenizer, False, Issues("fail"), context=4096)
    assert [len(e.input_ids) for e in examples["train"]] == lengths and stats["max_length"] == lengths[1]
    assert (
        stats["max_length_chosen"] == f"from the data: the longest example ({lengths[1]} tokens), within the "
        "model's context of 4096 tokens"
    )
    with pytest.raises(DataError, match=r"kb\.csv:3: \d+ tokens, longer than the model's context \(512 tokens\)"):
        tokenize_splits(records, config, tiny_tokenizer, False, Issues("fail"), context=512)
    issues = Issues("skip")
    examples, stats = tokenize_splits(records, config, tiny_tokenizer, False, issues, context=512)
    assert stats["dropped"] == {"too long": 1} and stats["max_length"] == lengths[0]
    chunks, _ = tokenize_splits(
        {
            "train": [{"source": "t.txt:1", "text": "word " * 3000}],
            "val": [],
            "test": [{"source": "t.txt:9", "text": "a b"}],
        },
        config,
        tiny_tokenizer,
        False,
        Issues("fail"),
        context=4096,
    )
    assert max(len(c.input_ids) for c in chunks["train"]) == 1024  # raw text: run_clm's block size within the context


def test_length_stats_count_trained_share_and_truncation():
    examples = [
        Example([1, 2, 3, 0], [IGNORE_INDEX] * 2 + [3, 0], False, "a"),
        Example([1] * 6, [IGNORE_INDEX] * 4 + [1, 1], True, "b"),
    ]
    stats = length_stats(examples)
    assert stats["tokens"] == 10 and stats["trained_tokens"] == 4 and stats["trained_share"] == 0.4
    assert stats["truncated"] == 1 and stats["length"]["max"] == 6 and stats["length"]["min"] == 4


def test_data_report_counts_rows_tokens_and_drops(tiny_trained):
    tiny_project = tiny_trained.project
    report = (tiny_project / "reports/data_report.md").read_text()
    rows = {split: by_source.get("company_kb", 0) for split, by_source in data_report_rows(tiny_project).items()}
    for heading in ("## Rows per source and split", "## Token lengths per split", "## Dropped rows"):
        assert heading in report
    assert (
        f"| `company_kb` | `data/raw/company_kb.csv` | instruction | 114 | {rows['train']} | {rows['val']} | "
        f"{rows['test']} |" in report
    )
    assert "| `reworded` | `data/raw/company_kb_reworded.csv` | instruction | 76 | 0 | 76 | 0 |" in report
    assert "None: every row was used." in report and "![Token lengths per split](data_lengths.png)" in report
    assert (tiny_project / "reports/data_lengths.png").read_bytes().startswith(b"\x89PNG")
    tokens = json.loads((tiny_project / "reports/token_stats.json").read_text())
    assert f"{tokens['splits']['train']['trained_share']:.1%}" in report


@pytest.mark.pipeline
def test_too_long_example_stops_tokenize_or_is_skipped(tmp_path, tiny_model_dir):
    settings = ("data.max_length=64", "augment.generator=none")  # one long row, not its generated variants too
    project = bad_data_project(tmp_path / "project", tiny_model_dir, "too_long.jsonl", *settings)
    run(["python", "-P", "stages/base.py"], project)
    run(["python", "-P", "stages/prepare.py"], project)
    run(["python", "-P", "stages/augment.py"], project)
    result = run(["python", "-P", "stages/tokenize.py"], project, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert (
        "error: data/raw/bad/too_long.jsonl:5:" in result.stderr and "longer than data.max_length=64" in result.stderr
    )
    assert not (project / "data/tokenized").exists() and not (project / "reports/data_report.md").exists()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["on_invalid"] = "skip"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "-P", "stages/tokenize.py"], project)
    tokens = json.loads((project / "reports/token_stats.json").read_text())
    assert tokens["dropped"] == {"too long": 1} and tokens["skipped"][0]["location"] == "data/raw/bad/too_long.jsonl:5"
