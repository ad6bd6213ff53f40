"""The real `dvc repro` on a copy of the project whose base model is the tiny Llama."""

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import run
from slmtune.lineage import dvc_lock_hashes

STAGES = ["base", "prepare", "tokenize", "train", "evaluate", "report"]
REPORT_SECTIONS = ["# Before and after fine-tuning", "## Metrics", "## Answers", "## Lineage"]


def test_dvc_repro_runs_every_stage_then_nothing(tiny_project: Path):
    first = run(["dvc", "repro"], tiny_project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    second = run(["dvc", "repro"], tiny_project)
    assert "Running stage" not in second.stdout

    metrics = json.loads((tiny_project / "reports/metrics.json").read_text())
    for model in ("base", "tuned"):
        assert set(metrics[model]) == {"loss", "perplexity", "rougeL", "contains"}
    generations = [json.loads(line) for line in (tiny_project / "reports/generations.jsonl").open()]
    test_split = (tiny_project / "data/prepared/test.jsonl").read_text().splitlines()
    assert len(generations) == metrics["test_examples"] == len(test_split) > 0

    report = (tiny_project / "reports/before_after.md").read_text()
    positions = [report.index(section) for section in REPORT_SECTIONS]
    assert positions == sorted(positions)
    assert all(g["reference"] in report and g["instruction"] in report for g in generations)

    provenance = json.loads((tiny_project / "models/adapter/provenance.json").read_text())
    lock = dvc_lock_hashes(tiny_project / "dvc.lock")
    for entry in provenance["inputs"].values():
        assert lock[entry["path"]] == entry["md5"], entry["path"]
        assert entry["md5"] in report
    head = run(["git", "rev-parse", "HEAD"], tiny_project).stdout.strip()
    assert provenance["git"]["commit"] == head and head in report

    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    run_data = mlflow.get_run(provenance["mlflow"]["run_id"])
    assert run_data.data.tags["mlflow.source.git.commit"] == head
    assert run_data.data.params["method.r"] == "16"
    assert {"test/base/loss", "test/tuned/loss", "train/loss"} <= set(run_data.data.metrics)
    assert {d.dataset.digest for d in run_data.inputs.dataset_inputs} == {e["md5"] for e in provenance["inputs"].values()}
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_data.info.run_id, "reports")}
    assert "reports/before_after.md" in artifacts
    assert run_data.info.artifact_uri.startswith((tiny_project / "mlartifacts").as_uri())


def test_adapter_is_a_standard_peft_adapter(tiny_project: Path, tiny_model_dir):
    from peft import PeftModel

    from slmtune.modeling import load_model

    run(["dvc", "repro", "train"], tiny_project)
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), tiny_project / "models/adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    steps = (tiny_project / "reports/train_log.csv").read_text().splitlines()
    assert steps[0] == "step,loss,learning_rate" and len(steps) == 1 + 6


def test_stage_params_are_tracked_by_dvc(tiny_project: Path):
    run(["dvc", "repro"], tiny_project)
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["eval"]["max_new_tokens"] = 4
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run(["dvc", "repro"], tiny_project).stdout
    assert "Running stage 'evaluate'" in rerun and "Running stage 'train'" not in rerun


def break_data(project: Path, problem: str) -> None:
    path = project / "data/raw/company_kb.csv"
    if problem == "missing":
        path.unlink()
    elif problem == "empty":
        path.write_text("")
    elif problem == "wrong columns":
        path.write_text("question,answer\nWhat?,That.\n")


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing", "error: data/raw/company_kb.csv: file not found"),
        ("empty", "error: data/raw/company_kb.csv: file is empty"),
        ("wrong columns", "error: data/raw/company_kb.csv: missing column(s) 'instruction', 'output' (found: answer, question)"),
    ],
)
def test_bad_data_stops_prepare_with_one_line_and_no_outputs(tiny_project: Path, problem, message):
    break_data(tiny_project, problem)
    result = run(["python", "-P", "stages/prepare.py"], tiny_project, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tiny_project / "data/prepared").exists() and not (tiny_project / "reports/data_stats.json").exists()
    assert [p.name for p in (tiny_project / "data").iterdir()] == ["raw"], "no temporary left behind"


def test_failed_prepare_keeps_the_previous_outputs(tiny_project: Path):
    run(["python", "-P", "stages/prepare.py"], tiny_project)
    before = (tiny_project / "data/prepared/train.jsonl").read_text()
    break_data(tiny_project, "wrong columns")
    assert run(["python", "-P", "stages/prepare.py"], tiny_project, check=False).returncode == 1
    assert (tiny_project / "data/prepared/train.jsonl").read_text() == before


def test_dvc_repro_reports_bad_data_and_stops(tiny_project: Path):
    break_data(tiny_project, "empty")
    result = run(["dvc", "repro", "prepare"], tiny_project, check=False)
    assert result.returncode != 0
    assert "error: data/raw/company_kb.csv: file is empty" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
