"""Reading raw data sources into rows, one reader per format.

A reader returns every row it could read, as `Row(location, values)`, and every row it could not, as
`Problem(location, reason, message)`; only problems with the whole source (missing file, unknown
format, a JSON array that does not parse) raise `DataError` straight away. Locations are what a
person opens: `data/raw/kb.csv:12` for line-based files, `data/raw/kb.parquet row 5` otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
HUB_DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class Row:
    """One readable row: where it came from and its column values."""

    location: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """One row that cannot be used, with a short reason (for counting) and the full message."""

    location: str
    reason: str
    message: str


def source_format(path: str, declared: str) -> str:
    """The declared format, or the one implied by the file suffix (a folder is a save_to_disk dataset)."""
    if declared != "auto":
        return declared
    target = Path(path)
    if target.is_dir():
        return "disk"
    if target.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[target.suffix.lower()]
    raise DataError(
        f"{path}: cannot tell the format from '{target.suffix or target.name}'; "
        f"use one of {', '.join(SUFFIX_FORMATS)}, a save_to_disk folder, or set the source's format."
    )


def read_source(
    path: str, fmt: str, dataset_split: str | None = None, revision: str | None = None
) -> tuple[list[Row], list[Problem]]:
    """Rows and row-level problems of one source in format `fmt` (see `source_format`)."""
    if fmt == "hub":
        return _read_hub(path, dataset_split, revision), []
    target = Path(path)
    if not target.exists():
        raise DataError(f"{path}: file not found. Put it under the raw data folder or fix the source's path.")
    if fmt == "disk":
        return _read_disk(target, dataset_split), []
    if fmt == "parquet":
        return _read_parquet(target), []
    raw = target.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty. It needs a header row (CSV) or at least one example.")
    if fmt == "json":
        return _read_json_array(target, raw), []
    lines, problems = _decode_lines(target, raw)
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "txt": _read_paragraphs}
    if fmt not in readers:
        raise DataError(f"{path}: unknown format '{fmt}'.")
    rows, more = readers[fmt](target, lines)
    return rows, problems + more


def _decode_lines(path: Path, raw: bytes) -> tuple[list[str], list[Problem]]:
    """UTF-8 lines (a BOM is dropped); a line that does not decode becomes a problem and an empty line."""
    lines, problems = [], []
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            column = len(line[: exc.start].decode("utf-8", errors="replace")) + 1
            problems.append(
                Problem(
                    f"{path}:{number}",
                    "bad encoding",
                    f"{path}:{number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {column}). Re-save the file "
                    "as UTF-8.",
                )
            )
            lines.append("\n")
    return lines, problems


def _read_csv(path: Path, lines: list[str]) -> tuple[list[Row], list[Problem]]:
    # strict: a quote that never closes is an error at the end of the file, not a field that swallows the rest
    reader = csv.DictReader(io.StringIO("".join(lines), newline=""), strict=True)
    rows, problems = [], []
    start = 2  # the line a record starts on (a quoted field may span lines): what a person opens
    try:
        for values in reader:
            location = f"{path}:{start}"
            start = reader.line_num + 1
            if None in values:
                problems.append(
                    Problem(
                        location,
                        "wrong type",
                        f"{location}: more fields than the header has columns; quote fields that contain commas.",
                    )
                )
                continue
            rows.append(Row(location, values))
    except csv.Error as exc:
        raise DataError(
            f"{path}:{start}: broken CSV from this line on ({exc}); a field that opens with a quote must close with "
            "one, and a quote inside a quoted field is written twice."
        ) from None
    if not rows and not problems:
        raise DataError(f"{path}: has a header but no data rows.")
    return rows, problems


def _read_jsonl(path: Path, lines: list[str]) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            values = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            problems.append(
                Problem(location, "broken JSON", f"{location}: not valid JSON ({exc.msg} at column {exc.colno}).")
            )
            continue
        if not isinstance(values, dict):
            problems.append(
                Problem(location, "wrong type", f"{location}: expected a JSON object, got {type(values).__name__}.")
            )
            continue
        rows.append(Row(location, values))
    return rows, problems


def _read_paragraphs(path: Path, lines: list[str]) -> tuple[list[Row], list[Problem]]:
    """A plain-text file: one document per paragraph (blocks separated by blank lines)."""
    rows, block, start = [], [], 0
    for number, line in enumerate(lines + ["\n"], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line.rstrip("\r\n"))
        elif block:
            rows.append(Row(f"{path}:{start}", {"text": "\n".join(block)}))
            block = []
    return rows, []


def _read_json_array(path: Path, raw: bytes) -> list[Row]:
    """A `.json` file holding a list of objects (ShareGPT dumps, exported datasets)."""
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}). Re-save the file as UTF-8.") from None
    except json.JSONDecodeError as exc:
        hint = (
            " One JSON object per line is JSON Lines: name the file .jsonl or set format: jsonl."
            if exc.msg == "Extra data"
            else ""
        )
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).{hint}") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of objects, got {type(data).__name__}; use .jsonl for one object per line."
        )
    rows = []
    for index, values in enumerate(data, start=1):
        if not isinstance(values, dict):
            raise DataError(f"{path} row {index}: expected a JSON object, got {type(values).__name__}.")
        rows.append(Row(f"{path} row {index}", values))
    return rows


def _table_rows(name: str, records: list[dict[str, Any]]) -> list[Row]:
    return [Row(f"{name} row {index}", values) for index, values in enumerate(records, start=1)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq  # heavy imports, needed only for these formats: prepare starts in a blink
    from pyarrow import ArrowException

    try:
        table = pq.read_table(path)
    except (ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}).") from None
    return _table_rows(str(path), table.to_pylist())


def _read_disk(path: Path, dataset_split: str | None) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: not a folder written by `datasets` save_to_disk (no dataset_info.json / state.json)."
        ) from None
    if isinstance(dataset, DatasetDict):
        if dataset_split not in dataset:
            raise DataError(
                f"{path}: holds splits {', '.join(dataset)}; set the source's dataset_split to one of them "
                f"(got {dataset_split})."
            )
        dataset = dataset[dataset_split]
    return _table_rows(str(path), dataset.to_list())


def _read_hub(name: str, dataset_split: str | None, revision: str | None) -> list[Row]:
    """A hub dataset from the local Hugging Face cache (offline) or the hub (online)."""
    import datasets

    split = dataset_split or HUB_DEFAULT_SPLIT
    try:
        dataset = datasets.load_dataset(name, split=split, revision=revision)
    except ConnectionError:
        raise DataError(
            f"hub dataset '{name}': not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1). "
            "Download it once online (HF_HUB_OFFLINE=0 dvc repro) or copy it into HF_DATASETS_CACHE."
        ) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataError(f"hub dataset '{name}' split '{split}': {_first_line(exc)}") from None
    return _table_rows(f"hub:{name}", dataset.to_list())


def _first_line(exc: Exception) -> str:
    return re.sub(r"\s+", " ", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
