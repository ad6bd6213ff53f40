"""The evaluate stage: base vs tuned on the test split (fact accuracy, loss, perplexity, BLEU, ROUGE-1/2/L, exact
match, token F1, contains-match, per category; classification: accuracy, macro F1, loss), the tuned model's fact
accuracy on the validation split (for sweeps), the merge parity and the optional quality gate, logged to this
execution's MLflow run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow

from ..config import Config, config_to_dict
from ..evaluation import check_gate, evaluate_base_and_tuned
from ..lineage import final_adapter, read_provenance
from ..outputs import write_json, write_jsonl
from ..tracking import VERDICT_TAG, VERDICT_TEXT_TAG, evaluation_run
from ..verdict import verdict


def by_category_table(categories: dict[str, Any]) -> dict[str, list[Any]]:
    """Per-category scores as table columns: one row per category and model."""
    rows = [
        {"category": category, "model": model, "examples": entry["examples"]}
        | {k: v if math.isfinite(v) else None for k, v in entry[model].items()}
        for category, entry in categories.items()
        for model in ("base", "tuned")
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {column: [row.get(column) for row in rows] for column in columns}


def run_evaluate(config: Config, metrics_path: Path, generations_path: Path) -> dict[str, Any]:
    """Score both models; write the metrics (with the MLflow run's id, so that `dvc exp show` links each
    experiment to its run) and every answer. A failed quality gate writes nothing."""
    metrics, generations = evaluate_base_and_tuned(config)
    validation = read_provenance(Path(config.paths.adapter)).get("validation")
    metrics["verdict"] = verdict(metrics, config.model.task, config.eval.verdict_metric, validation)
    gate = check_gate(config, metrics)
    if gate:
        metrics["quality_gate"] = gate
    adapter_run_id = read_provenance(final_adapter(config.paths))["mlflow"]["run_id"]
    with evaluation_run(config.tracking, adapter_run_id, config_to_dict(config)) as run:
        for model in ("base", "tuned"):
            scores = metrics[model].items()
            mlflow.log_metrics({f"test/{model}/{k}": v for k, v in scores if isinstance(v, (int, float))})
        if metrics.get("by_category"):  # a table, not a one-bar chart per category, model and metric
            mlflow.log_table(by_category_table(metrics["by_category"]), "test/by_category.json")
        if "validation" in metrics:
            mlflow.log_metric("validation/tuned/fact_accuracy", metrics["validation"]["fact_accuracy"])
        if "merge_parity" in metrics:
            mlflow.log_metrics({f"merge_parity/{k}": float(v) for k, v in metrics["merge_parity"].items()})
        mlflow.log_metric("verdict/better", metrics["verdict"]["better"])
        mlflow.set_tags(
            {VERDICT_TAG: metrics["verdict"]["result"], VERDICT_TEXT_TAG: metrics["verdict"]["sentence"][:5000]}
        )
        if gate:
            mlflow.log_metrics(
                {"quality_gate/passed": 1.0} | ({"quality_gate/drop": gate["drop"]} if "drop" in gate else {})
            )
        if "generation" in metrics:
            mlflow.log_dict(metrics["generation"], "config/generation.json")
        metrics["mlflow_run_id"] = run.info.run_id
        write_json(metrics_path, metrics)
        write_jsonl(generations_path, generations)
        mlflow.log_artifact(str(metrics_path), "reports")
        mlflow.log_artifact(str(generations_path), "reports")
    return metrics
