"""Records -> rendered conversations -> token ids with labels masked to the assistant turns.

A conversation is rendered as pieces `(text, trained)`: everything the model is given (system, user
turns, the template's headers) is untrained, each assistant answer with its end-of-turn is trained.
Each piece is tokenized on its own and the ids are concatenated, so generation, which feeds exactly
the pieces before the last answer, continues from the same boundary the model was trained on.
Raw text records are not masked: their tokens are joined with EOS and cut into `max_length` chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import DataCollatorForSeq2Seq

from .errors import TokenizationError
from .formats import Problem
from .progress import track

IGNORE_INDEX = -100

ALPACA_INTRO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_INTRO_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
TEXT_CHUNK_TOKENS = 1024
"""Raw text chunk length when data.max_length is null (transformers' run_clm block size), within the context."""
TEXT_PROMPT_TOKENS = 32
"""Raw text in evaluation: the model continues the first tokens (at most this many, at most half)."""


class BadExample(Exception):
    """A row that cannot become a correct example; `reason` is how `data.on_invalid` counts it."""

    reason = "bad example"


class TooLong(BadExample):
    """An example longer than max_length while truncation is off."""

    reason = "too long"


class SpecialTokenInText(BadExample):
    """A turn whose text spells one of the tokenizer's special tokens: it would be read as that control token
    (an end of turn in the middle of an answer, a fake new turn), so the masks would no longer mean what they say."""

    reason = "special token in text"


def special_tokens(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special tokens (BOS/EOS/PAD, chat markers such as <|im_end|>)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True)


def check_special_tokens(record: dict[str, Any], tokenizer: Any) -> None:
    specials = special_tokens(tokenizer)
    for turn in record["messages"]:
        for field in ("content", "input"):
            found = next((token for token in specials if token in turn.get(field, "")), None)
            if found:
                raise SpecialTokenInText(
                    f"{record['source']}: the {turn['role']} turn's {field} contains {found!r}, a special token of "
                    "the tokenizer: it would be read as that control token, not as text."
                )


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    source: str


def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto` becomes chat when the tokenizer has a chat template, else alpaca."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TokenizationError(
            "data.template=chat but the tokenizer has no chat template; use auto, alpaca, tags or custom."
        )
    return template


def user_text(turn: dict[str, str]) -> str:
    """A user turn as one message: its content, then its input (context) when there is one."""
    return f"{turn['content']}\n\n{turn['input']}" if turn.get("input") else turn["content"]


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the configured system prompt to a conversation that has none."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _chat_render(tokenizer: Any, messages: list[dict[str, str]], custom: str | None, generation: bool) -> str:
    plain = [{"role": m["role"], "content": user_text(m)} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            plain, chat_template=custom, add_generation_prompt=generation, tokenize=False
        )
    except Exception as exc:  # jinja2 raises several classes for a broken template
        where = "data.chat_template" if custom else "the tokenizer's chat template"
        raise TokenizationError(f"{where} failed to render: {str(exc).splitlines()[0]}") from None


def _chat_pieces(
    messages: list[dict[str, str]], tokenizer: Any, custom: str | None, source: str
) -> list[tuple[str, bool]]:
    pieces, rendered = [], ""
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = _chat_render(tokenizer, messages[:index], custom, generation=True)
        full = _chat_render(tokenizer, messages[: index + 1], custom, generation=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise TokenizationError(
                f"{source}: the chat template renders earlier turns differently once a later turn is added, so turns "
                "cannot be masked separately; use data.template=custom with a template that appends turns."
            )
        pieces += [(prompt[len(rendered) :], False), (full[len(prompt) :], True)]
        rendered = full
    return pieces


def _alpaca_pieces(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system else messages
    intro = ALPACA_INTRO_WITH_INPUT if turns[0].get("input") else ALPACA_INTRO
    pieces = []
    for index, turn in enumerate(turns):
        if turn["role"] == "assistant":
            pieces.append((turn["content"], True))
            continue
        text = f"### Instruction:\n{turn['content']}\n\n"
        if turn.get("input"):
            text += f"### Input:\n{turn['input']}\n\n"
        head = (f"{system}\n\n" if system else "") + intro if index == 0 else "\n\n"
        pieces.append((head + text + "### Response:\n", False))
    return pieces


def _tag_pieces(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    pieces, head = [], ""
    for turn in messages:
        if turn["role"] == "system":
            head = f"<|system|>\n{turn['content']}\n"
        elif turn["role"] == "user":
            pieces.append((f"{head}<|user|>\n{user_text(turn)}\n<|assistant|>\n", False))
            head = "\n"
        else:
            pieces.append((turn["content"], True))
    return pieces


def conversation_pieces(record: dict[str, Any], data: Any, tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as `(text, trained)` pieces in the configured template."""
    messages = with_system(record["messages"], data.system_prompt)
    template = resolve_template(data.template, tokenizer)
    if template in ("chat", "custom"):
        return _chat_pieces(messages, tokenizer, data.chat_template if template == "custom" else None, record["source"])
    if template == "alpaca":
        return _alpaca_pieces(messages)
    if template == "tags":
        return _tag_pieces(messages)
    raise TokenizationError(f"unknown data.template '{template}'; use auto, chat, alpaca, tags or custom.")


def encode_pieces(pieces: list[tuple[str, bool]], data: Any, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Token ids per piece; trained pieces end with EOS (added when the template's end-of-turn is not EOS).

    Chat templates write their own special tokens; plain templates get the tokenizer's (BOS) once."""
    plain = resolve_template(data.template, tokenizer) in ("alpaca", "tags")
    encoded = []
    for index, (text, trained) in enumerate(pieces):
        ids = tokenizer(text, add_special_tokens=plain and index == 0)["input_ids"]
        if trained and tokenizer.eos_token_id not in ids:
            ids = ids + [tokenizer.eos_token_id]
        encoded.append((ids, trained))
    return encoded


def build_example(record: dict[str, Any], data: Any, tokenizer: Any, limit: int | None = None) -> Example:
    """A conversation as ids and labels (IGNORE_INDEX except on assistant turns, unless train_on_prompt), at most
    `data.max_length` tokens long (when it is null: `limit`, the model's context; None: no bound)."""
    pieces = conversation_pieces(record, data, tokenizer)
    check_special_tokens(record, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in encode_pieces(pieces, data, tokenizer):
        input_ids += ids
        labels += ids if trained or data.train_on_prompt else [IGNORE_INDEX] * len(ids)
    example = Example(input_ids, labels, False, record["source"])
    bound, what = length_bound(data, limit)
    return fit_length(example, bound, data.truncate, what) if bound else example


def too_long_message(source: str, length: int, max_length: int, bound: str = "data.max_length") -> str:
    if bound == "data.max_length":
        return (
            f"{source}: {length} tokens, longer than data.max_length={max_length}. Raise data.max_length, set "
            "data.truncate=true, or set data.on_invalid=skip to drop it."
        )
    return (
        f"{source}: {length} tokens, longer than {bound} ({max_length} tokens). Shorten it, set data.truncate=true, "
        "or set data.on_invalid=skip to drop it."
    )


def length_bound(data: Any, context: int | None) -> tuple[int | None, str]:
    """The longest example allowed and what sets it: `data.max_length`, or when that is null (chosen from the
    data) the model's context (None: unknown, no bound)."""
    if data.max_length is not None:
        return data.max_length, "data.max_length"
    return context, "the model's context"


def text_chunk_length(data: Any, context: int | None) -> int:
    """Raw text chunk length: `data.max_length`, or when null `TEXT_CHUNK_TOKENS` within the model's context."""
    if data.max_length is not None:
        return data.max_length
    return min(TEXT_CHUNK_TOKENS, context) if context else TEXT_CHUNK_TOKENS


def fit_length(example: Example, max_length: int, truncate: bool, bound: str = "data.max_length") -> Example:
    """Cut an example to `max_length` when allowed; it must keep at least one trained token. `bound` names the
    limit in messages: data.max_length, or the model's context when data.max_length is chosen from the data."""
    if len(example.input_ids) <= max_length:
        return example
    limit = f"data.max_length={max_length}" if bound == "data.max_length" else f"{bound} ({max_length} tokens)"
    if not truncate:
        raise TooLong(too_long_message(example.source, len(example.input_ids), max_length, bound))
    labels = example.labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise TooLong(
            f"{example.source}: the prompt alone fills {limit}, leaving no answer token to train. "
            "Raise data.max_length or shorten the prompt."
        )
    return Example(example.input_ids[:max_length], labels, True, example.source)


def chunk_texts(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Example]:
    """Raw text for continued pre-training: each text + EOS, joined, cut into `max_length` chunks, all trained."""
    stream: list[tuple[int, str]] = []
    for record in records:
        ids = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id]
        stream += [(token, record["source"]) for token in ids]
    chunks = [stream[start : start + max_length] for start in range(0, len(stream), max_length)]
    return [Example([t for t, _ in chunk], [t for t, _ in chunk], False, chunk[0][1]) for chunk in chunks]


def generation_prompt(
    record: dict[str, Any], data: Any, tokenizer: Any, max_new_tokens: int
) -> tuple[str, list[int], str]:
    """What the model is given at test time (decoded from its ids, special tokens included), the ids, and the
    reference it should produce.

    Conversations: every piece before the last answer; the reference is that answer. Raw text: the
    first tokens (at most TEXT_PROMPT_TOKENS, at most half); the reference is what follows."""
    if "text" in record:
        ids = tokenizer(record["text"])["input_ids"]
        cut = max(1, min(TEXT_PROMPT_TOKENS, len(ids) // 2))
        reference = tokenizer.decode(ids[cut : cut + max_new_tokens], skip_special_tokens=True).strip()
        return tokenizer.decode(ids[:cut], skip_special_tokens=True), ids[:cut], reference
    pieces = conversation_pieces(record, data, tokenizer)
    ids = [t for piece, _ in encode_pieces(pieces[:-1], data, tokenizer) for t in piece]
    return tokenizer.decode(ids), ids, record["messages"][-1]["content"]


def padding_collator(tokenizer: Any) -> Any:
    """Pads each batch to its longest example (never to max_length); padded labels carry no loss."""
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)


def label_names(records: list[dict[str, Any]]) -> list[str]:
    """The classes of a training split in a fixed order (numerically when every label is a number)."""
    labels = {r["label"] for r in records}
    return sorted(labels, key=int) if all(label.lstrip("-").isdigit() for label in labels) else sorted(labels)


def classification_examples(
    records: list[dict[str, Any]], data: Any, tokenizer: Any, labels: list[str], issues: Any, context: int | None = None
) -> list[Example]:
    """Text -> token ids, with the class index as the only label; unseen classes and too-long texts go to `issues`."""
    index = {name: i for i, name in enumerate(labels)}
    bound, what = length_bound(data, context)
    examples, problems = [], []
    for record in records:
        if record["label"] not in index:
            problems.append(
                Problem(
                    record["source"],
                    "unknown label",
                    f"{record['source']}: label '{record['label']}' does not occur "
                    f"in the training split (classes: {', '.join(labels)}); fix the label or add training rows for it.",
                )
            )
            continue
        ids = tokenizer(record["text"])["input_ids"]
        example = Example(ids, [index[record["label"]]], False, record["source"])
        if bound and len(ids) > bound:
            if not data.truncate:
                message = too_long_message(record["source"], len(ids), bound, what)
                problems.append(Problem(record["source"], "too long", message))
                continue
            example = Example(ids[:bound], example.labels, True, record["source"])
        examples.append(example)
    issues.add(problems)
    return examples


def tokenize_split(
    records: list[dict[str, Any]],
    data: Any,
    tokenizer: Any,
    issues: Any,
    context: int | None = None,
    desc: str = "tokenize",
) -> list[Example]:
    """Conversations one by one (too-long ones and bad ones go to `issues`), then the split's raw text in chunks.
    `context`: the model's, the bound when data.max_length is null."""
    examples, bad = [], []
    conversations = [r for r in records if "text" not in r]
    for record in track(conversations, desc=desc, unit="example") if conversations else ():
        try:
            examples.append(build_example(record, data, tokenizer, context))
        except BadExample as exc:
            bad.append(Problem(record["source"], exc.reason, str(exc)))
    issues.add(bad)
    texts = [r for r in records if "text" in r]
    return examples + (chunk_texts(texts, tokenizer, text_chunk_length(data, context)) if texts else [])


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


def tokenize_splits(
    records: dict[str, list[dict[str, Any]]],
    data: Any,
    tokenizer: Any,
    classify: bool,
    issues: Any,
    context: int | None = None,
) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """Every split's records as examples (classification: text and class index), with the stats of each
    split and the template used; the classes come from the training split.

    `max_length` in the stats is the longest sequence training will see: `data.max_length` when set, else
    (chosen from the data) the longest example, each bounded by the model's `context`."""
    template = "none (classification)" if classify else resolve_template(data.template, tokenizer)
    stats: dict[str, Any] = {"template": template, "max_length": data.max_length, "splits": {}}
    if classify:
        stats["labels"] = label_names(records["train"])
    examples = {}
    for name, split in records.items():
        if classify:
            examples[name] = classification_examples(split, data, tokenizer, stats["labels"], issues, context)
        else:
            examples[name] = tokenize_split(split, data, tokenizer, issues, context, f"tokenize {name}")
        stats["splits"][name] = length_stats(examples[name])
    stats.update(issues.stats())
    stats["model_context"] = context
    if data.max_length is None:
        stats["max_length"] = max(s["length"]["max"] for s in stats["splits"].values())
        stats["max_length_chosen"] = f"from the data: the longest example ({stats['max_length']} tokens)" + (
            f", within the model's context of {context} tokens" if context else ""
        )
    else:
        stats["max_length_chosen"] = "set by data.max_length"
    for name in ("train", "test"):
        if not examples[name]:
            raise TokenizationError(
                f"the {name} split has no example left after tokenizing: {issues.stats()['dropped']}."
            )
    return examples, stats
