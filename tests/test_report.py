"""The report stage: before_after.md with its plots, full metric table, categories and checks."""

import json


def test_report_shows_plots_full_metric_table_categories_and_checks(trained):
    report = (trained / "reports/before_after.md").read_text()
    for figure in ("loss_curve.png", "metrics_bars.png"):
        data = (trained / "reports" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({figure})" in report
    for label in ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Exact match", "Token F1", "Perplexity"):
        assert f"| {label}" in report
    assert "## By category" in report and "Merge parity: **PASS**" in report and "Quality gate: off" in report
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{trained}/mlflow.db")
    run_id = json.loads((trained / "reports/metrics.json").read_text())["mlflow_run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reports")}
    assert {"reports/loss_curve.png", "reports/metrics_bars.png", "reports/before_after.md"} <= logged
