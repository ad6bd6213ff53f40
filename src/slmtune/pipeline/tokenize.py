"""The tokenize stage: prepared records rendered with the template, labels masked to the answers, saved
as a `datasets` DatasetDict; token statistics and the data report with its length histogram."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..config import SPLIT_NAMES, Config
from ..data import Issues
from ..errors import MissingFileError
from ..modeling import load_tokenizer, model_context
from ..outputs import read_jsonl, write_json
from ..prompting import tokenize_splits
from ..reports.data import plot_lengths, render_data_report


def run_tokenize(
    config: Config, tokenized_dir: Path, stats_path: Path, report_path: Path, plot_path: Path
) -> dict[str, Any]:
    """Tokenize every prepared split into `tokenized_dir`; write the stats, the data report and its plot."""
    paths = config.paths
    tokenizer = load_tokenizer(paths.base_model)
    classify = config.model.task == "classification"
    # training rows from the augment stage (the prepared ones plus generated rows), the others as prepared
    folders = {name: paths.augmented if name == "train" else paths.prepared for name in SPLIT_NAMES}
    if not (Path(paths.augmented) / "train.jsonl").is_file():
        raise MissingFileError(f"{paths.augmented}/train.jsonl: not found; run the augment stage first (`dvc repro`).")
    records = {name: read_jsonl(Path(folders[name]) / f"{name}.jsonl") for name in SPLIT_NAMES}
    context = model_context(paths.base_model)
    examples, stats = tokenize_splits(
        records, config.data, tokenizer, classify, Issues(config.data.on_invalid), context
    )
    splits = {
        name: Dataset.from_dict(
            {
                "input_ids": [e.input_ids for e in split],
                "labels": [e.labels[0] if classify else e.labels for e in split],
                "source": [e.source for e in split],
            }
        )
        for name, split in examples.items()
    }
    # An empty split cannot be read back from disk (datasets 5.2), so a split without examples is left out.
    DatasetDict({name: split for name, split in splits.items() if len(split)}).save_to_disk(str(tokenized_dir))
    write_json(stats_path, stats)
    data_stats = json.loads(Path(paths.data_stats).read_text(encoding="utf-8"))
    augment_stats = json.loads(Path(paths.augment_stats).read_text(encoding="utf-8"))
    plot_lengths(plot_path, {name: [len(e.input_ids) for e in split] for name, split in examples.items()})
    plot_link = os.path.relpath(paths.length_plot, Path(paths.data_report).parent)
    report_path.write_text(render_data_report(data_stats, stats, plot_link, augment_stats), encoding="utf-8")
    return stats
