"""The reports: the data report (prepare + tokenize) and the before/after report (evaluate)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import SPLIT_NAMES, Config
from .lineage import dvc_lock_hashes, read_provenance
from .outputs import read_jsonl, staged_outputs
from .tracking import mlflow_run

METRIC_ROWS = (
    ("loss", "Test loss (response tokens)", "lower"),
    ("perplexity", "Perplexity", "lower"),
    ("bleu", "BLEU-4 (corpus)", "higher"),
    ("rouge1", "ROUGE-1 F1", "higher"),
    ("rouge2", "ROUGE-2 F1", "higher"),
    ("rougeL", "ROUGE-L F1", "higher"),
    ("exact_match", "Exact match", "higher"),
    ("token_f1", "Token F1", "higher"),
    ("contains", "Contains reference", "higher"),
)
CLASSIFICATION_ROWS = (
    ("accuracy", "Accuracy", "higher"),
    ("f1", "Macro F1", "higher"),
    ("loss", "Test loss (cross-entropy)", "lower"),
)


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def metric_rows(metrics: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """The (key, label, better) rows this evaluation has (older metrics files lack some)."""
    rows = CLASSIFICATION_ROWS if "accuracy" in metrics["base"] else METRIC_ROWS
    return tuple(row for row in rows if row[0] in metrics["base"])


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of base vs tuned metrics with the change."""
    lines = ["| metric | base | tuned | change | better |", "|---|---:|---:|---:|---|"]
    for key, label, better in metric_rows(metrics):
        base, tuned = metrics["base"][key], metrics["tuned"][key]
        lines.append(f"| {label} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} | {better} |")
    return "\n".join(lines)


CATEGORY_METRICS = (("loss", "loss"), ("rougeL", "ROUGE-L"), ("token_f1", "token F1"), ("exact_match", "EM"), ("bleu", "BLEU"))


def category_table(metrics: dict[str, Any]) -> str:
    """Per category: examples, then base -> tuned for the main metrics (BLEU: mean sentence BLEU)."""
    categories = metrics.get("by_category")
    if not categories:
        return ""
    header = ["category", "examples"] + [f"{label} base → tuned" for _, label in CATEGORY_METRICS]
    rows = [[name, entry["examples"]] + [f"{entry['base'][key]:.3f} → {entry['tuned'][key]:.3f}" for key, _ in CATEGORY_METRICS]
            for name, entry in sorted(categories.items())]  # fmt: skip
    return "## By category\n\n" + _table(header, rows) + "\n\n"


def checks_section(metrics: dict[str, Any]) -> str:
    """The merge parity and quality gate results, where this evaluation ran them."""
    lines = []
    parity = metrics.get("merge_parity")
    if parity:
        verdict = "PASS" if parity["ok"] else "FAIL"
        lines.append(f"- Merge parity: **{verdict}**. Test loss base + adapter {parity['adapter_loss']:.6f}, merged "
                     f"{parity['merged_loss']:.6f} (difference {parity['loss_difference']:.2e}, tolerance {parity['tolerance']:.0e}); "
                     f"{parity['identical_answers']} of {parity['answers']} greedy answers identical.")  # fmt: skip
    gate = metrics.get("quality_gate")
    if gate:
        lines.append(f"- Quality gate on {gate['metric']}: **{'PASS' if gate['passed'] else 'FAIL'}**. Base {gate['base']:.4f}, "
                     f"tuned {gate['tuned']:.4f}, drop {gate['drop']:+.4f} (allowed {gate['max_drop']}).")  # fmt: skip
    else:
        lines.append("- Quality gate: off (set `eval.gate_metric` to fail the evaluate stage when tuned is worse than base).")
    settings = metrics.get("generation")
    if settings:
        lines.append("- Generation: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    return "## Checks\n\n" + "\n".join(lines) + "\n\n"


def plot_loss(path: Path, train_log: Path) -> None:
    """Training loss per step (the train stage's log), as a PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with open(train_log, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker="." if len(rows) < 60 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def plot_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Base vs tuned bars for every test metric: scores in [0, 1] on one panel, loss and perplexity on another."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = metric_rows(metrics)
    scores = [row for row in rows if row[2] == "higher"]
    losses = [row for row in rows if row[2] == "lower"]
    figure, panels = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [max(len(scores), 1), max(len(losses), 1)]})
    for axes, group, title in ((panels[0], scores, "higher is better"), (panels[1], losses, "lower is better")):
        positions = range(len(group))
        for offset, model in ((-0.2, "base"), (0.2, "tuned")):
            values = [metrics[model][key] for key, _, _ in group]
            bars = axes.bar([p + offset for p in positions], values, width=0.4, label=model)
            axes.bar_label(bars, fmt="%.2f", fontsize=7)
        axes.set_xticks(list(positions), [key for key, _, _ in group], rotation=30, ha="right")
        axes.set_title(title)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def predictions_section(generations: list[dict[str, Any]]) -> str:
    """Classification: each test text with its label and both models' predictions."""
    lines = ["| # | text | label | base | tuned |", "|---:|---|---|---|---|"]
    for number, row in enumerate(generations, start=1):
        text = row["question"].replace("|", "\\|")
        marks = {name: ("✓" if row[f"{name}_correct"] else "✗") for name in ("base", "tuned")}
        lines.append(f"| {number} | {text} | {row['reference']} | {row['base']} {marks['base']} | {row['tuned']} {marks['tuned']} |")
    return "\n".join(lines) + "\n"


def _scores(row: dict[str, Any], model: str) -> str:
    shown = [("rougeL", "ROUGE-L"), ("token_f1", "token F1"), ("contains", "contains")]
    return ", ".join(f"{label} {row[f'{model}_{key}']:.2f}" for key, label in shown if f"{model}_{key}" in row)


def answers_section(generations: list[dict[str, Any]]) -> str:
    """Each test prompt with its reference and both answers (classification: a table of predictions)."""
    if generations and "base_correct" in generations[0]:
        return predictions_section(generations)
    parts = []
    for number, row in enumerate(generations, start=1):
        parts.append(
            f"### {number}. {row['question']}\n\n"
            f"*source: `{row['source']}`*\n\n"
            f"**Prompt (as the model sees it)**\n\n```text\n{row['prompt'].rstrip()}\n```\n\n"
            f"**Reference**\n\n{_quote(row['reference'])}\n\n"
            f"**Base model** ({_scores(row, 'base')})\n\n{_quote(row['base'])}\n\n"
            f"**Fine-tuned** ({_scores(row, 'tuned')})\n\n{_quote(row['tuned'])}\n"
        )
    return "\n".join(parts)


def lineage_section(provenance: dict[str, Any], eval_run_id: str, lock_hashes: dict[str, str], params: dict[str, Any]) -> str:
    """Run ids, DVC experiment, commit, DVC md5s of data and models, and the resolved parameters."""
    git, exp = provenance["git"], provenance.get("dvc", {})
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    lines = [
        f"- MLflow run: `{provenance['mlflow']['run_id']}` (experiment {provenance['mlflow']['experiment_id']})"
        + (f", evaluation run `{eval_run_id}`" if eval_run_id != provenance["mlflow"]["run_id"] else ""),
        f"- DVC experiment: `{exp.get('exp_name', 'unknown')}`, baseline `{exp.get('baseline_rev', 'unknown')}`",
        f"- Git commit: `{git.get('commit') or 'unknown'}`{dirty}",
        "",
        "| artifact | DVC md5 (dvc.lock) |",
        "|---|---|",
    ]
    lines += [f"| `{path}` | `{md5}` |" for path, md5 in sorted(lock_hashes.items())]
    lines += ["", "Resolved parameters:", "", "```yaml", yaml.safe_dump(params, sort_keys=True).rstrip(), "```"]
    return "\n".join(lines)


def render_report(
    metrics: dict[str, Any],
    generations: list[dict[str, Any]],
    provenance: dict[str, Any],
    lock_hashes: dict[str, str],
    params: dict[str, Any],
    figures: dict[str, str] | None = None,
) -> str:
    """The whole `before_after.md`."""
    source_list = ", ".join(f"`{source['path']}`" for source in params["data"]["sources"].values())
    return (
        "# Before and after fine-tuning\n\n"
        f"Model `{params['model']['source']}` ({params['model'].get('task', 'causal_lm')}), method {params['method']['name']}"
        f"{'' if params['method'].get('adapter') == 'none' else ' (r=' + str(params['method']['r']) + ')'}, data {source_list}, "
        f"{metrics['test_examples']} test prompts.\n\n"
        f"## Metrics\n\n{metrics_table(metrics)}\n\n"
        + "".join(f"![{name}]({link})\n\n" for name, link in (figures or {}).items())
        + category_table(metrics)
        + checks_section(metrics)
        + f"## Answers\n\n{answers_section(generations)}\n"
        f"## Lineage\n\n{lineage_section(provenance, metrics['mlflow_run_id'], lock_hashes, params)}\n"
    )


def run_report(config: Config, report_path: Path, loss_plot: Path, metrics_plot: Path) -> None:
    """The report stage: render `before_after.md` and log it to the pipeline's MLflow run."""
    import json

    import mlflow

    metrics = json.loads(Path(config.paths.metrics).read_text(encoding="utf-8"))
    generations = read_jsonl(config.paths.generations)
    provenance = read_provenance(config.paths.adapter)
    paths = config.paths
    wanted = {paths.raw_data, paths.base_model, paths.prepared, paths.tokenized, paths.adapter}
    lock_hashes = {path: md5 for path, md5 in dvc_lock_hashes().items() if path in wanted}
    plot_loss(loss_plot, Path(paths.train_log))
    plot_metrics(metrics_plot, metrics)
    figures = {name: os.path.relpath(target, Path(paths.report).parent)
               for name, target in (("training loss", paths.loss_plot), ("base vs tuned", paths.metrics_plot))}  # fmt: skip
    report = render_report(metrics, generations, provenance, lock_hashes, provenance["config"], figures)
    report_path.write_text(report, encoding="utf-8")
    with mlflow_run(config.tracking, run_id=metrics["mlflow_run_id"]):
        mlflow.log_artifact(str(report_path), "reports")
        mlflow.log_artifact(str(loss_plot), "reports")
        mlflow.log_artifact(str(metrics_plot), "reports")



SKIPPED_LISTED = 100
"""Skipped rows listed in the data report; data_stats.json and token_stats.json list them all."""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def render_data_report(data_stats: dict[str, Any], token_stats: dict[str, Any], plot_link: str) -> str:
    """`data_report.md`: rows per split and source, drops by reason, token lengths and the trained share."""
    splits = list(SPLIT_NAMES)
    by_source = data_stats["rows_by_source"]
    sources = [
        [f"`{name}`", f"`{info['path']}`", info["kind"], info["rows_read"], *(by_source[s].get(name, 0) for s in splits),
         info["weight"], info["split"] or "random"]
        for name, info in data_stats["sources"].items()
    ]  # fmt: skip
    lengths = []
    for name in splits:
        tok = token_stats["splits"][name]
        length = tok["length"]
        lengths.append([name, data_stats["rows"][name], tok["examples"], tok["tokens"], f"{tok['trained_share']:.1%}",
                        length["min"], length["p50"], length["p90"], length["p95"], length["max"], tok["truncated"]])  # fmt: skip
    reasons = sorted(set(data_stats["dropped"]) | set(token_stats["dropped"]))
    dropped = [[reason, data_stats["dropped"].get(reason, 0), token_stats["dropped"].get(reason, 0)] for reason in reasons]
    skipped = data_stats["skipped"] + token_stats["skipped"]
    listed = "\n".join(f"- `{row['location']}` ({row['reason']}): {row['message']}" for row in skipped[:SKIPPED_LISTED])
    if len(skipped) > SKIPPED_LISTED:
        listed += f"\n- … {len(skipped) - SKIPPED_LISTED} more in reports/data_stats.json and reports/token_stats.json"
    return (
        "# Data report\n\n"
        f"Template `{token_stats['template']}`, max length {token_stats['max_length']} tokens, "
        f"invalid rows: {data_stats['on_invalid']}, split seed {data_stats['split_seed']}.\n\n"
        "## Rows per source and split\n\n"
        + _table(["source", "path", "kind", "rows read", *splits, "weight", "split"], sources)
        + "\n\nTraining rows are counted after weighting.\n\n## Token lengths per split\n\n"
        + _table(["split", "rows", "examples", "tokens", "trained share", "min", "p50", "p90", "p95", "max", "truncated"], lengths)
        + f"\n\n![Token lengths per split]({plot_link})\n\n## Dropped rows\n\n"
        + (_table(["reason", "prepare", "tokenize"], dropped) + "\n\n" + listed if skipped else "None: every row was used.")
        + "\n"
    )


def plot_lengths(path: Path, lengths: dict[str, list[int]]) -> None:
    """Histogram of example lengths (tokens) per split, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    longest = max((max(v) for v in lengths.values() if v), default=1)
    bins = list(range(0, longest + max(1, longest // 30) + 1, max(1, longest // 30)))
    for name, values in lengths.items():
        if values:
            axes.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def write_data_report(report_path: Path, plot_path: Path, plot_link: str, data_stats: dict[str, Any], token_stats: dict[str, Any], lengths: dict[str, list[int]]) -> None:
    """Write the data report and its length histogram."""
    plot_lengths(plot_path, lengths)
    report_path.write_text(render_data_report(data_stats, token_stats, plot_link), encoding="utf-8")


SWEEP_METRICS = ("tuned.loss", "tuned.perplexity", "tuned.rougeL", "tuned.contains")


def rank_experiments(rows: dict[str, dict[str, Any]], metric: str, order: str) -> list[str]:
    """Experiment names, best first by `metric` (min or max); experiments without it go last."""
    def key(name: str) -> tuple[bool, float]:
        value = rows[name].get(metric)
        if not isinstance(value, (int, float)):
            return (True, 0.0)
        return (False, value if order == "min" else -value)

    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_sweep_report(rows: dict[str, dict[str, Any]], states: dict[str, str], children: dict[str, str],
                        swept: list[str], metric: str, order: str, parent_id: str, plot_link: str) -> str:  # fmt: skip
    """`sweep.md`: params x metrics sorted by the chosen metric, the best configuration, failures, plot."""
    ranked = rank_experiments(rows, metric, order)
    metrics = [metric] + [m for m in SWEEP_METRICS if m != metric]
    header = ["rank", "experiment", *swept, *metrics, "MLflow run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h == "rank" else "---" for h in header) + "|"]
    for rank, name in enumerate(ranked, start=1):
        row = rows[name]
        cells = [str(rank), f"`{name}`", *(_cell(row.get(k)) for k in swept), *(_cell(row.get(m)) for m in metrics), f"`{children.get(name, '')}`"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = sorted(name for name, state in states.items() if state != "Success")
    best = ranked[0] if ranked else None
    parts = [
        "# Sweep\n",
        f"{len(states)} experiments over {', '.join(f'`{k}`' for k in swept) or 'no swept key'}, ranked by "
        f"`{metric}` ({'lower' if order == 'min' else 'higher'} is better). MLflow parent run `{parent_id}`.\n",
        "\n".join(lines) + "\n",
    ]
    if best:
        settings = ", ".join(f"`{k}={_cell(rows[best].get(k))}`" for k in swept)
        parts.append(
            f"## Best configuration\n\n`{best}`: {settings}, `{metric}` = {_cell(rows[best].get(metric))}.\n\n"
            f"Bring it into the workspace with `dvc exp apply {best}` (its params, dvc.lock and outputs), "
            "then commit.\n"
        )
    if failed:
        parts.append("## Failed\n\n" + "\n".join(f"- `{name}`: see `dvc queue logs {name}`" for name in failed) + "\n")
    parts.append(f"## `{metric}` against each swept parameter\n\n![{metric} per swept parameter]({plot_link})\n")
    return "\n".join(parts)


def plot_sweep(path: Path, rows: dict[str, dict[str, Any]], swept: list[str], metric: str) -> None:
    """One panel per swept parameter: the metric against its values, a line per setting of the others."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = swept or ["experiment"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, key in zip(axes[0], panels):
        others = [k for k in swept if k != key]
        lines: dict[str, list[tuple[Any, float]]] = {}
        for name, row in rows.items():
            if isinstance(row.get(metric), (int, float)):
                label = ", ".join(f"{k}={_cell(row.get(k))}" for k in others) or metric
                lines.setdefault(label, []).append((row.get(key, name), float(row[metric])))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
            axis.plot([str(x) if isinstance(x, str) else x for x, _ in points], [y for _, y in points], marker="o", label=label)
        numeric = sorted({x for pts in lines.values() for x, _ in pts if isinstance(x, (int, float))})
        if numeric and min(numeric) > 0 and max(numeric) / min(numeric) >= 10:
            axis.set_xscale("log")
        if numeric:
            axis.set_xticks(numeric, [_cell(float(x)) for x in numeric])  # the swept values, not a dense axis
            axis.minorticks_off()
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        if len(lines) > 1:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def write_sweep_report(config: Config, rows: dict[str, dict[str, Any]], states: dict[str, str], children: dict[str, str],
                       swept: list[str], metric: str, order: str, parent_id: str) -> dict[str, Any]:  # fmt: skip
    """Write `sweep.md` and its plot; return the best experiment's name and metric value."""
    link = os.path.relpath(config.paths.sweep_plot, Path(config.paths.sweep_report).parent)
    with staged_outputs(config.paths.sweep_report, config.paths.sweep_plot) as (report_path, plot_path):
        plot_sweep(plot_path, rows, swept, metric)
        report = render_sweep_report(rows, states, children, swept, metric, order, parent_id, link)
        report_path.write_text(report, encoding="utf-8")
    ranked = rank_experiments(rows, metric, order)
    best = ranked[0] if ranked and isinstance(rows[ranked[0]].get(metric), (int, float)) else None
    return {"best": best, "best_value": float(rows[best][metric]) if best else None}
