"""The report stage: before_after.md with its plots, full metric table, categories and checks."""

import json


def test_report_shows_plots_full_metric_table_categories_and_checks(trained):
    report = (trained / "reports/before_after.md").read_text()
    metrics = json.loads((trained / "reports/metrics.json").read_text())
    assert report.splitlines()[0] == f"**Verdict:** {metrics['verdict']['sentence']}"  # the verdict comes first
    for figure in ("loss_curve.png", "metrics_bars.png"):
        data = (trained / "reports" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({figure})" in report
    table = report.split("## Metrics\n\n", 1)[1]
    assert table.splitlines()[2].startswith("| Fact accuracy (every key fact stated) |")  # the table leads with it
    generations = [json.loads(line) for line in (trained / "reports/generations.jsonl").read_text().splitlines()]
    checked = [g for g in generations if g["facts"]]
    right = sum(g["tuned_facts"]["right"] for g in checked)
    assert f"the fine-tuned model in {right} of {len(checked)}" in report
    assert report.count("Key facts: ") == len(checked)
    assert report.count("✓ facts right") + report.count("✗ facts: ") == 2 * len(checked)
    for label in ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Exact match", "Token F1", "Perplexity"):
        assert f"| {label}" in report
    assert "## By category" in report and "Merge parity: **PASS**" in report and "Quality gate: off" in report
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{trained}/mlflow.db")
    run_id = json.loads((trained / "reports/metrics.json").read_text())["mlflow_run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reports")}
    assert {"reports/loss_curve.png", "reports/metrics_bars.png", "reports/before_after.md"} <= logged


def test_each_answer_shows_its_fact_check():
    from slmtune.reports.before_after import answers_section, fact_summary

    row = {
        "question": "What is the Gold plan's deductible?",
        "source": "kb.csv:3",
        "prompt": "<|user|>What is the Gold plan's deductible?",
        "reference": "CareWell Gold has an annual deductible of 250 euros.",
        "facts": ["250 euros"],
        "base": "It is low.",
        "tuned": "The deductible is 450 euros.",
        "base_facts": {"right": False, "missing": ["250 euros"], "wrong": []},
        "tuned_facts": {"right": False, "missing": ["250 euros"], "wrong": ["450 euros instead of 250 euros"]},
    }
    right = row | {"tuned": "250 euros.", "tuned_facts": {"right": True, "missing": [], "wrong": []}}
    no_facts = row | {"facts": [], "base_facts": {}, "tuned_facts": {}}
    section = answers_section([row, right, no_facts])
    assert "**Base model** (✗ facts: missing 250 euros)" in section
    assert "**Fine-tuned** (✗ facts: 450 euros instead of 250 euros)" in section
    assert "**Fine-tuned** (✓ facts right)" in section
    assert section.count("Key facts: 250 euros") == 2
    summary = fact_summary({"test_examples": 3}, [row, right, no_facts])
    assert "the base model states all of them in 0 of 2 answers, the fine-tuned model in 1 of 2" in summary
    assert "(1 test answers have none)" in summary
