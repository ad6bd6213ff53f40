"""Talk to a fine-tuned model: an interactive, streaming, multi-turn chat, and batch answers to a file of
prompts. Both format turns with the template the adapter was trained with (its provenance), and default
to the pipeline's latest adapter."""

from __future__ import annotations

import json
import select
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer, set_seed

from .config import Config, DataConfig, validate_config
from .errors import DataError, UserError
from .lineage import read_provenance
from .modeling import load_tuned
from .outputs import staged_outputs, write_jsonl
from .progress import track
from .prompting import generation_prompt
from .tracking import resolve_adapter


def training_data_config(config: Config, adapter: Path) -> DataConfig:
    """The data settings (template, chat template, system prompt) the adapter was trained with; the
    workspace's when the adapter has no provenance."""
    try:
        return validate_config(read_provenance(adapter)["config"], f"{adapter}/provenance.json").data
    except (KeyError, UserError) as exc:
        print(f"warning: {exc}; formatting prompts with params.yaml's data settings.", file=sys.stderr)
        return config.data


def prompt_ids(messages: list[dict[str, str]], data: DataConfig, tokenizer: Any) -> list[int]:
    """Token ids of a conversation up to the model's next answer, in the training template."""
    record = {"source": "chat", "messages": [*messages, {"role": "assistant", "content": ""}]}
    return generation_prompt(record, data, tokenizer, 0)[1]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers, batched with left padding; decoding stops at EOS."""
    model.eval()
    pad = tokenizer.pad_token_id
    answers = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in track(starts, desc=f"{desc}: {len(prompt_ids)} answers", unit="batch"):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return answers


def load(config: Config, adapter_spec: str | None) -> tuple[Any, Any, DataConfig]:
    adapter = resolve_adapter(config, adapter_spec)
    model, tokenizer = load_tuned(config, adapter)
    return model, tokenizer, training_data_config(config, adapter)


def generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    sampling = temperature > 0
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sampling:
        kwargs |= {"temperature": temperature, "top_p": top_p}
    return kwargs


def read_line(stdin: TextIO) -> str:
    """One line of input. From a terminal, wait in short `select` slices: the interpreter then gets back to
    Python between them and raises KeyboardInterrupt for a Ctrl-C whose signal the kernel handed to another thread
    (PyTorch's); a `readline` blocked in C would not see it until the next line arrives."""
    if stdin.isatty():
        while not select.select([stdin], [], [], 0.2)[0]:
            pass
    return stdin.readline()


def chat(
    config: Config,
    adapter_spec: str | None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.9,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    """Read a question per line, stream the answer token by token, keep the conversation as history.
    Ctrl-D (end of input) or Ctrl-C leaves cleanly; `/reset` clears the history. Ctrl-C works however the
    command was started: a shell that ignores SIGINT (nohup, some service managers) passes that on."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model, tokenizer, data = load(config, adapter_spec)
    set_seed(config.train.seed)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    kwargs = generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    print(
        "Chat with the fine-tuned model. Ctrl-D or Ctrl-C to leave, /reset to clear the history.",
        file=stdout,
        flush=True,
    )
    try:
        while True:
            print("you> ", end="", file=stdout, flush=True)
            line = read_line(stdin)
            if not line:  # Ctrl-D
                break
            question = line.strip()
            if not question:
                continue
            if question == "/reset":
                history = history[:1] if system else []
                print("(history cleared)", file=stdout, flush=True)
                continue
            history.append({"role": "user", "content": question})
            ids = torch.tensor([prompt_ids(history, data, tokenizer)])
            print("model> ", end="", file=stdout, flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            with torch.no_grad():
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
            answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
            history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:  # Ctrl-C, while typing or while the model answers
        pass
    print("\nbye", file=stdout, flush=True)
    return 0


def read_prompts(path: Path) -> list[dict[str, str]]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file (objects with `prompt`, or
    `instruction` with an optional `input`)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .txt file (one prompt per line) or a .jsonl file.")
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append({"content": line.strip()})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line.") from None
            text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: no 'prompt' (or 'instruction') text; give each line one.")
            prompts.append({"content": text} | ({"input": row["input"]} if row.get("input") else {}))
    if not prompts:
        raise DataError(f"{path}: no prompts in it.")
    return prompts


def generate_file(
    config: Config, adapter_spec: str | None, input_path: Path, output_path: Path, batch_size: int, max_new_tokens: int
) -> int:
    """Answer every prompt of `input_path` (greedy, batched) and write JSONL rows {prompt, input?, response}."""
    prompts = read_prompts(input_path)
    model, tokenizer, data = load(config, adapter_spec)
    set_seed(config.train.seed)
    ids = [prompt_ids([{"role": "user"} | p], data, tokenizer) for p in prompts]
    answers = generate_answers(model, tokenizer, ids, max_new_tokens, batch_size)
    rows = [
        {"prompt": p["content"]} | ({"input": p["input"]} if "input" in p else {}) | {"response": a}
        for p, a in zip(prompts, answers)
    ]
    with staged_outputs(output_path) as (staged,):
        write_jsonl(staged, rows)
    print(f"wrote {len(rows)} answers to {output_path}")
    return 0
