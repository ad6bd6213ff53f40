"""The before/after report: every test prompt with base and tuned answers, metrics and lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import Config
from .lineage import dvc_lock_hashes, read_provenance
from .outputs import read_jsonl
from .tracking import mlflow_run

METRIC_ROWS = (
    ("loss", "Test loss (response tokens)", "lower"),
    ("perplexity", "Perplexity", "lower"),
    ("rougeL", "ROUGE-L F1", "higher"),
    ("contains", "Contains reference", "higher"),
)


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of base vs tuned metrics with the change."""
    lines = ["| metric | base | tuned | change | better |", "|---|---:|---:|---:|---|"]
    for key, label, better in METRIC_ROWS:
        base, tuned = metrics["base"][key], metrics["tuned"][key]
        lines.append(f"| {label} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} | {better} |")
    return "\n".join(lines)


def answers_section(generations: list[dict[str, Any]]) -> str:
    """Each test prompt with its reference and both answers."""
    parts = []
    for number, row in enumerate(generations, start=1):
        question = row["instruction"] + (f" — {row['input']}" if row.get("input") else "")
        parts.append(
            f"### {number}. {question}\n\n"
            f"*source: `{row['source']}`*\n\n"
            f"**Prompt (as the model sees it)**\n\n```text\n{row['prompt'].rstrip()}\n```\n\n"
            f"**Reference**\n\n{_quote(row['reference'])}\n\n"
            f"**Base model** (ROUGE-L {row['base_rougeL']:.2f}, contains {row['base_contains']})\n\n{_quote(row['base'])}\n\n"
            f"**Fine-tuned** (ROUGE-L {row['tuned_rougeL']:.2f}, contains {row['tuned_contains']})\n\n{_quote(row['tuned'])}\n"
        )
    return "\n".join(parts)


def lineage_section(provenance: dict[str, Any], lock_hashes: dict[str, str], params: dict[str, Any]) -> str:
    """Run id, commit, DVC md5s of data and models, and the resolved parameters."""
    git = provenance["git"]
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    lines = [
        f"- MLflow run: `{provenance['mlflow']['run_id']}` (experiment {provenance['mlflow']['experiment_id']})",
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
) -> str:
    """The whole `before_after.md`."""
    return (
        "# Before and after fine-tuning\n\n"
        f"Model `{params['model']['source']}`, method {params['method']['name']} "
        f"(r={params['method']['r']}), data `{params['data']['path']}`, "
        f"{metrics['test_examples']} test prompts.\n\n"
        f"## Metrics\n\n{metrics_table(metrics)}\n\n"
        f"## Answers\n\n{answers_section(generations)}\n"
        f"## Lineage\n\n{lineage_section(provenance, lock_hashes, params)}\n"
    )


def run_report(config: Config, report_path: Path) -> None:
    """The report stage: render `before_after.md` and log it to the pipeline's MLflow run."""
    import json

    import mlflow

    metrics = json.loads(Path(config.paths.metrics).read_text(encoding="utf-8"))
    generations = read_jsonl(config.paths.generations)
    provenance = read_provenance(config.paths.adapter)
    paths = config.paths
    wanted = {config.data.path, paths.base_model, paths.prepared, paths.tokenized, paths.adapter}
    lock_hashes = {path: md5 for path, md5 in dvc_lock_hashes().items() if path in wanted}
    report = render_report(metrics, generations, provenance, lock_hashes, provenance["config"])
    report_path.write_text(report, encoding="utf-8")
    with mlflow_run(config.tracking, run_id=provenance["mlflow"]["run_id"]):
        mlflow.log_artifact(str(report_path), "reports")
