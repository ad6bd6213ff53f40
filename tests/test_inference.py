"""`slmtune chat` (in a pseudo-terminal) and `slmtune generate`: the tuned model answers in its training template."""

import io
import json
from pathlib import Path

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


def test_chat_prompt_carries_the_history_in_the_adapters_training_template(trained):
    from slmtune.config import load_config
    from slmtune.inference import prompt_ids, training_data_config
    from slmtune.modeling import load_tokenizer

    config = load_config(trained / "params.yaml")
    config.data.template = "alpaca"  # the workspace moved on; the adapter was trained with the chat template
    data = training_data_config(config, trained / "models/adapter")
    tokenizer = load_tokenizer(trained / "models/base")
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    text = tokenizer.decode(prompt_ids(history, data, tokenizer))
    expected = tokenizer.apply_chat_template([*history], add_generation_prompt=True, tokenize=False)
    assert text == expected and text.index("first answer") < text.index("second question")


def test_chat_reset_clears_the_history_and_adapter_takes_an_mlflow_run_id(trained, monkeypatch, capsys):
    from slmtune import inference
    from slmtune.config import load_config

    monkeypatch.chdir(trained)
    run_id = json.loads((trained / "models/adapter/provenance.json").read_text())["mlflow"]["run_id"]
    loaded, prompts = [], []
    load_tuned, prompt_ids = inference.load_tuned, inference.prompt_ids
    monkeypatch.setattr(
        inference, "load_tuned", lambda config, adapter: loaded.append(adapter) or load_tuned(config, adapter)
    )
    monkeypatch.setattr(
        inference,
        "prompt_ids",
        lambda messages, data, tokenizer: (
            prompts.append([m["content"] for m in messages]) or prompt_ids(messages, data, tokenizer)
        ),
    )
    shown = io.StringIO()
    questions = io.StringIO("first\nsecond\n/reset\nthird\n")
    assert inference.chat(load_config("params.yaml"), run_id, max_new_tokens=4, stdin=questions, stdout=shown) == 0
    (adapter,) = loaded  # the run's logged adapter, downloaded: the same bytes as the one it trained
    assert Path(adapter).resolve() != (trained / "models/adapter").resolve()
    weights = "adapter_model.safetensors"
    assert (Path(adapter) / weights).read_bytes() == (trained / "models/adapter" / weights).read_bytes()
    assert prompts[0] == ["first"] and prompts[1][0] == "first" and prompts[1][2] == "second" and len(prompts[1]) == 3
    assert prompts[2] == ["third"] and "(history cleared)" in shown.getvalue() and len(prompts) == 3


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
