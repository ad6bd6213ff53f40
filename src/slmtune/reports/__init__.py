"""The reports the pipeline writes for people, one module each: `data` (the tokenize stage's data report and
length histogram), `before_after` (the report stage's before/after report, loss curve and metric bars) and
`sweep` (`slmtune sweep`'s ranked table and plot). This module holds what they share: markdown tables,
number formatting and writing a chart without a timestamp (same figures, same bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402 (after choosing the backend)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def short_number(value: Any) -> str:
    """A table cell or axis label: floats to 4 significant digits, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_figure(figure: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG (no timestamp in its metadata) and close it."""
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
