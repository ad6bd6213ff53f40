import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmtune.prompting import (
    IGNORE_INDEX,
    TokenizationError,
    assemble_example,
    build_example,
    encode_prompt,
    length_stats,
    render_prompt,
)

RECORD = {"source": "kb.csv:2", "instruction": "How many leave days?", "input": "", "output": "27 days."}


def test_prompt_is_masked_and_response_with_eos_is_trained():
    example = assemble_example([1, 2, 3], [7, 8, 0], max_length=10, train_on_prompt=False, source="s")
    assert example.input_ids == [1, 2, 3, 7, 8, 0]
    assert example.labels == [IGNORE_INDEX] * 3 + [7, 8, 0]
    assert not example.truncated


def test_train_on_prompt_keeps_every_label():
    example = assemble_example([1, 2], [7, 0], max_length=10, train_on_prompt=True, source="s")
    assert example.labels == [1, 2, 7, 0]


def test_long_response_is_truncated_and_counted():
    example = assemble_example([1, 2], [5, 6, 7, 0], max_length=4, train_on_prompt=False, source="s")
    assert example.input_ids == [1, 2, 5, 6] and example.truncated


def test_prompt_filling_max_length_is_a_clear_error():
    with pytest.raises(TokenizationError, match=r"kb\.csv:7: the prompt alone is 4 tokens.*max_length=4"):
        assemble_example([1, 2, 3, 4], [5, 0], max_length=4, train_on_prompt=False, source="kb.csv:7")


@given(
    prompt=st.lists(st.integers(1, 99), min_size=1, max_size=30),
    response=st.lists(st.integers(1, 99), min_size=1, max_size=30),
    max_length=st.integers(2, 70),
)
def test_masking_invariants(prompt, response, max_length):
    if len(prompt) >= max_length:
        with pytest.raises(TokenizationError):
            assemble_example(prompt, response, max_length, False, "s")
        return
    example = assemble_example(prompt, response, max_length, False, "s")
    n = len(prompt)
    assert len(example.input_ids) == len(example.labels) <= max_length
    assert example.input_ids[:n] == prompt and example.labels[:n] == [IGNORE_INDEX] * n
    assert example.labels[n:] == example.input_ids[n:] == response[: max_length - n]
    assert example.truncated == (len(response) > max_length - n)


def test_chat_template_renders_user_turn_and_generation_prompt(tiny_tokenizer):
    prompt = render_prompt({**RECORD, "input": "I am new."}, "chat", tiny_tokenizer, "Be brief.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many leave days?\n\nI am new.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_alpaca_and_tag_templates(tiny_tokenizer):
    alpaca = render_prompt({**RECORD, "input": "ctx"}, "alpaca", tiny_tokenizer, None)
    assert "### Instruction:\nHow many leave days?\n\n### Input:\nctx\n\n### Response:\n" in alpaca
    assert render_prompt(RECORD, "tags", tiny_tokenizer, None) == "<|user|>\nHow many leave days?\n<|assistant|>\n"


def test_chat_template_required_for_chat(tiny_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(TokenizationError, match="no chat template"):
        render_prompt(RECORD, "chat", NoTemplate(), None)


@pytest.mark.parametrize("template", ["chat", "alpaca", "tags"])
def test_training_sequence_starts_with_exactly_the_generation_prompt(tiny_tokenizer, template):
    example = build_example(RECORD, tiny_tokenizer, template, None, max_length=256)
    prompt_ids = encode_prompt(render_prompt(RECORD, template, tiny_tokenizer, None), template, tiny_tokenizer)
    n = len(prompt_ids)
    assert example.input_ids[:n] == prompt_ids
    assert set(example.labels[:n]) == {IGNORE_INDEX}
    trained = example.labels[n:]
    assert trained[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(trained[:-1]) == RECORD["output"]


def test_length_stats_count_trained_share_and_truncation():
    examples = [
        assemble_example([1, 2], [3, 0], 10, False, "a"),
        assemble_example([1, 2, 3, 4], [5, 6, 7, 0], 6, False, "b"),
    ]
    stats = length_stats(examples)
    assert stats["tokens"] == 10 and stats["trained_tokens"] == 4 and stats["trained_share"] == 0.4
    assert stats["truncated"] == 1 and stats["length"]["max"] == 6 and stats["length"]["min"] == 4
