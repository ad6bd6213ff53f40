"""The actual pipeline, `dvc repro`, on the real SmolLM2-135M-Instruct GGUF with a small step count."""

import json
from pathlib import Path

import pytest

from conftest import make_project, run

pytestmark = pytest.mark.e2e
SMALL_RUN = ["train.max_steps=12", "train.eval_steps=6", "eval.max_new_tokens=24"]
# The other shapes people bring most: prompt/response with tags, Dolly, multi-turn chat.
MORE_FORMATS = ["polite_assistant", "dolly", "support_chat"]


def test_smollm2_pipeline_lowers_test_loss_for_every_main_data_format(tmp_path: Path):
    project = make_project(tmp_path / "project", SMALL_RUN)
    run(["dvc", "repro"], project)

    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    report = (project / "reports/before_after.md").read_text()
    for section in ("## Metrics", "## Answers", "## Lineage", "**Reference**", "**Base model**", "**Fine-tuned**"):
        assert section in report
    assert report.count("**Fine-tuned**") == metrics["test_examples"]
    config = json.loads((project / "models/base/config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (project / "models/base/model.safetensors").is_file()

    for preset in MORE_FORMATS:
        run(["slmtune", "params", f"data={preset}", *SMALL_RUN], project)
        result = run(["dvc", "repro"], project)
        assert "Running stage 'base'" not in result.stdout and "Running stage 'train'" in result.stdout, preset
        metrics = json.loads((project / "reports/metrics.json").read_text())
        assert metrics["tuned"]["loss"] < metrics["base"]["loss"], (preset, metrics)
        assert "## Rows per source and split" in (project / "reports/data_report.md").read_text()
