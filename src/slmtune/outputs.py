"""Atomic stage outputs: a stage's outputs appear all together, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiskSpaceError


@contextmanager
def staged_outputs(*targets: str | Path) -> Iterator[list[Path]]:
    """Yield a temporary path for each target; move them all into place only if the block succeeds.

    Temporaries live next to their target (same filesystem, so the final move is a rename) and are
    removed on failure, so an interrupted or failing stage leaves no partial output behind.
    """
    finals = [Path(t) for t in targets]
    temps: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            temps.append(tmp_dir / final.name)
        yield temps
        for tmp, final in zip(temps, finals):
            if not tmp.exists():
                raise RuntimeError(f"stage did not write its declared output {final}")
        for tmp, final in zip(temps, finals):
            _replace(tmp, final)
    finally:
        for tmp in temps:
            shutil.rmtree(tmp.parent, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.replace(source, target)


def write_json(path: str | Path, data: Any) -> None:
    """Write pretty, key-sorted JSON with a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by `write_jsonl`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_free_space(folder: str | Path, needed: int, what: str, fix: str) -> None:
    """Raise a one-line error when the disk holding `folder` has less than `needed` bytes free."""
    probe = Path(folder).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: {free / 1e9:.2f} GB free on its disk, {what} needs about {needed / 1e9:.2f} GB; {fix}"
        )
