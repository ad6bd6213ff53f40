"""Raw rows -> validated records -> deterministic train/val/test splits.

A record is plain data with `source` (the row's location), `origin` (the source's name in config) and
`category`, plus either `messages` (system/user/assistant turns, the last one from the assistant) or
`text` (raw text for continued pre-training). Every problem with a row is a `Problem`; the policy
`data.on_invalid` either stops at the first one (fail) or drops the rows and counts them (skip).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import KIND_FIELDS, SPLIT_NAMES, SourceConfig
from .errors import DataError
from .formats import Problem, Row, read_source, source_format

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
TAG = re.compile(r"<\|(system|user|assistant)\|>")
REQUIRED = {
    "instruction": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "label": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
DESIRABLE = {"true": True, "1": True, "yes": True, "desirable": True, "good": True}
UNDESIRABLE = {"false": False, "0": False, "no": False, "undesirable": False, "bad": False}


class RowProblem(Exception):
    """Raised while normalising one row; becomes a `Problem`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def column_of(source: SourceConfig, field_name: str) -> str:
    """The column that holds a record field in this source."""
    return source.columns.get(field_name, field_name)


def _text(values: dict[str, Any], column: str, required: bool) -> str:
    if column not in values:
        if required:
            raise RowProblem("missing field", f"column '{column}' is missing")
        return ""
    value = values[column]
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"column '{column}' must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise RowProblem("empty field", f"column '{column}' is empty")
    return value


def _label(values: dict[str, Any], column: str) -> str:
    """A class label: text, or an integer class id (kept as its decimal text)."""
    value = values.get(column)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(values, column, True)


def parse_tagged(text: str) -> list[dict[str, str]]:
    """`<|user|> hi <|assistant|> hello` -> turns; text before the first tag is a user turn."""
    parts = TAG.split(text)
    turns = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": role, "content": content.strip()})
    return turns


def _turn(value: Any, index: int, column: str) -> dict[str, str]:
    where = f"column '{column}' turn {index}"
    if not isinstance(value, dict):
        raise RowProblem(
            "wrong type", f"{where} must be an object with role/content (or from/value), got {type(value).__name__}"
        )
    role = value.get("role", value.get("from"))
    content = value.get("content", value.get("value"))
    if role is None or content is None:
        raise RowProblem("missing field", f"{where} needs 'role' and 'content' (or ShareGPT 'from' and 'value')")
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        raise RowProblem("wrong type", f"{where} has role {role!r}; use system, user/human or assistant/gpt")
    if not isinstance(content, str):
        raise RowProblem("wrong type", f"{where} content must be text, got {type(content).__name__}")
    return {"role": ROLE_ALIASES[role.lower()], "content": content.strip()}


def check_conversation(turns: list[dict[str, str]], column: str) -> list[dict[str, str]]:
    """Optional system turn, then user/assistant alternating, ending with the assistant; no empty turn."""
    for index, turn in enumerate(turns, start=1):
        if not turn["content"] and not (turn["role"] == "user" and turn.get("input")):
            raise RowProblem("empty field", f"column '{column}' turn {index} ({turn['role']}) is empty")
    offset = 1 if turns and turns[0]["role"] == "system" else 0
    body = turns[offset:]
    if not body:
        raise RowProblem("empty field", f"column '{column}' has no user or assistant turn")
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise RowProblem(
                "bad conversation",
                f"column '{column}' turn {offset + index + 1} is from {turn['role']} where {expected} was expected "
                "(after an optional system turn, user and assistant must alternate)",
            )
    if body[-1]["role"] != "assistant":
        raise RowProblem(
            "bad conversation", f"column '{column}' ends with a user turn; the last turn must be the assistant's answer"
        )
    return turns


def _instruction_turns(values: dict[str, Any], source: SourceConfig) -> list[dict[str, str]]:
    instruction = source.instruction or _text(values, column_of(source, "instruction"), True)
    context = _text(values, column_of(source, "input"), False)
    output = _text(values, column_of(source, "output"), True)
    system = _text(values, column_of(source, "system"), False)
    turns = parse_tagged(instruction) if TAG.search(instruction) else [{"role": "user", "content": instruction}]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    if context:
        turns[-1] = {**turns[-1], "input": context}
    answer = TAG.sub("", output, count=1).strip() if output.startswith("<|assistant|>") else output
    turns.append({"role": "assistant", "content": answer})
    if system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    return check_conversation(turns, column_of(source, "instruction"))


def _chat_turns(values: dict[str, Any], source: SourceConfig) -> list[dict[str, str]]:
    column = column_of(source, "messages")
    if column not in values:
        raise RowProblem("missing field", f"column '{column}' is missing")
    raw = values[column]
    if isinstance(raw, str):
        turns = parse_tagged(raw)
    elif isinstance(raw, list):
        turns = [_turn(value, index, column) for index, value in enumerate(raw, start=1)]
    else:
        raise RowProblem(
            "wrong type", f"column '{column}' must be a list of turns or tagged text, got {type(raw).__name__}"
        )
    system = _text(values, column_of(source, "system"), False)
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return check_conversation(turns, column)


def _prompt_turns(values: dict[str, Any], source: SourceConfig) -> list[dict[str, str]]:
    """A preference row's prompt as turns ending with the user's: plain text, `<|user|>`-tagged text (a trailing
    empty `<|assistant|>` tag is dropped) or a list of messages."""
    column = column_of(source, "prompt")
    raw = values.get(column)
    if isinstance(raw, list):
        turns = [_turn(value, index, column) for index, value in enumerate(raw, start=1)]
    else:
        text = _text(values, column, True)
        turns = parse_tagged(text) if TAG.search(text) else [{"role": "user", "content": text}]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    system = _text(values, column_of(source, "system"), False)
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    check_conversation([*turns, {"role": "assistant", "content": "-"}], column)
    return turns


def _answer(values: dict[str, Any], source: SourceConfig, field_name: str) -> str:
    """An answer of a preference row: text (a leading `<|assistant|>` tag is dropped) or a one-message list
    `[{"role": "assistant", "content": ...}]` (TRL's conversational format)."""
    column = column_of(source, field_name)
    raw = values.get(column)
    if isinstance(raw, list):
        if len(raw) != 1:
            raise RowProblem("wrong type", f"column '{column}' must be text or one assistant message, got {len(raw)}")
        turn = _turn(raw[0], 1, column)
        if turn["role"] != "assistant":
            raise RowProblem(
                "wrong type", f"column '{column}' turn 1 is from {turn['role']}; it must be the assistant's"
            )
        raw = turn["content"]
        values = {column: raw}
    text = _text(values, column, True)
    return TAG.sub("", text, count=1).strip() if text.startswith("<|assistant|>") else text


def _desirable(values: dict[str, Any], column: str) -> bool:
    """A KTO label: a boolean, 0/1, or true/false, yes/no, desirable/undesirable, good/bad."""
    value = values.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = _text(values, column, True).lower()
    if text in DESIRABLE or text in UNDESIRABLE:
        return DESIRABLE.get(text, False)
    raise RowProblem(
        "wrong type", f"column '{column}' must be true or false (or 1/0, desirable/undesirable), not {text!r}"
    )


def _preference_fields(values: dict[str, Any], source: SourceConfig) -> dict[str, Any]:
    record: dict[str, Any] = {"messages": _prompt_turns(values, source)}
    if source.kind == "unpaired":
        record["completion"] = _answer(values, source, "completion")
        record["label"] = _desirable(values, column_of(source, "label"))
        return record
    record["chosen"] = _answer(values, source, "chosen")
    record["rejected"] = _answer(values, source, "rejected")
    if normalise_text(record["chosen"]) == normalise_text(record["rejected"]):
        raise RowProblem(
            "same answers",
            f"columns '{column_of(source, 'chosen')}' and '{column_of(source, 'rejected')}' hold the same answer; "
            "a pair needs a better and a worse one",
        )
    return record


def row_to_record(row: Row, source: SourceConfig, origin: str) -> dict[str, Any]:
    """A validated record of one row; raises RowProblem."""
    record: dict[str, Any] = {"source": row.location, "origin": origin}
    record["category"] = _text(row.values, column_of(source, "category"), False)
    if source.kind in ("preference", "unpaired"):
        record |= _preference_fields(row.values, source)
    elif source.kind in ("text", "label"):
        record["text"] = _text(row.values, column_of(source, "text"), True)
        if source.kind == "label":
            record["label"] = _label(row.values, column_of(source, "label"))
    elif source.kind == "chat":
        record["messages"] = _chat_turns(row.values, source)
    else:
        record["messages"] = _instruction_turns(row.values, source)
    if source.kind in ("instruction", "chat"):
        facts = _facts(row.values, column_of(source, "facts"))
        if facts:
            record["facts"] = facts
    return record


def _facts(values: dict[str, Any], column: str) -> list[str]:
    """The optional key facts of an answer (fact accuracy checks them): a list, or text split at `;`."""
    raw = values.get(column)
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return []
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(";") if item.strip()]
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return [item.strip() for item in raw if item.strip()]
    raise RowProblem("wrong type", f"column '{column}' must be a list of strings or ';'-separated text")


def normalise_text(text: str) -> str:
    """Lower case, punctuation and symbols removed, whitespace collapsed: the form leaks are compared in."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def _turn_text(turn: dict[str, str]) -> str:
    return f"{turn['role']}: {turn['content']} {turn.get('input', '')}"


def prompt_key(record: dict[str, Any]) -> str:
    """The normalised question: every turn before the final answer (raw text: the whole text)."""
    if "text" in record:
        return normalise_text(record["text"])
    return normalise_text(" ".join(_turn_text(t) for t in record["messages"][:-1]))


def content_key(record: dict[str, Any]) -> str:
    """The normalised record: question and answer."""
    if "text" in record:
        return prompt_key(record)
    return normalise_text(" ".join(_turn_text(t) for t in record["messages"]))


def _missing_columns(rows: list[Row], source: SourceConfig) -> list[str]:
    """Required columns that no row has: a mapping problem, not a row problem."""
    present = set().union(*(row.values.keys() for row in rows)) if rows else set()
    required = [f for f in REQUIRED[source.kind] if not (f == "instruction" and source.instruction)]
    return [column_of(source, f) for f in required if column_of(source, f) not in present]


def read_records(
    name: str, source: SourceConfig, read: tuple[list[Row], list[Problem]] | None = None, section: str = "data"
) -> tuple[list[dict[str, Any]], list[Problem], int]:
    """Records of one source, the problems of its rows, and how many rows were read (`read`: the source's rows
    and unreadable rows when the caller has read them already; `section`: where the source is configured, data
    or align)."""
    rows, unreadable = read or read_source(
        source.path, source_format(source.path, source.format), source.dataset_split, source.revision
    )
    missing = _missing_columns(rows, source)
    if rows and missing:
        present = sorted(set().union(*(row.values.keys() for row in rows)))
        raise DataError(
            f"{source.path}: missing column(s) {', '.join(repr(c) for c in missing)} (found: "
            f"{', '.join(present) or 'none'}). "
            f"Rename them in the file or map them with {section}.sources.{name}.columns "
            f"(fields for kind {source.kind}: {', '.join(KIND_FIELDS[source.kind])})."
        )
    records, problems = [], list(unreadable)
    for row in rows:
        try:
            records.append(row_to_record(row, source, name))
        except RowProblem as exc:
            problems.append(Problem(row.location, exc.reason, f"{row.location}: {exc.detail}."))
    return records, problems, len(rows) + len(unreadable)


def find_duplicates(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Keep the first of records that are equal once normalised; the others are problems."""
    first: dict[str, str] = {}
    kept, problems = [], []
    for record in records:
        key = content_key(record)
        if key in first:
            location = record["source"]
            problems.append(
                Problem(
                    location,
                    "duplicate",
                    f"{location}: duplicate of {first[key]} (same text up to case, spacing and punctuation).",
                )
            )
        else:
            first[key] = record["source"]
            kept.append(record)
    return kept, problems


def random_split(
    records: list[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic split by normalised prompt: records asking the same thing share a split."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(prompt_key(record), []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = round(len(keys) * test_fraction)
    n_val = round(len(keys) * val_fraction)
    if keys and n_test + n_val >= len(keys):
        raise DataError(
            f"{len(keys)} distinct prompts leave no training data with data.val_fraction={val_fraction} "
            f"and data.test_fraction={test_fraction}; lower them or add data."
        )
    parts = {"test": keys[:n_test], "val": keys[n_test : n_test + n_val], "train": keys[n_test + n_val :]}
    return {name: [r for key in parts[name] for r in groups[key]] for name in SPLIT_NAMES}


def answer_key(record: dict[str, Any]) -> str:
    """The normalised final answer of a conversation ('' for raw text and labels)."""
    turns = record.get("messages") or []
    return normalise_text(turns[-1]["content"]) if turns and turns[-1]["role"] == "assistant" else ""


def answers_into_train(splits: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Knowledge data: an answer asked in several wordings, all of them held out (in validation or test), gets one
    row moved into training, so that held-out questions ask about trained facts in new words. Validation rows move
    first, so that the test split changes least; answers given once stay where they are."""
    trained = {answer_key(record) for record in splits["train"]}
    counts = Counter(answer_key(record) for part in splits.values() for record in part)
    moved: list[dict[str, Any]] = []
    for name in ("val", "test"):
        kept = []
        for record in splits[name]:
            key = answer_key(record)
            if key and counts[key] > 1 and key not in trained:
                trained.add(key)
                moved.append(record)
            else:
                kept.append(record)
        splits[name] = kept
    return splits | {"train": splits["train"] + moved}


def find_leaks(splits: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Training records whose normalised prompt is also asked in val or test: the training copies are problems."""
    held_out: dict[str, str] = {}
    for name in ("test", "val"):
        for record in splits[name]:
            held_out.setdefault(prompt_key(record), f"{name} ({record['source']})")
    kept, problems = [], []
    for record in splits["train"]:
        other = held_out.get(prompt_key(record))
        if other:
            problems.append(
                Problem(
                    record["source"],
                    "leak",
                    f"{record['source']}: training prompt also in {other} (compared ignoring case, spacing and "
                    "punctuation).",
                )
            )
        else:
            kept.append(record)
    return kept, problems


def weighted(records: list[dict[str, Any]], weights: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Training records resampled per source: whole repeats for the integer part, a seeded sample for the rest."""
    rng = random.Random(seed)
    result = []
    for origin in sorted({r["origin"] for r in records}, key=list(weights).index):
        own = [r for r in records if r["origin"] == origin]
        whole, fraction = divmod(weights[origin], 1.0)
        result += own * int(whole)
        result += rng.sample(own, round(len(own) * fraction))
    return result


@dataclass
class Issues:
    """Problems found so far, and the policy that decides what they do."""

    policy: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, found: list[Problem]) -> None:
        if found and self.policy == "fail":
            first = found[0]
            more = f" ({len(found) - 1} more like it)" if len(found) > 1 else ""
            raise DataError(
                f"{first.message.rstrip('.')}{more}. Fix the data, or set data.on_invalid=skip to drop and count such "
                "rows."
            )
        self.problems += found

    def stats(self) -> dict[str, Any]:
        return {
            "dropped": dict(sorted(Counter(p.reason for p in self.problems).items())),
            "skipped": [{"location": p.location, "reason": p.reason, "message": p.message} for p in self.problems],
        }


@dataclass
class PreparedData:
    """The result of `prepare_data`: the splits and their statistics."""

    splits: dict[str, list[dict[str, Any]]]
    stats: dict[str, Any]


def prepare_data(data: Any) -> PreparedData:
    """Read every source, validate and de-duplicate rows, split, check leaks, weight the training mix."""
    issues = Issues(data.on_invalid)
    records, sources = [], {}
    for name, source in data.sources.items():
        found, problems, rows_read = read_records(name, source)
        issues.add(problems)
        records += found
        sources[name] = {
            "path": source.path,
            "kind": source.kind,
            "rows_read": rows_read,
            "split": source.split,
            "weight": source.weight,
        }
    records, duplicates = find_duplicates(records)
    issues.add(duplicates)
    given = [r for r in records if data.sources[r["origin"]].split is None]
    splits = random_split(given, data.val_fraction, data.test_fraction, data.split_seed)
    if data.every_answer_in_train:
        splits = answers_into_train(splits)
    for record in records:
        if data.sources[record["origin"]].split is not None:
            splits[data.sources[record["origin"]].split].append(record)
    splits["train"], leaks = find_leaks(splits)
    issues.add(leaks)
    for name in ("train", "test"):
        if not splits[name]:
            raise DataError(
                f"the {name} split is empty; add data, give a source split: {name}, or change data.test_fraction."
            )
    weights = {name: source.weight for name, source in data.sources.items()}
    splits["train"] = weighted(splits["train"], weights, data.split_seed)
    stats = {
        "sources": sources,
        "rows": {name: len(part) for name, part in splits.items()},
        "rows_by_source": {name: dict(Counter(r["origin"] for r in part)) for name, part in splits.items()},
        "on_invalid": data.on_invalid,
        "split_seed": data.split_seed,
        **issues.stats(),
    }
    return PreparedData(splits=splits, stats=stats)
