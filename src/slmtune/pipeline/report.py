"""The report stage: `reports/before_after.md` (metrics, loss and metric plots, per-category table, merge
parity and quality gate, every answer, lineage), logged to the evaluation's MLflow run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow

from ..config import Config
from ..lineage import dvc_lock_hashes, final_adapter, read_provenance
from ..outputs import read_jsonl
from ..reports.before_after import plot_loss, plot_metrics, render_before_after
from ..tracking import log_markdown, mlflow_run


def run_report(config: Config, report_path: Path, loss_plot: Path, metrics_plot: Path) -> None:
    """Render the report and its two plots; log all three to the run that `evaluate` logged into."""
    paths = config.paths
    metrics = json.loads(Path(paths.metrics).read_text(encoding="utf-8"))
    generations = read_jsonl(paths.generations)
    provenance = read_provenance(final_adapter(paths))
    wanted = {paths.raw_data, paths.base_model, paths.prepared, paths.augmented, paths.tokenized, paths.adapter}
    wanted |= {paths.aligned}
    preferences = (
        json.loads(Path(paths.preference_metrics).read_text(encoding="utf-8")),
        read_jsonl(paths.preference_generations),
    )
    lock_hashes = {path: md5 for path, md5 in dvc_lock_hashes().items() if path in wanted}
    plot_loss(loss_plot, Path(paths.train_log), read_provenance(Path(paths.adapter)).get("validation"))
    plot_metrics(metrics_plot, metrics)
    figures = {
        name: os.path.relpath(target, Path(paths.report).parent)
        for name, target in (("training loss", paths.loss_plot), ("base vs tuned", paths.metrics_plot))
    }
    report = render_before_after(
        metrics, generations, provenance, lock_hashes, provenance["config"], figures, preferences
    )
    report_path.write_text(report, encoding="utf-8")
    with mlflow_run(config.tracking, run_id=metrics["mlflow_run_id"]):
        for path in (loss_plot, metrics_plot):
            mlflow.log_artifact(str(path), "reports")
        plots = {paths.loss_plot: "reports", paths.metrics_plot: "reports"}  # linked from paths.report's folder
        log_markdown(config.tracking, Path(report_path), "reports", plots, Path(paths.report))
