"""Every method, task type and architecture through the real `dvc repro`, on tiny random models."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import TINY_OVERRIDES, make_project, run, sample_texts
from slmtune.config import compose_params
from tiny_models import save_tiny_model


def tiny_overrides(model_dir: Path) -> list[str]:
    return [f"model.source={model_dir}", "model.gguf_file=null", *TINY_OVERRIDES]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny-Llama (width 64, so that 4-bit kernels take it) project whose base/prepare/tokenize ran once,
    and the model folder."""
    root = tmp_path_factory.mktemp("methods")
    model_dir = save_tiny_model(root / "tiny-llama-64", sample_texts(), "llama")
    project = make_project(root / "project", tiny_overrides(model_dir))
    run(["dvc", "repro", "tokenize"], project)
    return project, model_dir


def copy_project(tokenized: tuple[Path, Path], tmp_path: Path) -> Path:
    return shutil.copytree(tokenized[0], tmp_path / "project", symlinks=True)


def repro(project: Path, overrides: list[str]) -> dict:
    """Recompose params.yaml with `overrides`, run `dvc repro`, return metrics + provenance."""
    compose_params(project, project / "params.yaml", overrides)
    result = run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    return {"stdout": result.stdout, "metrics": metrics, "provenance": provenance}


def adapter_tensors(project: Path) -> dict:
    with safe_open(str(project / "models/adapter/adapter_model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("method", ["lora", "qlora", "lora_8bit", "full", "dora", "rslora"])
def test_each_method_trains_end_to_end(tokenized, tmp_path, method):
    project = copy_project(tokenized, tmp_path)
    out = repro(project, [*tiny_overrides(tokenized[1]), f"method={method}"])
    assert "Running stage 'train'" in out["stdout"] and "Running stage 'tokenize'" not in out["stdout"]
    counts, metrics = out["provenance"]["parameters"], out["metrics"]
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert out["provenance"]["metrics"]["memory/peak_rss_mb"] > 0 and out["provenance"]["metrics"]["tokens_per_second"] > 0
    adapter = project / "models/adapter"
    assert type(model_card_model(project)).__name__ == ("LlamaForCausalLM" if method == "full" else "PeftModelForCausalLM")
    if method == "full":
        assert counts["trainable"] == counts["total"]
        assert (adapter / "model.safetensors").is_file() and not (adapter / "adapter_config.json").exists()
        return
    assert 0 < counts["trainable"] < counts["total"] / 2
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == (method == "rslora")
    names = adapter_tensors(project)
    assert any("lora_A" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names) == (method == "dora")
    if method in ("lora", "qlora", "lora_8bit"):  # quantised weights count as parameters, not packed bytes
        base_params = _base_parameters(project)
        assert counts["total"] == base_params + counts["trainable"]


def model_card_model(project: Path):
    """Run the loading snippet of the adapter's model card in the project; return the model it loads."""
    card = (project / "models/adapter/README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(project)
    try:
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    return scope["model"]


def _base_parameters(project: Path) -> int:
    from slmtune.modeling import load_model

    return sum(p.numel() for p in load_model(project / "models/base").parameters())


def test_training_controls_target_modules_early_stopping_checkpointing_memory_monitor(tokenized, tmp_path):
    import mlflow

    project = copy_project(tokenized, tmp_path)
    out = repro(project, [*tiny_overrides(tokenized[1]), "method.target_modules=[q_proj,v_proj]", "method.r=4",
                          "train.max_steps=30", "train.eval_steps=3", "train.save_steps=3", "train.early_stopping_patience=1",
                          "train.early_stopping_threshold=10.0", "train.gradient_checkpointing=true",
                          "train.gradient_accumulation_steps=2", "train.monitor_memory=true"])  # fmt: skip
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4
    # no evaluation can improve by 10 nats: stopped at the second evaluation (step 6), not at max_steps
    assert out["provenance"]["metrics"]["steps"] == 6
    assert out["provenance"]["config"]["train"]["gradient_checkpointing"] is True
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    logged = mlflow.get_run(out["provenance"]["mlflow"]["run_id"]).data.metrics
    assert {"memory/load/rss_mb", "memory/prepared/rss_mb", "memory/rss_mb", "memory/peak_rss_mb"} <= set(logged)


@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "gpt2"])
def test_each_causal_architecture_runs_the_pipeline(tmp_path, arch):
    model_dir = save_tiny_model(tmp_path / f"tiny-{arch}", sample_texts(), arch)
    project = make_project(tmp_path / "project", tiny_overrides(model_dir))
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    expected = {"gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
                "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc", "c_proj"]}  # fmt: skip
    assert sorted(config["target_modules"]) == expected[arch]
    assert json.loads((project / "models/base/config.json").read_text())["model_type"] == arch
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert provenance["parameters"]["trainable"] > 0


def test_continued_pretraining_on_raw_text(tokenized, tmp_path):
    project = copy_project(tokenized, tmp_path)
    out = repro(project, [*tiny_overrides(tokenized[1]), "data=handbook_text"])
    assert "Running stage 'tokenize'" in out["stdout"]
    stats = json.loads((project / "reports/token_stats.json").read_text())
    assert stats["splits"]["train"]["trained_share"] == 1.0  # every token of raw text carries the loss
    assert out["metrics"]["tuned"]["loss"] < out["metrics"]["base"]["loss"]


def test_sequence_classification_with_lora_on_distilbert(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny-distilbert", sample_texts(), "distilbert")
    overrides = [*tiny_overrides(model_dir), "model.task=classification", "data=sentiment",
                 "train.max_steps=40", "train.eval_steps=10", "train.learning_rate=3e-3", "train.batch_size=8"]  # fmt: skip
    project = make_project(tmp_path / "project", overrides)
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["labels"] == ["negative", "positive"]
    assert set(metrics["tuned"]) == {"accuracy", "f1", "loss"} and 0 <= metrics["tuned"]["f1"] <= 1
    # A random 2-layer encoder with a toy vocabulary learns little from 56 reviews in 40 steps (its loss stays
    # near ln 2); what must hold is that the head trained from the init that "base" is scored with.
    with open(project / "reports/train_log.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 40
    monkeypatch.chdir(project)
    from slmtune.config import load_config
    from slmtune.evaluation import base_model

    base_head = dict(base_model(load_config(), metrics["labels"], 1).classifier.named_parameters())
    trained = {k: v for k, v in adapter_tensors(project).items() if k.startswith("base_model.model.classifier.")}
    assert len(trained) == 2
    for name, tensor in trained.items():
        assert not tensor.allclose(base_head[name.rsplit(".", 1)[-1]]), name
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and {"classifier", "pre_classifier"} <= set(config["modules_to_save"])
    assert sorted(config["target_modules"]) == ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"]
    report = (project / "reports/before_after.md").read_text()
    assert "| Accuracy |" in report and "| Macro F1 |" in report and "(classification)" in report
    generations = [json.loads(line) for line in (project / "reports/generations.jsonl").open()]
    assert {g["reference"] for g in generations} <= {"negative", "positive"} and len(generations) == metrics["test_examples"]


def test_distilbert_parameter_count_matches_the_seed():
    """The seed's LoRA sentiment example: distilbert-base-uncased, r=4 on q_lin, head trained:
    `trainable params: 628,994 || all params: 67,584,004`. Same architecture, random weights."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from slmtune.config import Config, MethodConfig
    from slmtune.modeling import parameter_counts
    from slmtune.training import lora_model

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))  # distilbert-base-uncased's shape
    config = Config(method=MethodConfig(r=4, alpha=32, dropout=0.01, target_modules=["q_lin"]))
    config.model.task = "classification"
    counts = parameter_counts(lora_model(model, config))
    assert counts == {"trainable": 628_994, "total": 67_584_004}
