"""The whole pipeline through the real `dvc repro` on tiny models: every stage then nothing, params tracked,
every data format end to end, and outputs that appear all together or not at all."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import yaml

from conftest import (
    STAGES,
    TINY_OVERRIDES,
    assert_trained_through_every_stage,
    data_report_rows,
    imported_code,
    make_project,
    run,
)
from slmtune.lineage import dvc_lock_hashes
from slmtune.outputs import staged_outputs

REPORT_SECTIONS = ["# Before and after fine-tuning", "## Metrics", "## Checks", "## Answers", "## Lineage"]


def test_dvc_repro_runs_every_stage_then_nothing(tiny_trained):
    tiny_project = tiny_trained.project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in tiny_trained.first
    assert "Running stage" not in tiny_trained.second
    # without a terminal: plain progress lines, no bar soup, no raw log dicts, no library warnings or INFO lines
    log = tiny_trained.log
    assert re.search(r"^train: 6/6 \(100%\), [0-9.]+ step/s, [0-9:]+ elapsed, loss [0-9.]+, [0-9,]+ tok/s$", log, re.M)
    assert re.search(r"^tokenize train: \d+/\d+ \(100%\)", log, re.M) and "step 6/6: validation loss" in log
    for noise in ("\r", "{'loss'", "{'eval_loss'", "Warning", "INFO", "pin_memory", "it/s]"):
        assert noise not in log, noise

    metrics = json.loads((tiny_project / "reports/metrics.json").read_text())
    for model in ("base", "tuned"):
        assert set(metrics[model]) == {
            "fact_accuracy",
            "loss",
            "perplexity",
            "bleu",
            "rouge1",
            "rouge2",
            "rougeL",
            "exact_match",
            "token_f1",
            "contains",
        }
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
    assert {"prepared", "augmented", "tokenized", "base_model"} <= set(provenance["inputs"])
    assert set(provenance["code"]) == set(imported_code("train"))  # every module that shapes a batch or a weight
    head = run(["git", "rev-parse", "HEAD"], tiny_project).stdout.strip()
    assert provenance["git"]["commit"] == head and head in report

    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    run_data = mlflow.get_run(provenance["mlflow"]["run_id"])
    assert run_data.data.tags["mlflow.source.git.commit"] == head
    assert run_data.data.params["method.r"] == "16"
    # one name per figure: curves under train/ and val/, test results under test/; constants are params or tags
    names = set(run_data.data.metrics)
    assert {
        "test/base/loss",
        "test/tuned/loss",
        "loss/train",
        "loss/val",
        "train/mean_loss",
        "train/runtime_s",
    } <= names
    assert not names & {"train_loss", "eval_loss", "val_loss", "train_runtime", "train_runtime_s", "loss", "epoch"}
    assert not [n for n in names if n.startswith(("data/", "params/", "eval_"))] and "padding_free" not in names
    assert run_data.data.params["data_stats.rows.train"] == str(
        json.loads((tiny_project / "reports/data_stats.json").read_text())["rows"]["train"]
    )
    assert run_data.data.tags["slmtune.padding_free"] in ("0", "1")
    assert all(t.startswith(("slmtune.", "mlflow.")) for t in run_data.data.tags), sorted(run_data.data.tags)
    model_name = Path(provenance["config"]["model"]["source"]).name  # the run says what it is
    assert run_data.info.run_name == f"{model_name} · company_kb · lora r16 · lr 0.001 · 6 steps"
    versions = mlflow.tracking.MlflowClient().search_model_versions("name='slmtune-company_kb'")
    assert [v.run_id for v in versions] == [run_data.info.run_id]  # the Models page lists the tuned model
    assert run_data.data.tags["slmtune.registered_model"] == f"slmtune-company_kb/{versions[0].version}"
    registered = mlflow.pyfunc.load_model(f"models:/slmtune-company_kb/{versions[0].version}")
    answers = registered.predict(
        ["How many sick days do I get?", "Who approves expenses?"], params={"max_new_tokens": 4}
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert {d.dataset.digest for d in run_data.inputs.dataset_inputs} == {
        e["md5"] for e in provenance["inputs"].values()
    }
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_data.info.run_id, "reports")}
    assert {"reports/before_after.md", "reports/loss_curve.png"} <= artifacts
    # MLflow's markdown viewer shows only absolute image URLs: the logged copy links the run's own plot
    logged = mlflow.artifacts.download_artifacts(run_id=run_data.info.run_id, artifact_path="reports/before_after.md")
    url = f"http://127.0.0.1:5000/get-artifact?path=reports%2Floss_curve.png&run_uuid={run_data.info.run_id}"
    assert f"]({url})" in Path(logged).read_text() and "](loss_curve.png)" in report
    data_artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_data.info.run_id, "data")}
    assert {"data/data_report.md", "data/data_lengths.png"} <= data_artifacts
    assert run_data.info.artifact_uri.startswith((tiny_project / "mlartifacts").as_uri())


FORMAT_PRESETS = [
    "polite_assistant",
    "dolly",
    "support_chat",
    "support_chat_sharegpt",
    "dialogue_summary",
    "handbook_text",
    "company_kb_parquet",
    "kb_and_polite",
]


@pytest.mark.pipeline
@pytest.mark.parametrize("preset", FORMAT_PRESETS)
def test_every_data_format_trains_through_dvc_repro(tmp_path, tiny_model_dir, preset):
    project = make_project(
        tmp_path / "project",
        [f"data={preset}", f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES],
    )
    assert_trained_through_every_stage(project)
    stats = json.loads((project / "reports/data_stats.json").read_text())
    configured = yaml.safe_load((project / "params.yaml").read_text())["data"]["sources"]
    origins = Counter(json.loads(line)["origin"] for line in (project / "data/prepared/train.jsonl").open())
    assert stats["dropped"] == {} and dict(origins) == stats["rows_by_source"]["train"]
    for name, entry in configured.items():  # every source reached its split (training unless it names one)
        split = entry.get("split") or "train"
        assert stats["rows_by_source"][split].get(name, 0) > 0 and (split != "train" or origins[name] > 0), name


@pytest.mark.pipeline
def test_hub_dataset_from_the_local_cache_trains_through_dvc_repro(tmp_path, tiny_model_dir, hub_cache):
    overrides = [
        "data=hub_guanaco",
        "data.sources.guanaco.path=slmtune-test/tiny_corpus",
        "data.sources.guanaco.columns.text=content",
    ]
    project = make_project(
        tmp_path / "project", [*overrides, f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES]
    )
    assert_trained_through_every_stage(project)
    assert sum(data_report_rows(project)["train"].values()) > 0


def test_staged_outputs_publish_all_together(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "old").write_text("old")
    with staged_outputs(tmp_path / "dir", tmp_path / "f.json") as (d, f):
        d.mkdir()
        (d / "new").write_text("new")
        f.write_text("{}")
        assert not (tmp_path / "f.json").exists(), "nothing is visible before the block ends"
    assert os.listdir(tmp_path / "dir") == ["new"] and (tmp_path / "f.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["dir", "f.json"], "no temporaries left behind"


def test_staged_outputs_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), staged_outputs(tmp_path / "out", tmp_path / "stats.json") as (out, stats):
        out.mkdir()
        stats.write_text("half")
        raise RuntimeError("stage failed")
    assert os.listdir(tmp_path) == []


def test_staged_outputs_require_every_declared_output(tmp_path):
    with (
        pytest.raises(RuntimeError, match="did not write its declared output"),
        staged_outputs(tmp_path / "a", tmp_path / "b") as (a, _),
    ):
        a.write_text("only one")
    assert os.listdir(tmp_path) == []
