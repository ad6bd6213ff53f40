"""`slmtune data add FILE`: a user's data file to a ready pipeline without writing config by hand.

It reads the file (every format of `formats`), recognises its shape from the columns and values
(instruction/input/output, Dolly, prompt/response, question/answer, chat messages, ShareGPT, raw text,
text + label), validates every row as `prepare` will, measures the token lengths with the base model's
tokenizer in the training template, and only then writes: the file copied under `paths.raw_data` when it
lives elsewhere, `conf/data/<name>.yaml`, the `data:` default of `conf/config.yaml`, and `params.yaml`.
A file it cannot place, a row problem it cannot skip, or a name already taken stop before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CONF_DIR, CONF_NAME, PARAMS_FILE, SourceConfig, compose_params
from .errors import ConfigError, DataError
from .formats import Problem, Row, read_source, source_format

INSTRUCTION_COLUMNS = ("instruction", "prompt", "question", "query", "input")
"""Columns that can hold the user's request, in order of preference (`input` only when nothing else does)."""
OUTPUT_COLUMNS = ("output", "response", "answer", "completion", "target")
CONTEXT_COLUMNS = ("input", "context")
SYSTEM_COLUMNS = ("system", "system_prompt")
CATEGORY_COLUMNS = ("category",)
FACTS_COLUMNS = ("facts", "key_facts")
"""An answer's key facts, checked by fact accuracy (a list, or `;`-separated)."""
CHAT_COLUMNS = ("messages", "conversations", "conversation", "chat", "dialog", "turns")
TEXT_COLUMNS = ("text", "content", "document", "sentence", "review")
LABEL_COLUMNS = ("label", "labels", "class", "sentiment")
KNOWN_SHAPES = (
    "instruction/input/output (Alpaca)",
    "instruction/context/response (Dolly)",
    "prompt/response or prompt/completion",
    "question/answer",
    "messages (role/content turns)",
    "conversations (ShareGPT from/value)",
    "text (raw text, or a .txt file)",
    "text/label (classification)",
)
LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class Shape:
    """A recognised shape: the source kind, the record field -> column mapping, and a name for people."""

    kind: str
    name: str
    columns: dict[str, str] = field(default_factory=dict)


def _find(present: dict[str, str], names: tuple[str, ...], taken: set[str] = frozenset()) -> str | None:
    """The file's column (original spelling) for the first of `names` it has, matched case-insensitively."""
    for name in names:
        column = present.get(name)
        if column is not None and column not in taken:
            return column
    return None


def _is_turn_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(t, dict) and ({"role", "content"} <= t.keys() or {"from", "value"} <= t.keys()) for t in value
        )
    )


def detect_shape(rows: list[Row], path: str) -> Shape:
    """The shape of a source's rows; DataError naming the columns found and the shapes known when none fits."""
    present: dict[str, str] = {}
    for row in rows:
        for column in row.values:
            present.setdefault(str(column).lower(), column)
    turn_columns = [c for c in present.values() if any(_is_turn_list(r.values.get(c)) for r in rows[:50])]
    if turn_columns:
        named = _find(present, CHAT_COLUMNS)
        column = named if named in turn_columns else turn_columns[0]
        sample = next(r.values[column] for r in rows if _is_turn_list(r.values.get(column)))
        name = "conversations (ShareGPT from/value)" if "from" in sample[0] else "messages (role/content turns)"
        mapping = {"messages": column, "system": _find(present, SYSTEM_COLUMNS), "facts": _find(present, FACTS_COLUMNS)}
        return _shape("chat", name, mapping)
    output = _find(present, OUTPUT_COLUMNS)
    instruction = _find(present, INSTRUCTION_COLUMNS[:-1]) or (_find(present, ("input",)) if output else None)
    if instruction and output:
        context = _find(present, CONTEXT_COLUMNS, {instruction, output})
        lowered = {instruction.lower(), output.lower()}
        name = {
            frozenset({"instruction", "output"}): "instruction/input/output (Alpaca)",
            frozenset({"instruction", "response"}): "instruction/context/response (Dolly)",
            frozenset({"question", "answer"}): "question/answer",
        }.get(frozenset(lowered), f"{instruction}/{output}")
        mapping = {
            "instruction": instruction,
            "input": context,
            "output": output,
            "system": _find(present, SYSTEM_COLUMNS),
            "category": _find(present, CATEGORY_COLUMNS),
            "facts": _find(present, FACTS_COLUMNS),
        }
        return _shape("instruction", name, mapping)
    text = _find(present, TEXT_COLUMNS)
    label = _find(present, LABEL_COLUMNS)
    if text and label:
        return _shape("label", "text/label (classification)", {"text": text, "label": label})
    if text and not output:
        return _shape("text", "text (raw text)", {"text": text, "category": _find(present, CATEGORY_COLUMNS)})
    found = ", ".join(present.values()) or "none"
    raise DataError(
        f"{path}: cannot tell what the columns mean (found: {found}); known shapes: {'; '.join(KNOWN_SHAPES)}. "
        "Rename the columns to one of these, or write conf/data/<name>.yaml with a columns mapping "
        "(docs/configuration.md)."
    )


def _shape(kind: str, name: str, mapping: dict[str, str | None]) -> Shape:
    """Only the fields found, and only those whose column is not already the field's own name."""
    columns = {f: c for f, c in mapping.items() if c is not None and c != f}
    return Shape(kind, name, columns)


def _default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "data"
    return name if name[0].isalpha() else f"data_{name}"


def length_summary(lengths: list[int]) -> list[str]:
    """Percentiles and a histogram by power-of-two buckets, as lines for the terminal."""
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    lines = [
        f"  tokens per example: min {ordered[0]}, median {at(0.5)}, p90 {at(0.9)}, p99 {at(0.99)}, max {ordered[-1]}"
    ]
    counts = Counter(next((b for b in LENGTH_BUCKETS if n <= b), None) for n in ordered)
    widest = max(counts.values())
    previous = 0
    for bucket in [*LENGTH_BUCKETS, None]:
        if counts.get(bucket):
            label = f"{previous + 1}-{bucket}" if bucket else f">{LENGTH_BUCKETS[-1]}"
            bar = "#" * max(1, round(30 * counts[bucket] / widest))
            lines.append(f"  {label:>11} {counts[bucket]:6d} {bar}")
        previous = bucket or previous
    return lines


def _set_data_default(config_text: str, name: str, config_path: Path) -> str:
    pattern = re.compile(r"^(\s*-\s*data:\s*)([\w.-]+)(.*)$", re.MULTILINE)
    if not pattern.search(config_text):
        raise ConfigError(
            f"{config_path}: no `- data: <preset>` line in its defaults list to point at the new data; add one "
            "(as in the shipped conf/config.yaml) and run the command again."
        )
    return pattern.sub(lambda m: f"{m.group(1)}{name}{m.group(3)}", config_text, count=1)


def _preset_yaml(
    name: str, source: SourceConfig, shape: Shape, command: str, rows: int, skip: bool, context_note: str
) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"# Added by `{command}` on {today}: {rows} rows, shape {shape.name}.",
        f"# {context_note}",
    ]
    body = [f"  {name}:", f"    path: {source.path}"]
    if source.format != "auto":
        body.append(f"    format: {source.format}")
    if shape.kind != "instruction":
        body.append(f"    kind: {shape.kind}")
    if shape.columns:
        body.append("    columns:")
        body += [f"      {field_name}: {column}" for field_name, column in shape.columns.items()]
    data = ["sources:", *body]
    if skip:
        data.append("on_invalid: skip  # rows that fail validation are dropped and listed in reports/data_report.md")
    if shape.kind == "label":  # classification: the model's task changes too, so this preset sets both
        return (
            "\n".join(
                ["# @package _global_", *lines, "data:", *[f"  {x}" for x in data], "model:", "  task: classification"]
            )
            + "\n"
        )
    return "\n".join([*lines, *data]) + "\n"


def add_data(root: Path, file: str, name: str | None, force: bool) -> int:
    """Recognise, validate and measure `file`; write its preset, make it the default, compose params.yaml."""
    from .data import find_duplicates, read_records  # datasets / pyarrow only when a command needs them
    from .modeling import load_source_tokenizer
    from .prompting import BadExample, build_example, length_bound, text_chunk_length

    root = root.resolve()
    with tempfile.TemporaryDirectory() as scratch:  # conf/ as it stands (params.yaml may be stale)
        config = compose_params(root, Path(scratch) / PARAMS_FILE)
    raw_dir = root / config.paths.raw_data
    given = Path(file).expanduser()
    given = given if given.is_absolute() else Path.cwd() / given
    if not given.exists():
        raise DataError(f"{file}: not found. Give the path of a data file (or a save_to_disk folder).")
    name = name or _default_name(given)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits and underscores, starting with a letter.")
    preset = root / CONF_DIR / "data" / f"{name}.yaml"
    if preset.exists() and not force:
        raise ConfigError(f"{preset.relative_to(root)} exists; choose another --name, or pass --force to replace it.")
    inside = raw_dir.resolve() in given.resolve().parents
    target = given.resolve() if inside else raw_dir / given.name
    if not inside and target.exists() and not _same_content(given, target):
        raise DataError(
            f"{target.relative_to(root)} exists with other content; rename {given.name} or remove the old file."
        )
    relative = target.relative_to(root).as_posix()

    fmt = source_format(str(given), "auto")
    rows, unreadable = read_source(str(given), fmt)
    if not rows:
        raise DataError(f"{file}: no readable row ({len(unreadable)} unreadable); fix the file and try again.")
    shape = detect_shape(rows, file)
    print(f"{file}: {len(rows) + len(unreadable)} rows, {fmt}; shape {shape.name}")
    for field_name, column in shape.columns.items():
        print(f"  {field_name} <- column '{column}'")

    source = SourceConfig(path=str(given), kind=shape.kind, columns=dict(shape.columns))
    records, problems, _ = read_records(name, source, (rows, unreadable))
    records, duplicates = find_duplicates(records)
    problems += duplicates

    tokenizer, context = load_source_tokenizer(config.model)
    data = dataclasses.replace(config.data, max_length=None, sources={name: source})  # every length, unbounded
    lengths: list[int] = []
    if shape.kind in ("text", "label"):
        lengths = [len(tokenizer(r["text"])["input_ids"]) for r in records]
    else:
        for record in records:
            try:
                lengths.append(len(build_example(record, data, tokenizer, None).input_ids))
            except BadExample as exc:
                problems.append(Problem(record["source"], exc.reason, str(exc)))
    bound, what = length_bound(config.data, context)
    over = [] if shape.kind == "text" or config.data.truncate or not bound else [n for n in lengths if n > bound]
    if not lengths:
        raise DataError(f"no row of {file} is valid; the first problem: {problems[0].message if problems else 'none'}")
    print(f"validated: {len(lengths) - len(over)} of {len(rows) + len(unreadable)} rows usable")
    reasons = Counter(p.reason for p in problems)
    if over:
        reasons[f"longer than {what} ({bound} tokens)"] = len(over)
    for problem in problems[:5]:
        print(f"  {problem.message}")
    if reasons:
        print("  dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())))
    print(f"token lengths with the base model's tokenizer ({config.model.source}), template {config.data.template}:")
    for line in length_summary(lengths):
        print(line)
    if config.data.max_length is not None:
        chosen = f"data.max_length={bound} is set in conf/; longer rows follow data.on_invalid"
    elif shape.kind == "text":
        chosen = f"raw text is cut into chunks of {text_chunk_length(config.data, context)} tokens"
    else:
        longest = max(n for n in lengths if not bound or n <= bound)
        chosen = f"max_length {longest}, the longest example" + (
            f", within the model's context of {context}" if context else ""
        )
        chosen += " (the tokenize stage chooses it from the data: data.max_length is null)"
    print(f"length: {chosen}")

    # everything checked: now write (the copy, the preset, the default, params.yaml), undoing it all on failure
    config_file = root / CONF_DIR / f"{CONF_NAME}.yaml"
    config_text = config_file.read_text(encoding="utf-8")
    new_config = _set_data_default(config_text, name, config_file)
    command = f"slmtune data add {file}" + (f" --name {name}" if name != _default_name(given) else "")
    written_source = SourceConfig(path=relative, kind=shape.kind, columns=dict(shape.columns))
    skip = bool(reasons)
    note = (
        f"Model context {context} tokens; max_length chosen from the data."
        if context
        else "max_length chosen from the data."
    )
    old_preset = preset.read_text(encoding="utf-8") if preset.exists() else None
    copied = False
    try:
        if not inside and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if given.is_dir() else shutil.copy2)(given, target)
            copied = True
        preset.write_text(
            _preset_yaml(name, written_source, shape, command, len(rows) + len(unreadable), skip, note),
            encoding="utf-8",
        )
        config_file.write_text(new_config, encoding="utf-8")
        compose_params(root, root / PARAMS_FILE)
    except BaseException:
        config_file.write_text(config_text, encoding="utf-8")
        if old_preset is None:
            preset.unlink(missing_ok=True)
        else:
            preset.write_text(old_preset, encoding="utf-8")
        if copied:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        raise
    if copied:
        print(f"copied to {relative} (prepare depends on {config.paths.raw_data}/, so DVC tracks it)")
    print(
        f"wrote {preset.relative_to(root)}"
        + (" (rows that fail validation are skipped: on_invalid: skip)" if skip else "")
    )
    print(f"{CONF_DIR}/{CONF_NAME}.yaml: data default is now {name}; wrote {PARAMS_FILE}")
    print("next: dvc repro   (then open reports/before_after.md)")
    return 0


def _same_content(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
