"""Raw data -> validated, normalised records -> deterministic train/val/test splits.

A record is a plain dict: `instruction`, `input`, `output`, optional `system` and `category`, and
`source` ("file:line") so every later error can point back at the row it came from.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "system", "category")
RECORD_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data, worded for the person who has to fix the file."""


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a `.csv` or `.jsonl` file as (line number, column -> value) pairs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Set data.path to an existing .csv or .jsonl file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}). Re-save the file as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty. It needs a header row (CSV) or JSON lines with at least one example.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix in {".jsonl", ".json"}:
        return _read_jsonl(path, text)
    raise DataError(f"{path}: unsupported file type '{suffix}'. Use .csv or .jsonl.")


def _read_csv(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num}: more fields than the header has columns.")
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: broken CSV ({exc}).") from None
    if not rows:
        raise DataError(f"{path}: has a header but no data rows.")
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append((number, row))
    return rows


def normalise_rows(
    rows: Iterable[tuple[int, dict[str, Any]]], columns: dict[str, str], source_name: str
) -> list[dict[str, str]]:
    """Map columns to record fields, check required fields are non-empty strings, strip whitespace."""
    rows = list(rows)
    unknown = set(columns) - set(RECORD_FIELDS)
    if unknown:
        raise DataError(f"data.columns: unknown record field(s) {sorted(unknown)}; use {list(RECORD_FIELDS)}.")
    present = set().union(*(row.keys() for _, row in rows)) if rows else set()
    missing = [f"'{columns[f]}'" for f in REQUIRED_FIELDS if columns[f] not in present]
    if missing:
        raise DataError(
            f"{source_name}: missing column(s) {', '.join(missing)} (found: {', '.join(sorted(present)) or 'none'}). "
            "Rename them in the file or map them with data.columns."
        )
    records = []
    for line, row in rows:
        record = {"source": f"{source_name}:{line}"}
        for field_name in RECORD_FIELDS:
            column = columns.get(field_name)
            value = row.get(column) if column else None
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise DataError(
                    f"{source_name} line {line}: column '{column}' must be text, got {type(value).__name__}."
                )
            record[field_name] = value.strip()
        for field_name in REQUIRED_FIELDS:
            if not record[field_name]:
                raise DataError(f"{source_name} line {line}: column '{columns[field_name]}' is empty.")
        records.append(record)
    return records


def prompt_key(record: dict[str, str]) -> tuple[str, str, str]:
    """What the model is asked: system, instruction and input."""
    return record.get("system", ""), record["instruction"], record.get("input", "")


def _content_key(record: dict[str, str]) -> tuple[str, ...]:
    return tuple(record.get(f, "") for f in RECORD_FIELDS)


def drop_exact_duplicates(records: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Keep the first of each identical record; return the kept records and the sources dropped."""
    seen: set[tuple[str, ...]] = set()
    kept, dropped = [], []
    for record in records:
        key = _content_key(record)
        if key in seen:
            dropped.append(record["source"])
        else:
            seen.add(key)
            kept.append(record)
    return kept, dropped


def split_records(
    records: list[dict[str, str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Deterministic split by prompt: records sharing a prompt always land in the same split."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for record in records:
        groups.setdefault(prompt_key(record), []).append(record)
    keys = sorted(groups)
    if len(keys) < 3:
        raise DataError(f"only {len(keys)} distinct prompt(s); train, val and test need at least 3.")
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(len(keys) * test_fraction))
    n_val = round(len(keys) * val_fraction)
    if n_test + n_val >= len(keys):
        raise DataError(
            f"{len(keys)} distinct prompts leave no training data with val_fraction={val_fraction} "
            f"and test_fraction={test_fraction}."
        )
    parts = {"test": keys[:n_test], "val": keys[n_test : n_test + n_val], "train": keys[n_test + n_val :]}
    return {name: [r for key in parts[name] for r in groups[key]] for name in SPLITS}


def leaked_prompts(train: list[dict[str, str]], test: list[dict[str, str]]) -> list[str]:
    """Sources of test records whose prompt also appears in the training split."""
    train_prompts = {prompt_key(r) for r in train}
    return [r["source"] for r in test if prompt_key(r) in train_prompts]


@dataclass
class PreparedData:
    """The result of `prepare_data`: the splits and their statistics."""

    splits: dict[str, list[dict[str, str]]]
    stats: dict[str, Any]


def prepare_data(
    path: str | Path, columns: dict[str, str], val_fraction: float, test_fraction: float, seed: int
) -> PreparedData:
    """Read, validate, normalise, de-duplicate and split one raw data file."""
    path = Path(path)
    rows = read_rows(path)
    records = normalise_rows(rows, columns, str(path))
    kept, dropped = drop_exact_duplicates(records)
    splits = split_records(kept, val_fraction, test_fraction, seed)
    leaks = leaked_prompts(splits["train"], splits["test"])
    if leaks:
        raise DataError(f"test prompts also in train: {', '.join(leaks[:5])}; the split must keep them apart.")
    stats = {
        "source": str(path),
        "rows_read": len(records),
        "duplicates_dropped": len(dropped),
        "duplicate_sources": dropped,
        "split_seed": seed,
        "rows": {name: len(part) for name, part in splits.items()},
    }
    return PreparedData(splits=splits, stats=stats)


def run_prepare(config: Any, prepared_dir: Path, stats_path: Path) -> PreparedData:
    """The prepare stage: write `<split>.jsonl` for each split and the stats JSON."""
    from .outputs import write_json, write_jsonl

    data = config.data
    prepared = prepare_data(data.path, dict(data.columns), data.val_fraction, data.test_fraction, data.split_seed)
    prepared_dir.mkdir(parents=True)
    for name, records in prepared.splits.items():
        write_jsonl(prepared_dir / f"{name}.jsonl", records)
    write_json(stats_path, prepared.stats)
    return prepared
