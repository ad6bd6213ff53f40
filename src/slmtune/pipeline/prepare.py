"""The prepare stage: raw data sources -> validated, de-duplicated records split into train/val/test."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data import PreparedData, prepare_data
from ..outputs import write_json, write_jsonl


def run_prepare(config: Config, prepared_dir: Path, stats_path: Path) -> PreparedData:
    """Write `<split>.jsonl` for each split into `prepared_dir` and the row statistics to `stats_path`."""
    prepared = prepare_data(config.data)
    prepared_dir.mkdir(parents=True)
    for name, records in prepared.splits.items():
        write_jsonl(prepared_dir / f"{name}.jsonl", records)
    write_json(stats_path, prepared.stats)
    return prepared
