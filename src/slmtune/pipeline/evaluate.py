"""The evaluate stage: base vs tuned on the test split (loss, perplexity, BLEU, ROUGE-1/2/L, exact match,
token F1, contains-match, per category; classification: accuracy, macro F1, loss), the merge parity and
the optional quality gate, logged to this execution's MLflow run."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import mlflow

from ..config import Config, config_to_dict
from ..evaluation import check_gate, evaluate_base_and_tuned
from ..lineage import read_provenance
from ..outputs import write_json, write_jsonl
from ..tracking import evaluation_run


def run_evaluate(config: Config, metrics_path: Path, generations_path: Path) -> dict[str, Any]:
    """Score both models; write the metrics (with the MLflow run's id, so that `dvc exp show` links each
    experiment to its run) and every answer. A failed quality gate writes nothing."""
    metrics, generations = evaluate_base_and_tuned(config)
    gate = check_gate(config, metrics)
    if gate:
        metrics["quality_gate"] = gate
    adapter_run_id = read_provenance(config.paths.adapter)["mlflow"]["run_id"]
    with evaluation_run(config.tracking, adapter_run_id, config_to_dict(config)) as run:
        for model in ("base", "tuned"):
            scores = metrics[model].items()
            mlflow.log_metrics({f"test/{model}/{k}": v for k, v in scores if isinstance(v, (int, float))})
        for category, entry in metrics.get("by_category", {}).items():
            key = re.sub(r"[^\w\-. ]", "_", category)
            for model in ("base", "tuned"):
                scores = entry[model].items()
                mlflow.log_metrics({f"test/{model}/{key}/{k}": v for k, v in scores if math.isfinite(v)})
        if "merge_parity" in metrics:
            mlflow.log_metrics({f"merge_parity/{k}": float(v) for k, v in metrics["merge_parity"].items()})
        if gate:
            mlflow.log_metrics({"quality_gate/passed": 1.0, "quality_gate/drop": gate["drop"]})
        if "generation" in metrics:
            mlflow.log_dict(metrics["generation"], "config/generation.json")
        metrics["mlflow_run_id"] = run.info.run_id
        write_json(metrics_path, metrics)
        write_jsonl(generations_path, generations)
        mlflow.log_artifact(str(metrics_path), "reports")
        mlflow.log_artifact(str(generations_path), "reports")
    return metrics
