"""The metric registry: every metric the pipeline reports, with its label and direction. Config (the
quality gate), evaluation, the report and sweeps all read it. The folders beside this file are the local
`evaluate` modules that compute the text and classification scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODULES_DIR = Path(__file__).parent
"""Parent of the local `evaluate` metric modules (`evaluate.load(str(MODULES_DIR / name))`)."""


@dataclass(frozen=True)
class Metric:
    """One reported metric."""

    name: str
    """Key in metrics.json, MLflow (`test/<model>/<name>`) and `dvc exp show` (`tuned.<name>`)."""
    label: str
    """How the report's table names it."""
    direction: str
    """min (lower is better) or max (higher is better)."""
    kind: str
    """loss (unbounded, positive: loss, perplexity), score (between 0 and 1) or unbounded (log-likelihoods, margins)."""
    short: str
    """The name in narrow places: per-category columns, the scores beside each answer."""


CAUSAL_LM = (
    Metric("fact_accuracy", "Fact accuracy (every key fact stated)", "max", "score", "facts"),
    Metric("loss", "Test loss (response tokens)", "min", "loss", "loss"),
    Metric("perplexity", "Perplexity", "min", "loss", "perplexity"),
    Metric("bleu", "BLEU-4 (corpus)", "max", "score", "BLEU"),
    Metric("rouge1", "ROUGE-1 F1", "max", "score", "ROUGE-1"),
    Metric("rouge2", "ROUGE-2 F1", "max", "score", "ROUGE-2"),
    Metric("rougeL", "ROUGE-L F1", "max", "score", "ROUGE-L"),
    Metric("exact_match", "Exact match", "max", "score", "EM"),
    Metric("token_f1", "Token F1", "max", "score", "token F1"),
    Metric("contains", "Contains reference", "max", "score", "contains"),
)
CLASSIFICATION = (
    Metric("accuracy", "Accuracy", "max", "score", "accuracy"),
    Metric("f1", "Macro F1", "max", "score", "F1"),
    Metric("loss", "Test loss (cross-entropy)", "min", "loss", "loss"),
)
BY_TASK = {"causal_lm": CAUSAL_LM, "classification": CLASSIFICATION}
"""The metrics of each model.task, in report order."""
PREFERENCE = (
    Metric(
        "preference_accuracy",
        "Preference accuracy (implicit reward vs the base prefers the chosen answer)",
        "max",
        "score",
        "pref acc",
    ),
    Metric(
        "reward_margin",
        "Mean reward margin (beta x log-ratio to the base, chosen - rejected)",
        "max",
        "unbounded",
        "margin",
    ),
    Metric("likelihood_accuracy", "Chosen answer more likely per token (no reference)", "max", "score", "lik acc"),
    Metric("chosen_logp", "Chosen answer log-likelihood", "max", "unbounded", "chosen logp"),
    Metric("rejected_logp", "Rejected answer log-likelihood", "min", "unbounded", "rejected logp"),
)
"""The align stage's held-out pair scores (`reports/preference_metrics.json`, `dvc exp show` `aligned.<name>`, MLflow
`preference/<model>/<name>`), for base, SFT and aligned models."""
PER_EXAMPLE = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "contains")
"""Text metrics with a score per example (BLEU: smoothed sentence BLEU), averaged per category. Fact accuracy
(`slmtune.facts`) is per example too, over the examples that have key facts."""
TEXT_MODULES = ("bleu", "rouge", "answer_match", "contains_match")
"""The local `evaluate` modules that compute the causal-LM text metrics."""
SWEEP_COLUMNS = ("fact_accuracy", "loss", "perplexity", "rougeL", "contains")
"""Tuned-model metrics every sweep report shows beside the ranking metric."""
CATEGORY_COLUMNS = ("fact_accuracy", "loss", "rougeL", "token_f1", "exact_match", "bleu")
"""Metrics of the report's per-category table (BLEU there: mean sentence BLEU)."""
ANSWER_SCORES = ("rougeL", "token_f1", "contains")
"""Per-example scores the report prints beside each answer."""


def metric_names(task: str) -> tuple[str, ...]:
    """Names of the metrics evaluation reports for `task` (what the quality gate can watch)."""
    return tuple(metric.name for metric in BY_TASK[task])


def direction(name: str) -> str | None:
    """min or max for a metric name (a `dvc exp show` column like `tuned.rougeL` works too); None if unknown."""
    short = name.split(".")[-1]
    found = {
        metric.direction for metrics in (*BY_TASK.values(), PREFERENCE) for metric in metrics if metric.name == short
    }
    return found.pop() if len(found) == 1 else None


def short_name(name: str) -> str:
    """The short label of a causal-LM metric."""
    return next(metric.short for metric in CAUSAL_LM if metric.name == name)


def lower_is_better(name: str) -> bool:
    return direction(name) == "min"
