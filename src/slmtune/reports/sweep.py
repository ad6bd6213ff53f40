"""`slmtune sweep`'s report: experiments ranked by the chosen metric with their swept parameters, the best
configuration, failures, and the metric plotted against each swept parameter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metrics import SWEEP_COLUMNS
from . import plt, save_figure, short_number


@dataclass
class SweepOutcome:
    """What a finished sweep knows: each experiment's params and metrics, its state and MLflow run."""

    rows: dict[str, dict[str, Any]]
    """Experiment name -> flat params and metrics, as `dvc exp show` lists them (finished ones)."""
    states: dict[str, str]
    """Experiment name -> Success or Failed (every queued one)."""
    children: dict[str, str]
    """Experiment name -> its MLflow child run id."""
    swept: list[str]
    """The keys that took several values."""
    metric: str
    """The ranking metric, as `dvc exp show` names it (tuned.loss)."""
    order: str
    """min or max."""
    parent_id: str
    """The sweep's MLflow parent run."""
    stopped: str | None = None
    """Why the sweep stopped before every experiment finished (an interruption), or None."""

    def ranked(self) -> list[str]:
        return rank_experiments(self.rows, self.metric, self.order)


def rank_experiments(rows: dict[str, dict[str, Any]], metric: str, order: str) -> list[str]:
    """Experiment names, best first by `metric` (min or max); experiments without it go last."""

    def key(name: str) -> tuple[bool, float]:
        value = rows[name].get(metric)
        if not isinstance(value, (int, float)):
            return (True, 0.0)
        return (False, value if order == "min" else -value)

    return sorted(rows, key=key)


def param_text(value: Any) -> str:
    """A swept parameter's value as an override would give it: `dvc exp show` reads every number as a float,
    so 120000 comes back as 120000.0 (shown as `1.2e+05` by a metric's format, which an int key then rejects)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render_sweep_report(sweep: SweepOutcome, plot_link: str) -> str:
    """`sweep.md`: params x metrics sorted by the chosen metric, the best configuration, failures, plot."""
    rows, swept, metric = sweep.rows, sweep.swept, sweep.metric
    ranked = sweep.ranked()
    metrics = [metric] + [f"tuned.{m}" for m in SWEEP_COLUMNS if f"tuned.{m}" != metric]
    header = ["rank", "experiment", *swept, *metrics, "verdict", "MLflow run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h == "rank" else "---" for h in header) + "|"]
    for rank, name in enumerate(ranked, start=1):
        row = rows[name]
        values = (
            [param_text(row.get(k)) for k in swept]
            + [short_number(row.get(k)) for k in metrics]
            + [str(row.get("verdict.result", "–"))]
        )
        lines.append("| " + " | ".join([str(rank), f"`{name}`", *values, f"`{sweep.children.get(name, '')}`"]) + " |")
    failed = sorted(name for name, state in sweep.states.items() if state not in ("Success", "Killed"))
    killed = sorted(name for name, state in sweep.states.items() if state == "Killed")
    best = ranked[0] if ranked else None
    better = "lower" if sweep.order == "min" else "higher"
    parts = [
        "# Sweep\n",
        f"{len(sweep.states)} experiments over {', '.join(f'`{k}`' for k in swept) or 'no swept key'}, ranked by "
        f"`{metric}` ({better} is better). MLflow parent run `{sweep.parent_id}`.\n",
        "\n".join(lines) + "\n",
    ]
    if best:
        settings = ", ".join(f"`{k}={param_text(rows[best].get(k))}`" for k in swept)
        tied = [name for name in ranked[1:] if rows[name].get(metric) == rows[best].get(metric)]
        tie = (
            f" Tied on `{metric}` with {', '.join(f'`{name}`' for name in tied)}: the ranking cannot tell them apart "
            "(ties keep the order `dvc exp show` lists them in); choose by another column, or measure on a larger "
            "validation split."
            if tied
            else ""
        )
        parts.append(
            f"## Best configuration\n\n`{best}`: {settings}, `{metric}` = {short_number(rows[best].get(metric))}."
            f"{tie}\n\nBring it into the workspace with `dvc exp apply {best}` (its params, dvc.lock and outputs), "
            "then commit.\n"
        )
    if sweep.stopped:
        parts.append(
            f"## Interrupted\n\n{sweep.stopped[0].upper() + sweep.stopped[1:]}: {len(rows)} of {len(sweep.states)} "
            "experiments finished. Not finished (stopped, their MLflow runs KILLED): "
            + (", ".join(f"`{name}`" for name in killed) or "none")
            + ". Run the same `slmtune sweep` command again to finish them: the finished ones are restored from "
            "DVC's run cache, not trained again.\n"
        )
    if failed:
        parts.append("## Failed\n\n" + "\n".join(f"- `{name}`: see `dvc queue logs {name}`" for name in failed) + "\n")
    parts.append(f"## `{metric}` against each swept parameter\n\n![{metric} per swept parameter]({plot_link})\n")
    return "\n".join(parts)


def plot_sweep(path: Path, sweep: SweepOutcome) -> None:
    """One panel per swept parameter: the metric against its values, a line per setting of the others."""
    rows, swept, metric = sweep.rows, sweep.swept, sweep.metric
    panels = swept or ["experiment"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, key in zip(axes[0], panels):
        others = [k for k in swept if k != key]
        lines: dict[str, list[tuple[Any, float]]] = {}
        for name, row in rows.items():
            if isinstance(row.get(metric), (int, float)):
                label = ", ".join(f"{k}={short_number(row.get(k))}" for k in others) or metric
                lines.setdefault(label, []).append((row.get(key, name), float(row[metric])))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
            xs = [str(x) if isinstance(x, str) else x for x, _ in points]
            axis.plot(xs, [y for _, y in points], marker="o", label=label)
        numeric = sorted({x for pts in lines.values() for x, _ in pts if isinstance(x, (int, float))})
        if numeric and min(numeric) > 0 and max(numeric) / min(numeric) >= 10:
            axis.set_xscale("log")
        if numeric:
            axis.set_xticks(numeric, [short_number(float(x)) for x in numeric])  # the swept values, not a dense axis
            axis.minorticks_off()
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        if len(lines) > 1:
            axis.legend(fontsize="small")
    save_figure(figure, path)
