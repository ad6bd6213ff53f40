"""The report stage's `before_after.md`: base vs tuned metrics, per category, the checks, every answer and
the lineage; with the training loss curve and base vs tuned metric bars."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from ..metrics import ANSWER_SCORES, BY_TASK, CATEGORY_COLUMNS, PREFERENCE, Metric, short_name
from . import plt, save_figure, table


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def metric_rows(metrics: dict[str, Any]) -> tuple[Metric, ...]:
    """The registry's metrics this evaluation has, in report order (older metrics files lack some)."""
    task = "classification" if "accuracy" in metrics["base"] else "causal_lm"
    return tuple(metric for metric in BY_TASK[task] if metric.name in metrics["base"])


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of base vs tuned metrics with the change."""
    lines = ["| metric | base | tuned | change | better |", "|---|---:|---:|---:|---|"]
    for metric in metric_rows(metrics):
        base, tuned = metrics["base"][metric.name], metrics["tuned"][metric.name]
        better = "lower" if metric.direction == "min" else "higher"
        lines.append(f"| {metric.label} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} | {better} |")
    return "\n".join(lines)


def category_table(metrics: dict[str, Any]) -> str:
    """Per category: examples, then base -> tuned for the main metrics (BLEU: mean sentence BLEU)."""
    categories = metrics.get("by_category")
    if not categories:
        return ""
    header = ["category", "examples"] + [f"{short_name(key)} base → tuned" for key in CATEGORY_COLUMNS]
    rows = [
        [name, entry["examples"]]
        + [
            f"{entry['base'][key]:.3f} → {entry['tuned'][key]:.3f}" if key in entry["tuned"] else "–"  # no key facts
            for key in CATEGORY_COLUMNS
        ]
        for name, entry in sorted(categories.items())
    ]
    return "## By category\n\n" + table(header, rows) + "\n\n"


def checks_section(metrics: dict[str, Any]) -> str:
    """The merge parity and quality gate results, where this evaluation ran them."""
    lines = []
    parity = metrics.get("merge_parity")
    if parity:
        verdict = "PASS" if parity["ok"] else "FAIL"
        lines.append(
            f"- Merge parity: **{verdict}**. Test loss base + adapter {parity['adapter_loss']:.6f}, merged "
            f"{parity['merged_loss']:.6f} (difference {parity['loss_difference']:.2e}, tolerance "
            f"{parity['tolerance']:.0e}); {parity['identical_answers']} of {parity['answers']} greedy answers "
            "identical."
        )
    gate = metrics.get("quality_gate")
    if gate:
        lines.append(
            f"- Quality gate on {gate['metric']}: **{'PASS' if gate['passed'] else 'FAIL'}**. Base {gate['base']:.4f}, "
            f"tuned {gate['tuned']:.4f}, drop {gate['drop']:+.4f} (allowed {gate['max_drop']})."
        )
    else:
        lines.append(
            "- Quality gate: off (set `eval.gate_metric` to fail the evaluate stage when tuned is worse than base)."
        )
    settings = metrics.get("generation")
    if settings:
        lines.append("- Generation: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    return "## Checks\n\n" + "\n".join(lines) + "\n\n"


def predictions_section(generations: list[dict[str, Any]]) -> str:
    """Classification: each test text with its label and both models' predictions."""
    lines = ["| # | text | label | base | tuned |", "|---:|---|---|---|---|"]
    for number, row in enumerate(generations, start=1):
        text = row["question"].replace("|", "\\|")
        marks = {name: ("✓" if row[f"{name}_correct"] else "✗") for name in ("base", "tuned")}
        answers = f"{row['base']} {marks['base']} | {row['tuned']} {marks['tuned']}"
        lines.append(f"| {number} | {text} | {row['reference']} | {answers} |")
    return "\n".join(lines) + "\n"


def _fact_check(row: dict[str, Any], model: str) -> str:
    """The answer's fact check: right, or the missing and wrong facts ('' when the example has no key facts)."""
    check = row.get(f"{model}_facts") or {}
    if not check:
        return ""
    if check["right"]:
        return "✓ facts right"
    stated_instead = [w.split(" instead of ")[-1] for w in check["wrong"]]
    missing = [f"missing {fact}" for fact in check["missing"] if fact not in stated_instead]
    return "✗ facts: " + "; ".join(check["wrong"] + missing)


def fact_summary(metrics: dict[str, Any], generations: list[dict[str, Any]]) -> str:
    """One sentence: how many answers of each model state every key fact."""
    checked = [row for row in generations if row.get("tuned_facts")]
    if not checked:
        return ""
    right = {model: sum(row[f"{model}_facts"]["right"] for row in checked) for model in ("base", "tuned")}
    return (
        f"Key facts (numbers with their units, dates, times, addresses, names): the base model states all of them in "
        f"{right['base']} of {len(checked)} answers, the fine-tuned model in {right['tuned']} of {len(checked)}"
        + (f" ({none} test answers have none)" if (none := metrics["test_examples"] - len(checked)) else "")
        + ". Each answer below shows its check.\n\n"
    )


def _scores(row: dict[str, Any], model: str) -> str:
    shown = [key for key in ANSWER_SCORES if f"{model}_{key}" in row]
    scores = ", ".join(f"{short_name(key)} {row[f'{model}_{key}']:.2f}" for key in shown)
    return "; ".join(part for part in (_fact_check(row, model), scores) if part)


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
            + (f"Key facts: {', '.join(row['facts'])}\n\n" if row.get("facts") else "")
            + f"**Base model** ({_scores(row, 'base')})\n\n{_quote(row['base'])}\n\n"
            f"**Fine-tuned** ({_scores(row, 'tuned')})\n\n{_quote(row['tuned'])}\n"
        )
    return "\n".join(parts)


def lineage_section(
    provenance: dict[str, Any], eval_run_id: str, lock_hashes: dict[str, str], params: dict[str, Any]
) -> str:
    """Run ids, DVC experiment, commit, DVC md5s of data and models, and the resolved parameters."""
    git, exp, run = provenance["git"], provenance.get("dvc", {}), provenance["mlflow"]
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    evaluation = f", evaluation run `{eval_run_id}`" if eval_run_id != run["run_id"] else ""
    lines = [
        f"- MLflow run: `{run['run_id']}` (experiment {run['experiment_id']}){evaluation}",
        f"- DVC experiment: `{exp.get('exp_name', 'unknown')}`, baseline `{exp.get('baseline_rev', 'unknown')}`",
        f"- Git commit: `{git.get('commit') or 'unknown'}`{dirty}",
        "",
        "| artifact | DVC md5 (dvc.lock) |",
        "|---|---|",
    ]
    lines += [f"| `{path}` | `{md5}` |" for path, md5 in sorted(lock_hashes.items())]
    lines += ["", "Resolved parameters:", "", "```yaml", yaml.safe_dump(params, sort_keys=True).rstrip(), "```"]
    return "\n".join(lines)


PREFERENCE_MODELS = (("base", "base"), ("sft", "SFT"), ("aligned", "aligned"))


def preference_section(metrics: dict[str, Any], generations: list[dict[str, Any]]) -> str:
    """Held-out preference scores of base, SFT and aligned models and their answers side by side (empty without
    preference data)."""
    models = [(key, label) for key, label in PREFERENCE_MODELS if key in metrics]
    if not models and not generations:
        return ""
    objective = metrics.get("objective", "none")
    if objective == "none":
        head = "No preference objective ran (align.objective=none): base and SFT models on the held-out pairs.\n\n"
    else:
        head = (
            f"SFT, then {objective.upper()} through TRL (loss {metrics['loss_type']}, beta {metrics['beta']:g}) on "
            f"{metrics['train_rows']} training rows; {metrics['heldout_pairs']} held-out pairs. Preference accuracy is "
            "the share of held-out pairs whose implicit reward, beta x (log p_model - log p_base), is higher for the "
            "chosen answer (the base, its own reference, scores 0.5).\n\n"
        )
    lines = ["| metric | " + " | ".join(label for _, label in models) + " |", "|---|" + "---:|" * len(models)]
    for metric in PREFERENCE:
        values = [metrics[key].get(metric.name) for key, _ in models]
        lines.append(f"| {metric.label} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    parts = ["## Preference tuning\n", head + "\n".join(lines) + "\n", "### Answers to the held-out prompts\n"]
    for index, row in enumerate(generations, start=1):
        parts.append(f"**{index}. {row['prompt']}** (`{row['source']}`)\n")
        if row.get("chosen"):
            parts.append(f"Preferred answer:\n\n{_quote(row['chosen'])}\n")
        if row.get("rejected"):
            parts.append(f"Rejected answer:\n\n{_quote(row['rejected'])}\n")
        for key, label in models:
            if key in row:
                parts.append(f"{label}:\n\n{_quote(row[key])}\n")
    return "\n".join(parts) + "\n"


def render_before_after(
    metrics: dict[str, Any],
    generations: list[dict[str, Any]],
    provenance: dict[str, Any],
    lock_hashes: dict[str, str],
    params: dict[str, Any],
    figures: dict[str, str] | None = None,
    preferences: tuple[dict[str, Any], list[dict[str, Any]]] | None = None,
) -> str:
    """The whole `before_after.md` (with `preferences`, the align stage's scores and answers, its own section)."""
    source_list = ", ".join(f"`{source['path']}`" for source in params["data"]["sources"].values())
    method = params["method"]
    rank = "" if method.get("adapter") == "none" else f" (r={method['r']})"
    return (
        f"**Verdict:** {metrics['verdict']['sentence']}\n\n"
        "# Before and after fine-tuning\n\n"
        f"Model `{params['model']['source']}` ({params['model'].get('task', 'causal_lm')}), method {method['name']}"
        f"{rank}, data {source_list}, {metrics['test_examples']} test prompts.\n\n"
        f"## Metrics\n\n{metrics_table(metrics)}\n\n"
        + fact_summary(metrics, generations)
        + "".join(f"![{name}]({link})\n\n" for name, link in (figures or {}).items())
        + category_table(metrics)
        + checks_section(metrics)
        + (preference_section(*preferences) if preferences else "")
        + f"## Answers\n\n{answers_section(generations)}\n"
        f"## Lineage\n\n{lineage_section(provenance, metrics['mlflow_run_id'], lock_hashes, params)}\n"
    )


def plot_loss(path: Path, train_log: Path, validation: dict[str, Any] | None = None) -> None:
    """Training loss per step (the train stage's log) and, from the train stage's `validation` record, the
    validation loss (step 0: the base's) with the step whose weights were published."""
    with open(train_log, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    figure, axes = plt.subplots(figsize=(7, 3.5))
    steps = [int(r["step"]) for r in rows]
    axes.plot(steps, [float(r["loss"]) for r in rows], marker="." if len(rows) < 60 else None, label="training")
    curve = (validation or {}).get("val_curve") or []
    if curve:
        axes.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label="validation")
        published = validation.get("published_step")
        if published is not None:
            axes.axvline(published, color="grey", linestyle="--", linewidth=1, label=f"published (step {published})")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Training and validation loss" if curve else "Training loss")
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Base vs tuned bars for every test metric: scores on one panel, loss and perplexity on another."""
    rows = metric_rows(metrics)
    scores = [metric for metric in rows if metric.kind == "score"]
    losses = [metric for metric in rows if metric.kind == "loss"]
    ratios = [max(len(scores), 1), max(len(losses), 1)]
    figure, panels = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": ratios})
    for axes, group, title in ((panels[0], scores, "higher is better"), (panels[1], losses, "lower is better")):
        positions = range(len(group))
        for offset, model in ((-0.2, "base"), (0.2, "tuned")):
            values = [metrics[model][metric.name] for metric in group]
            bars = axes.bar([p + offset for p in positions], values, width=0.4, label=model)
            axes.bar_label(bars, fmt="%.2f", fontsize=7)
        axes.set_xticks(list(positions), [metric.name for metric in group], rotation=30, ha="right")
        axes.set_title(title)
        axes.legend()
    save_figure(figure, path)
