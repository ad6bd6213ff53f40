"""`slmtune serve`: a live server on localhost called with the official `openai` client, plain and streamed,
answering as the tuned model does in its training template; API key, model id and bad requests refused."""

import json
import re
import socket
import subprocess
import time

import openai
import pytest
import torch
from openai import OpenAI

from conftest import SLMTUNE, copy_project, stage_env

QUESTION = "What is the capital of France?"


def start_server(project, *args: str) -> tuple[subprocess.Popen, str]:
    """`slmtune serve --port 0 ...` in `project`; the process and the base URL it printed."""
    server = subprocess.Popen(
        [*SLMTUNE, "serve", "--port", "0", "--max-new-tokens", "12", *args],
        cwd=project,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"serving 'slmtune' at (http://127\.0\.0\.1:\d+/v1)", line)
        if found:
            return server, found.group(1)
    server.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen))


def trained_with_alpaca(trained, tmp_path):
    """A copy of the trained project whose adapter says it was trained with the Alpaca template: unlike the
    tokenizer's own chat template, so a server formatting with the wrong one gives other prompt tokens."""
    project = copy_project(trained, tmp_path)
    provenance = project / "models/adapter/provenance.json"
    record = json.loads(provenance.read_text())
    record["config"]["data"]["template"] = "alpaca"
    provenance.unlink()  # a fresh file, not a write through a link into the DVC cache
    provenance.write_text(json.dumps(record))
    return project


def expected_answer(project, monkeypatch, question: str, max_new_tokens: int) -> tuple[str, int]:
    """The tuned model's greedy answer in its training template and the prompt's length in tokens, computed
    here without the server."""
    from slmtune.config import load_config
    from slmtune.inference import generation_kwargs, load, prompt_ids

    monkeypatch.chdir(project)
    model, tokenizer, data = load(load_config(), None)
    assert data.template == "alpaca"
    messages = [{"role": "user", "content": question}]
    ids = torch.tensor([prompt_ids(messages, data, tokenizer)])
    chat_template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert len(chat_template["input_ids"]) != ids.shape[1]
    kwargs = generation_kwargs(tokenizer, max_new_tokens, 0.0, 1.0)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip(), ids.shape[1]


def test_the_openai_client_gets_the_tuned_models_answer_plain_and_streamed(trained, tmp_path, monkeypatch):
    project = trained_with_alpaca(trained, tmp_path)
    server, url = start_server(project, "--api-key", "test-key")
    try:
        client = OpenAI(base_url=url, api_key="test-key", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["slmtune"]
        messages = [{"role": "user", "content": QUESTION}]

        reply = client.chat.completions.create(model="slmtune", messages=messages, max_tokens=10)
        expected, prompt_tokens = expected_answer(project, monkeypatch, QUESTION, 10)
        assert expected and reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == prompt_tokens  # formatted in the adapter's training template
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 10

        chunks = list(
            client.chat.completions.create(
                model="slmtune",
                messages=messages,
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1, "the answer came in one piece: not streamed"
        assert "".join(pieces).strip() == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

        # the model's default answer length (--max-new-tokens 12) when the request sets none
        default = client.chat.completions.create(model="slmtune", messages=messages)
        assert default.usage.completion_tokens <= 12

        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
            client.chat.completions.create(model="slmtune", messages=[{"role": "assistant", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="role must be one of"):
            client.chat.completions.create(model="slmtune", messages=[{"role": "tool", "content": "x"}])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serving_beyond_this_machine_needs_an_api_key_and_a_busy_port_is_named(tmp_path):
    from slmtune.config import Config
    from slmtune.errors import ConfigError
    from slmtune.serve import listen, serve

    with pytest.raises(ConfigError, match="--host 0.0.0.0 exposes the model beyond this machine"):
        serve(Config(), str(tmp_path), host="0.0.0.0", port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*choose another --port"):
            listen("127.0.0.1", port)
