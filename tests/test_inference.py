"""`slmtune chat` (in a pseudo-terminal) and `slmtune generate`: the tuned model answers in its training template."""

import json

import pytest

from conftest import SLMTUNE, Terminal, run


@pytest.mark.parametrize(
    ("leave", "sigint"),
    [("\x04", "default"), ("\x03", "default"), ("\x03", "ignored")],
    ids=["ctrl-d", "ctrl-c", "ctrl-c-started-with-sigint-ignored"],
)
def test_chat_in_a_terminal_answers_keeps_history_and_leaves_cleanly(trained, leave, sigint):
    terminal = Terminal(trained, "--max-new-tokens", "6", sigint=sigint)
    terminal.read_until("you> ")
    terminal.type("What is the capital of France?\r")
    first = terminal.read_until("you> ")
    assert "model> " in first
    terminal.type("And of Spain?\r")
    assert "model> " in terminal.read_until("you> ")
    terminal.type(leave)
    assert terminal.exit_status() == 0
    assert "bye" in terminal.seen and "Traceback" not in terminal.seen


def test_chat_prompt_carries_the_history_in_the_training_template(trained):
    from slmtune.config import load_config
    from slmtune.inference import prompt_ids
    from slmtune.modeling import load_tokenizer

    config = load_config(trained / "params.yaml")
    tokenizer = load_tokenizer(trained / "models/base")
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    text = tokenizer.decode(prompt_ids(history, config.data, tokenizer))
    expected = tokenizer.apply_chat_template([*history], add_generation_prompt=True, tokenize=False)
    assert text == expected and text.index("first answer") < text.index("second question")


def test_generate_answers_a_prompt_file_in_batches(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is Dolly?\n\nName a colour.\nHow many legs has a cat?\n")
    batched, single = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    run([*SLMTUNE, "generate", str(prompts), "-o", str(batched), "--batch-size", "3", "--max-new-tokens", "6"], trained)
    run([*SLMTUNE, "generate", str(prompts), "-o", str(single), "--batch-size", "1", "--max-new-tokens", "6"], trained)
    rows = [json.loads(line) for line in batched.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is Dolly?", "Name a colour.", "How many legs has a cat?"]
    assert rows == [json.loads(line) for line in single.read_text().splitlines()]  # batching changes nothing


def test_generate_rejects_a_bad_prompt_line_and_writes_nothing(trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    result = run([*SLMTUNE, "generate", str(prompts), "-o", str(tmp_path / "out.jsonl")], trained, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {prompts}:2: no 'prompt' (or 'instruction') text; give each line one."
    assert not (tmp_path / "out.jsonl").exists()
