"""The real `dvc repro` on a copy of the project whose base model is the tiny Llama."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import FIXTURES, TINY_OVERRIDES, make_project, run
from slmtune.lineage import dvc_lock_hashes

STAGES = ["base", "prepare", "tokenize", "train", "evaluate", "report"]
REPORT_SECTIONS = ["# Before and after fine-tuning", "## Metrics", "## Checks", "## Answers", "## Lineage"]


def test_dvc_repro_runs_every_stage_then_nothing(tiny_project: Path):
    first = run(["dvc", "repro"], tiny_project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    second = run(["dvc", "repro"], tiny_project)
    assert "Running stage" not in second.stdout

    metrics = json.loads((tiny_project / "reports/metrics.json").read_text())
    for model in ("base", "tuned"):
        assert set(metrics[model]) == {"loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "contains"}
    generations = [json.loads(line) for line in (tiny_project / "reports/generations.jsonl").open()]
    test_split = (tiny_project / "data/prepared/test.jsonl").read_text().splitlines()
    assert len(generations) == metrics["test_examples"] == len(test_split) > 0

    report = (tiny_project / "reports/before_after.md").read_text()
    positions = [report.index(section) for section in REPORT_SECTIONS]
    assert positions == sorted(positions)
    assert all(g["reference"] in report and g["question"] in report for g in generations)

    provenance = json.loads((tiny_project / "models/adapter/provenance.json").read_text())
    lock = dvc_lock_hashes(tiny_project / "dvc.lock")
    assert provenance["inputs"]["source/company_kb"]["path"] == "data/raw/company_kb.csv"
    for entry in provenance["inputs"].values():
        if entry["path"] in lock:
            assert lock[entry["path"]] == entry["md5"], entry["path"]
            assert entry["md5"] in report
    assert {"prepared", "tokenized", "base_model"} <= set(provenance["inputs"])
    assert set(provenance["code"]) == {"stages/train.py", "src/slmtune/training.py", "src/slmtune/modeling.py", "src/slmtune/lineage.py", "src/slmtune/tracking.py"}
    head = run(["git", "rev-parse", "HEAD"], tiny_project).stdout.strip()
    assert provenance["git"]["commit"] == head and head in report

    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    run_data = mlflow.get_run(provenance["mlflow"]["run_id"])
    assert run_data.data.tags["mlflow.source.git.commit"] == head
    assert run_data.data.params["method.r"] == "16"
    assert {"test/base/loss", "test/tuned/loss", "train/loss", "data/rows/train", "data/trained_share/train"} <= set(run_data.data.metrics)
    assert {d.dataset.digest for d in run_data.inputs.dataset_inputs} == {e["md5"] for e in provenance["inputs"].values()}
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_data.info.run_id, "reports")}
    assert "reports/before_after.md" in artifacts
    data_artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_data.info.run_id, "data")}
    assert {"data/data_report.md", "data/data_lengths.png"} <= data_artifacts
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


def data_report_rows(project: Path) -> dict[str, int]:
    stats = json.loads((project / "reports/data_stats.json").read_text())
    return stats["rows"]


def test_data_report_counts_rows_tokens_and_drops(tiny_project: Path):
    run(["dvc", "repro", "tokenize"], tiny_project)
    report = (tiny_project / "reports/data_report.md").read_text()
    rows = data_report_rows(tiny_project)
    for heading in ("## Rows per source and split", "## Token lengths per split", "## Dropped rows"):
        assert heading in report
    assert f"| `company_kb` | `data/raw/company_kb.csv` | instruction | 114 | {rows['train']} | {rows['val']} | {rows['test']} |" in report
    assert "None: every row was used." in report and "![Token lengths per split](data_lengths.png)" in report
    assert (tiny_project / "reports/data_lengths.png").read_bytes().startswith(b"\x89PNG")
    tokens = json.loads((tiny_project / "reports/token_stats.json").read_text())
    assert f"{tokens['splits']['train']['trained_share']:.1%}" in report


FORMAT_PRESETS = ["polite_assistant", "dolly", "support_chat", "support_chat_sharegpt", "dialogue_summary",
                  "handbook_text", "company_kb_parquet", "kb_and_polite"]  # fmt: skip


def assert_trained_through_every_stage(project: Path) -> dict:
    result = run(["dvc", "repro"], project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    assert (project / "models/adapter/adapter_model.safetensors").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["test_examples"] > 0 and metrics["tuned"]["loss"] > 0
    return metrics


@pytest.mark.parametrize("preset", FORMAT_PRESETS)
def test_every_data_format_trains_through_dvc_repro(tmp_path, tiny_model_dir, preset):
    project = make_project(tmp_path / "project", [f"data={preset}", f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])
    assert_trained_through_every_stage(project)
    stats = json.loads((project / "reports/data_stats.json").read_text())
    assert stats["dropped"] == {} and set(stats["sources"]) == set(yaml.safe_load((project / "params.yaml").read_text())["data"]["sources"])


def test_hub_dataset_from_the_local_cache_trains_through_dvc_repro(tmp_path, tiny_model_dir, hub_cache):
    overrides = ["data=hub_guanaco", "data.sources.guanaco.path=slmtune-test/tiny_corpus", "data.sources.guanaco.columns.text=content"]
    project = make_project(tmp_path / "project", [*overrides, f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])
    assert_trained_through_every_stage(project)
    assert data_report_rows(project)["train"] > 0


def test_hub_dataset_offline_without_cache_stops_prepare_with_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    project = make_project(tmp_path / "project", ["data=hub_guanaco", f"model.source={tiny_model_dir}", "model.gguf_file=null"])
    result = run(["python", "-P", "stages/prepare.py"], project, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: hub dataset 'timdettmers/openassistant-guanaco': not in the local Hugging Face cache and the hub is "
        "offline (HF_HUB_OFFLINE=1). Download it once online (HF_HUB_OFFLINE=0 dvc repro) or copy it into HF_DATASETS_CACHE."
    )


def bad_data_project(root: Path, tiny_model_dir: Path, fixture: str, *settings: str) -> Path:
    """A project whose only source is one malformed fixture, copied under data/raw/bad/."""
    project = make_project(root, [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])
    (project / "data/raw/bad").mkdir()
    shutil.copy(FIXTURES / "bad" / fixture, project / "data/raw/bad" / fixture)
    overrides = ["~data.sources.company_kb", f"+data.sources.bad.path=data/raw/bad/{fixture}", "data.val_fraction=0", *settings]
    if fixture.endswith(".jsonl") and "conversation" not in fixture:
        overrides += ["+data.sources.bad.columns.instruction=prompt", "+data.sources.bad.columns.output=response"]
    if "conversation" in fixture:
        overrides.append("+data.sources.bad.kind=chat")
    run(["slmtune", "params", *overrides, f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES], project)
    return project


BAD_ROWS = {
    "bad_encoding.csv": "data/raw/bad/bad_encoding.csv:5: not UTF-8 (byte 0xe9 at column 12)",
    "broken_json.jsonl": "data/raw/bad/broken_json.jsonl:5: not valid JSON",
    "missing_field.jsonl": "data/raw/bad/missing_field.jsonl:5: column 'response' is missing",
    "empty_field.csv": "data/raw/bad/empty_field.csv:5: column 'output' is empty",
    "wrong_type.jsonl": "data/raw/bad/wrong_type.jsonl:5: column 'response' must be text, got int",
    "duplicate.csv": "data/raw/bad/duplicate.csv:5: duplicate of data/raw/bad/duplicate.csv:2",
    "bad_conversation.jsonl": "data/raw/bad/bad_conversation.jsonl:4: column 'messages' ends with a user turn",
}


@pytest.mark.parametrize("fixture", list(BAD_ROWS))
def test_malformed_file_stops_prepare_with_one_line_and_no_outputs(tmp_path, tiny_model_dir, fixture):
    project = bad_data_project(tmp_path / "project", tiny_model_dir, fixture)
    result = run(["python", "-P", "stages/prepare.py"], project, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + BAD_ROWS[fixture]), result.stderr
    assert lines[0].endswith("Fix the data, or set data.on_invalid=skip to drop and count such rows.")
    assert not (project / "data/prepared").exists() and not (project / "reports/data_stats.json").exists()


def test_skipped_rows_are_counted_and_listed_and_training_goes_on(tmp_path, tiny_model_dir):
    project = bad_data_project(tmp_path / "project", tiny_model_dir, "broken_json.jsonl", "data.on_invalid=skip")
    assert_trained_through_every_stage(project)
    stats = json.loads((project / "reports/data_stats.json").read_text())
    assert stats["dropped"] == {"broken JSON": 1} and sum(stats["rows"].values()) == 12
    report = (project / "reports/data_report.md").read_text()
    assert "| broken JSON | 1 | 0 |" in report and "`data/raw/bad/broken_json.jsonl:5` (broken JSON)" in report


def test_too_long_example_stops_tokenize_or_is_skipped(tmp_path, tiny_model_dir):
    project = bad_data_project(tmp_path / "project", tiny_model_dir, "too_long.jsonl", "data.max_length=64")
    run(["python", "-P", "stages/base.py"], project)
    run(["python", "-P", "stages/prepare.py"], project)
    result = run(["python", "-P", "stages/tokenize.py"], project, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "error: data/raw/bad/too_long.jsonl:5:" in result.stderr and "longer than data.max_length=64" in result.stderr
    assert not (project / "data/tokenized").exists() and not (project / "reports/data_report.md").exists()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["on_invalid"] = "skip"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "-P", "stages/tokenize.py"], project)
    tokens = json.loads((project / "reports/token_stats.json").read_text())
    assert tokens["dropped"] == {"too long": 1} and tokens["skipped"][0]["location"] == "data/raw/bad/too_long.jsonl:5"

