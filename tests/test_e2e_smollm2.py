"""The actual pipeline, `dvc repro`, on the real SmolLM2-135M-Instruct GGUF with a small step count."""

import json
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, Terminal, built_once, copy_project, make_project, run
from slmtune.tracking import EXP_NAME_TAG

pytestmark = pytest.mark.e2e
# LoRA unless a test says otherwise: merge, export, resume bytes and sweeps of the rank are about adapters (the
# shipped default, full fine-tuning, is the qlora/full test's and `make repro`'s).
# 8 steps of 4 examples: enough to lower the real model's test loss, and half the tokens of the default batch (CI time)
SMALL_RUN = ["method=lora", "train.max_steps=8", "train.batch_size=4", "train.eval_steps=4", "eval.max_new_tokens=24"]
# Merge parity on the real model is the default test's (and `slmtune merge`'s); the others check what they vary.
NO_PARITY = "eval.merge_parity=false"
# Runs that check losses and lineage, not answers, generate short ones (the default test and the chat read answers).
SHORT_ANSWERS = "eval.max_new_tokens=8"
# Every method besides the default test's LoRA, and the other shapes people bring most (prompt/response with tags,
# Dolly, multi-turn chat), each method paired with one format: one real-model run each instead of one per method and
# one per format. Full fine-tuning (the shipped default) stays on the knowledge base, as `make repro` runs it.
METHODS_AND_FORMATS = [
    ("full", "company_kb"),
    ("qlora", "polite_assistant"),
    ("lora", "dolly"),
    ("lora", "support_chat"),
]


@pytest.fixture(scope="session")
def smollm2_base(shared_tmp) -> Path:
    """One SmolLM2 project whose base model (the GGUF dequantised once, 540 MB), prepared and tokenized data
    exist, built once for all workers: each end-to-end test copies it and reruns what its settings change."""

    def build(folder: Path) -> str:
        project = make_project(folder / "project", SMALL_RUN)
        run(["dvc", "repro", "tokenize"], project)
        return str(project)

    return Path(built_once(shared_tmp, "smollm2", build))


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


@pytest.mark.parametrize(("method", "preset"), METHODS_AND_FORMATS, ids=[f"{m}-{p}" for m, p in METHODS_AND_FORMATS])
def test_smollm2_methods_and_data_formats_lower_test_loss(smollm2_base, tmp_path: Path, method, preset):
    """QLoRA (4-bit NF4 base, bitsandbytes on this CPU), full fine-tuning (its own rate, 1e-4) and LoRA on the real
    model, over the data shapes people bring: each run pairs one method with one format."""
    project = copy_project(smollm2_base, tmp_path)
    stdout, metrics = repro_with(project, f"method={method}", f"data={preset}", NO_PARITY, SHORT_ANSWERS)
    assert "Running stage 'base'" not in stdout and "Running stage 'train'" in stdout
    assert ("Running stage 'tokenize'" in stdout) == (preset != "company_kb")  # the fixture tokenized company_kb
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"], (method, preset, metrics)
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    assert provenance["config"]["method"]["name"] == method and provenance["metrics"]["memory/peak_rss_mb"] > 0
    counts = provenance["parameters"]
    assert (counts["trainable"] == counts["total"]) == (method == "full")
    assert "## Rows per source and split" in (project / "reports/data_report.md").read_text()


def test_smollm2_killed_one_step_past_the_first_epoch_resumes_to_the_same_adapter_bytes(smollm2_base, tmp_path: Path):
    """company_kb without augmentation and a seeded half of its training rows: 44 examples in batches of 8, 6 steps
    an epoch; SIGKILL once checkpoint-7 exists, a validation pass after the resume (step 8)."""
    from test_train import kill_at_checkpoint, losses

    settings = ["train.max_steps=9", "train.batch_size=8", "train.save_steps=7", "train.eval_steps=8"]
    settings.append("augment.generator=none")
    settings.append("+data.sources.company_kb.weight=0.5")
    whole = copy_project(smollm2_base, tmp_path / "whole")
    killed = copy_project(smollm2_base, tmp_path / "killed")
    for project in (whole, killed):
        run(["slmtune", "params", *SMALL_RUN, *settings], project)
    run(["dvc", "repro", "train"], whole)
    train_rows = (whole / "data/prepared/train.jsonl").read_text().count("\n")
    assert train_rows == 44, train_rows  # an epoch of 6 steps: the kill is one step into the second
    kill_at_checkpoint(killed, 7)
    assert "checkpoint-7 (MLflow run" in run(["dvc", "repro", "train"], killed).stdout
    assert losses(killed) == losses(whole) and len(losses(whole)) == 9
    adapter = "models/adapter/adapter_model.safetensors"
    assert (killed / adapter).read_bytes() == (whole / adapter).read_bytes()


def test_smollm2_sweep_from_a_fresh_clone(tmp_path: Path):
    """Two ranks in two parallel queue workers on the real model (the grid's expansion over several keys is
    `test_sweep`'s, on the tiny model)."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    grid = ["-S", "method=lora", "-S", "method.r=4,8", "-S", "train.learning_rate=1e-3"]
    small = ["-S", "train.max_steps=8", "-S", "train.batch_size=4", "-S", "train.eval_steps=4"]
    small += ["-S", SHORT_ANSWERS, "-S", NO_PARITY]
    result = run(["slmtune", "sweep", *grid, *small, "-j", "2"], clone)
    for stage in ("base", "prepare", "tokenize"):
        assert result.stdout.count(f"Running stage '{stage}'") == 1

    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("slmtune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:  # only the experiment's own params; not the clone's outputs that DVC replaced mid-run
        assert set(child.data.tags["slmtune.git_dirty_files"].split()) <= {"params.yaml"}, child.data.tags
    assert {(c.data.params["method.r"], c.data.params["train.learning_rate"]) for c in children} == {
        ("4", "0.001"),
        ("8", "0.001"),
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
