"""The actual pipeline, `dvc repro`, on the real SmolLM2-135M-Instruct GGUF with a small step count."""

import json
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, Terminal, copy_project, make_project, run
from slmtune.tracking import EXP_NAME_TAG

pytestmark = pytest.mark.e2e
# LoRA unless a test says otherwise: merge, export, resume bytes and sweeps of the rank are about adapters (the
# shipped default, full fine-tuning, is the qlora/full test's and `make repro`'s).
SMALL_RUN = ["method=lora", "train.max_steps=8", "train.eval_steps=4", "eval.max_new_tokens=24"]
# Merge parity on the real model is the default test's (and `slmtune merge`'s); the others check what they vary.
NO_PARITY = "eval.merge_parity=false"
# The other shapes people bring most: prompt/response with tags, Dolly, multi-turn chat.
MORE_FORMATS = ["polite_assistant", "dolly", "support_chat"]


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> Path:
    """One SmolLM2 project whose base model (the GGUF dequantised once, 540 MB), prepared and tokenized data
    exist: each end-to-end test copies it and reruns what its settings change."""
    project = make_project(tmp_path_factory.mktemp("smollm2") / "project", SMALL_RUN)
    run(["dvc", "repro", "tokenize"], project)
    return project


def repro_with(project: Path, *overrides: str) -> tuple[str, dict]:
    """Recompose params.yaml with `overrides` (on top of the small run), `dvc repro`, return stdout and metrics."""
    run(["slmtune", "params", *SMALL_RUN, *overrides], project)
    result = run(["dvc", "repro"], project)
    return result.stdout, json.loads((project / "reports/metrics.json").read_text())


def test_smollm2_lora_pipeline_lowers_test_loss_then_merges_exports_and_chats(smollm2_base, tmp_path: Path):
    project = copy_project(smollm2_base, tmp_path)
    stdout, metrics = repro_with(project)
    assert "Running stage 'base'" not in stdout and "Running stage 'train'" in stdout
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    report = (project / "reports/before_after.md").read_text()
    for section in ("## Metrics", "## Answers", "## Lineage", "**Reference**", "**Base model**", "**Fine-tuned**"):
        assert section in report
    assert report.count("**Fine-tuned**") == metrics["test_examples"]
    config = json.loads((project / "models/base/config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (project / "models/base/model.safetensors").is_file()
    assert metrics["merge_parity"]["ok"] and "![training loss](loss_curve.png)" in report

    # Use it: merge (parity on the real model), GGUF export loaded back, a chat in a terminal
    run(["slmtune", "merge"], project)
    parity = json.loads((project / "models/merged/parity.json").read_text())
    assert parity["ok"] and parity["loss_difference"] <= 1e-4 and parity["identical_answers"] == parity["answers"]
    run(["slmtune", "export"], project)
    f16, q8 = json.loads((project / "models/gguf/export.json").read_text())["files"]
    assert f16["relative_difference"] < 0.01 and f16["tokenizer_identical"] and q8["ok"]
    terminal = Terminal(project, "--max-new-tokens", "24")
    terminal.read_until("you> ", timeout=300)
    terminal.type("How many days of paid annual leave do Lumora Systems employees get?\r")
    answer = terminal.read_until("you> ", timeout=300)
    text = answer.split("model> ", 1)[1].rsplit("you> ", 1)[0].strip()
    streamed = terminal.answer_pieces()
    assert text and len(streamed) >= 2, terminal.chunks  # the answer arrived in pieces, not at the end
    terminal.type("\x04")
    assert terminal.exit_status() == 0 and "Traceback" not in terminal.seen


@pytest.mark.parametrize(("method", "extra"), [("qlora", []), ("full", [])])  # full: its own rate, 1e-4
def test_smollm2_qlora_and_full_fine_tuning_lower_test_loss(smollm2_base, tmp_path: Path, method, extra):
    """QLoRA (4-bit NF4 base, bitsandbytes on this CPU) and full fine-tuning on the real model."""
    project = copy_project(smollm2_base, tmp_path)
    stdout, metrics = repro_with(project, f"method={method}", *extra, NO_PARITY)
    assert "Running stage 'tokenize'" not in stdout and "Running stage 'train'" in stdout, method
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"], (method, metrics)
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    assert provenance["config"]["method"]["name"] == method and provenance["metrics"]["memory/peak_rss_mb"] > 0
    counts = provenance["parameters"]
    assert (counts["trainable"] == counts["total"]) == (method == "full")


@pytest.mark.parametrize("preset", MORE_FORMATS)
def test_smollm2_lowers_test_loss_for_the_other_main_data_formats(smollm2_base, tmp_path: Path, preset):
    project = copy_project(smollm2_base, tmp_path)
    stdout, metrics = repro_with(project, f"data={preset}", NO_PARITY)
    assert "Running stage 'base'" not in stdout and "Running stage 'train'" in stdout, preset
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"], (preset, metrics)
    assert "## Rows per source and split" in (project / "reports/data_report.md").read_text()


def test_smollm2_killed_one_step_past_the_first_epoch_resumes_to_the_same_adapter_bytes(smollm2_base, tmp_path: Path):
    """company_kb without augmentation: 87 training examples in batches of 8, 11 steps an epoch; SIGKILL once
    checkpoint-12 exists."""
    from test_train import kill_at_checkpoint, losses

    settings = ["train.max_steps=24", "train.save_steps=6", "train.eval_steps=12", "augment.generator=none"]
    whole = copy_project(smollm2_base, tmp_path / "whole")
    killed = copy_project(smollm2_base, tmp_path / "killed")
    for project in (whole, killed):
        run(["slmtune", "params", *SMALL_RUN, *settings], project)
    run(["dvc", "repro", "train"], whole)
    kill_at_checkpoint(killed, 12)
    assert "checkpoint-12 (MLflow run" in run(["dvc", "repro", "train"], killed).stdout
    assert losses(killed) == losses(whole) and len(losses(whole)) == 24
    adapter = "models/adapter/adapter_model.safetensors"
    assert (killed / adapter).read_bytes() == (whole / adapter).read_bytes()


def test_smollm2_two_by_two_sweep_from_a_fresh_clone(tmp_path: Path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    grid = ["-S", "method=lora", "-S", "method.r=4,8", "-S", "train.learning_rate=3e-4,1e-3"]
    small = ["-S", "train.max_steps=8", "-S", "train.eval_steps=4", "-S", "eval.max_new_tokens=16", "-S", NO_PARITY]
    result = run(["slmtune", "sweep", *grid, *small, "-j", "2"], clone)
    for stage in ("base", "prepare", "tokenize"):
        assert result.stdout.count(f"Running stage '{stage}'") == 1

    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("slmtune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:  # only the experiment's own params; not the clone's outputs that DVC replaced mid-run
        assert set(child.data.tags["slmtune.git_dirty_files"].split()) <= {"params.yaml"}, child.data.tags
    assert {(c.data.params["method.r"], c.data.params["train.learning_rate"]) for c in children} == {
        (r, lr) for r in ("4", "8") for lr in ("0.0003", "0.001")
    }
    table = run(["dvc", "exp", "show", "--csv", "--no-pager"], clone).stdout
    report = (clone / "reports/sweep.md").read_text()
    ranked = [line.split(" | ")[1].strip("`") for line in report.splitlines() if line.startswith("| ") and "`" in line]
    by_name = {c.data.tags[EXP_NAME_TAG]: c for c in children}
    assert sorted(ranked) == sorted(by_name) and all(name in table for name in ranked)
    losses = [by_name[name].data.metrics["test/tuned/loss"] for name in ranked]
    assert losses == sorted(losses)
    for name in ranked:
        logs = run(["dvc", "queue", "logs", name], clone).stdout
        assert "Stage 'tokenize' didn't change, skipping" in logs and "Running stage 'train'" in logs
        assert by_name[name].data.metrics["test/tuned/loss"] < by_name[name].data.metrics["test/base/loss"]
