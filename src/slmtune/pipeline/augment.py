"""The augment stage: the prepared training split plus its generated rows (knowledge augmentation), and what was
generated. Validation and test stay as prepared; with augment.generator=none the training split passes through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..augmentation import augment_split
from ..config import SPLIT_NAMES, Config
from ..outputs import read_jsonl, write_json, write_jsonl


def run_augment(config: Config, augmented_dir: Path, stats_path: Path) -> dict[str, Any]:
    """Write `train.jsonl` (original rows first, then generated ones) into `augmented_dir` and the stats."""
    splits = {name: read_jsonl(Path(config.paths.prepared) / f"{name}.jsonl") for name in SPLIT_NAMES}
    train, stats = augment_split(splits, config.augment, config.paths.base_model, config.data.split_seed)
    augmented_dir.mkdir(parents=True)
    write_jsonl(augmented_dir / "train.jsonl", train)
    write_json(stats_path, stats)
    if stats["generated"]:
        kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in stats["by_kind"].items())
        print(
            f"augment ({stats['generator']}): {stats['generated']} rows from {stats['sources_augmented']} of "
            f"{stats['original']} training examples ({kinds}); {stats['dropped_leaks']} dropped as leaks, "
            f"{stats['dropped_ambiguous']} as questions two answers claim"
        )
    return stats
