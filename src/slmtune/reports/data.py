"""The tokenize stage's data report: rows per source and split, drops by reason, token lengths and the
trained share, with a histogram of lengths per split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import SPLIT_NAMES
from . import plt, save_figure, table

SKIPPED_LISTED = 100
"""Skipped rows listed in the data report; data_stats.json and token_stats.json list them all."""


def augment_line(stats: dict[str, Any] | None) -> str:
    """What knowledge augmentation added to the training split."""
    if not stats or not stats.get("generated"):
        return "Knowledge augmentation: off (augment.generator=none).\n\n" if stats else ""
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in stats["by_kind"].items())
    return (
        f"Knowledge augmentation ({stats['generator']}): {stats['generated']} generated training rows ({kinds}) from "
        f"{stats['sources_augmented']} of {stats['original']} training examples; {stats['dropped_leaks']} dropped "
        f"because they matched a validation or test prompt, {stats.get('dropped_ambiguous', 0)} because two different "
        "answers claimed the same question. The train split below includes them (statements as text are "
        "chunked like raw text).\n\n"
    )


def render_data_report(
    data_stats: dict[str, Any], token_stats: dict[str, Any], plot_link: str, augment_stats: dict[str, Any] | None = None
) -> str:
    """`data_report.md`: rows per split and source, drops by reason, token lengths and the trained share."""
    splits = list(SPLIT_NAMES)
    by_source = data_stats["rows_by_source"]
    sources = [
        [f"`{name}`", f"`{info['path']}`", info["kind"], info["rows_read"]]
        + [by_source[split].get(name, 0) for split in splits]
        + [info["weight"], info["split"] or "random"]
        for name, info in data_stats["sources"].items()
    ]
    lengths = []
    for name in splits:
        tok = token_stats["splits"][name]
        length = tok["length"]
        lengths.append(
            [name, data_stats["rows"][name], tok["examples"], tok["tokens"], f"{tok['trained_share']:.1%}"]
            + [length[key] for key in ("min", "p50", "p90", "p95", "max")]
            + [tok["truncated"]]
        )
    reasons = sorted(set(data_stats["dropped"]) | set(token_stats["dropped"]))
    dropped = [
        [reason, data_stats["dropped"].get(reason, 0), token_stats["dropped"].get(reason, 0)] for reason in reasons
    ]
    skipped = data_stats["skipped"] + token_stats["skipped"]
    listed = "\n".join(f"- `{row['location']}` ({row['reason']}): {row['message']}" for row in skipped[:SKIPPED_LISTED])
    if len(skipped) > SKIPPED_LISTED:
        listed += f"\n- … {len(skipped) - SKIPPED_LISTED} more in reports/data_stats.json and reports/token_stats.json"
    length_header = ["split", "rows", "examples", "tokens", "trained share", "min", "p50", "p90", "p95", "max"]
    return (
        "# Data report\n\n"
        f"Template `{token_stats['template']}`, max length {token_stats['max_length']} tokens "
        f"({token_stats.get('max_length_chosen', 'set by data.max_length')}), "
        f"invalid rows: {data_stats['on_invalid']}, split seed {data_stats['split_seed']}.\n\n"
        + augment_line(augment_stats)
        + "## Rows per source and split\n\n"
        + table(["source", "path", "kind", "rows read", *splits, "weight", "split"], sources)
        + "\n\nTraining rows are counted after weighting.\n\n## Token lengths per split\n\n"
        + table([*length_header, "truncated"], lengths)
        + f"\n\n![Token lengths per split]({plot_link})\n\n## Dropped rows\n\n"
        + (
            table(["reason", "prepare", "tokenize"], dropped) + "\n\n" + listed
            if skipped
            else "None: every row was used."
        )
        + "\n"
    )


def plot_lengths(path: Path, lengths: dict[str, list[int]]) -> None:
    """Histogram of example lengths (tokens) per split."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    longest = max((max(v) for v in lengths.values() if v), default=1)
    bins = list(range(0, longest + max(1, longest // 30) + 1, max(1, longest // 30)))
    for name, values in lengths.items():
        if values:
            axes.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.legend()
    save_figure(figure, path)
