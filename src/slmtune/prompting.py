"""Records -> prompt text -> token ids with labels masked to the response.

The prompt is rendered and tokenized on its own, the response is tokenized on its own and ends with
EOS. Training sees `prompt_ids + response_ids + [eos]`; generation feeds exactly `prompt_ids`, so the
model is trained on the same boundary it is later asked to continue from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TAGS = "<|user|>\n{user}\n<|assistant|>\n"


class TokenizationError(ValueError):
    """An example that cannot be turned into a trainable sequence."""


def user_message(record: dict[str, str]) -> str:
    """The user turn: the instruction, followed by the input when there is one."""
    if record.get("input"):
        return f"{record['instruction']}\n\n{record['input']}"
    return record["instruction"]


def render_prompt(record: dict[str, str], template: str, tokenizer: Any, system_prompt: str | None) -> str:
    """The text the model sees before its answer, in the chosen template."""
    system = record.get("system") or system_prompt
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizationError(
                "data.template=chat but the tokenizer has no chat template; choose data.template=alpaca or tags."
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message(record)}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prefix = f"{system}\n\n" if system else ""
    if template == "alpaca":
        body = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        return prefix + body.format(instruction=record["instruction"], input=record.get("input", ""))
    if template == "tags":
        return prefix + TAGS.format(user=user_message(record))
    raise TokenizationError(f"unknown template '{template}'; use chat, alpaca or tags.")


def encode_prompt(prompt: str, template: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt; chat templates carry their own special tokens."""
    return tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def build_example(
    record: dict[str, str],
    tokenizer: Any,
    template: str,
    system_prompt: str | None,
    max_length: int,
    train_on_prompt: bool = False,
) -> Example:
    """Tokenize a record; labels are IGNORE_INDEX on the prompt unless `train_on_prompt`."""
    prompt_ids = encode_prompt(render_prompt(record, template, tokenizer, system_prompt), template, tokenizer)
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return assemble_example(prompt_ids, response_ids, max_length, train_on_prompt, record.get("source", "?"))


def assemble_example(
    prompt_ids: list[int], response_ids: list[int], max_length: int, train_on_prompt: bool, source: str
) -> Example:
    """Concatenate, truncate to `max_length` from the end of the response, and mask the prompt."""
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise TokenizationError(
            f"{source}: the prompt alone is {len(prompt_ids)} tokens, leaving no response token to train "
            f"within data.max_length={max_length}. Raise data.max_length or shorten the prompt."
        )
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return Example(
        input_ids=list(prompt_ids) + list(response_ids),
        labels=prompt_labels + list(response_ids),
        truncated=truncated,
    )


def padding_collator(tokenizer: Any) -> Any:
    """Pads each batch to its longest example (never to max_length); padded labels carry no loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)


def tokenize_records(
    records: list[dict[str, str]],
    tokenizer: Any,
    template: str,
    system_prompt: str | None,
    max_length: int,
    train_on_prompt: bool = False,
) -> list[Example]:
    """`build_example` over a split."""
    return [build_example(r, tokenizer, template, system_prompt, max_length, train_on_prompt) for r in records]


def length_stats(examples: list[Example]) -> dict[str, Any]:
    """Token-length percentiles, truncation count and the share of tokens that carry a loss."""
    lengths = sorted(len(e.input_ids) for e in examples)
    trained = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in examples)
    total = sum(lengths)

    def percentile(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * (len(lengths) - 1) + 0.5))] if lengths else 0

    return {
        "examples": len(examples),
        "tokens": total,
        "trained_tokens": trained,
        "trained_share": round(trained / total, 4) if total else 0.0,
        "truncated": sum(e.truncated for e in examples),
        "length": {
            "min": lengths[0] if lengths else 0,
            "p50": percentile(0.5),
            "p90": percentile(0.9),
            "p95": percentile(0.95),
            "max": lengths[-1] if lengths else 0,
            "mean": round(total / len(lengths), 2) if lengths else 0.0,
        },
    }


def run_tokenize(config: Any, tokenized_dir: Path, stats_path: Path) -> dict[str, Any]:
    """The tokenize stage: every prepared split -> a `datasets` split of input_ids/labels, plus stats."""
    from datasets import Dataset, DatasetDict

    from .modeling import load_tokenizer
    from .outputs import read_jsonl, write_json

    data = config.data
    tokenizer = load_tokenizer(config.paths.base_model)
    splits, stats = {}, {"template": data.template, "max_length": data.max_length, "splits": {}}
    for name in ("train", "val", "test"):
        records = read_jsonl(Path(config.paths.prepared) / f"{name}.jsonl")
        examples = tokenize_records(records, tokenizer, data.template, data.system_prompt, data.max_length, data.train_on_prompt)
        splits[name] = Dataset.from_dict(
            {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
        )
        stats["splits"][name] = length_stats(examples)
    DatasetDict(splits).save_to_disk(str(tokenized_dir))
    write_json(stats_path, stats)
    return stats
