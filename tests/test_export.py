"""`slmtune merge` (a standalone model, parity-checked) and `slmtune export` (GGUF, loaded back and compared)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import SLMTUNE, run


def test_merge_saves_a_standalone_model_with_parity(trained, tmp_path):
    output = tmp_path / "merged"
    result = run([*SLMTUNE, "merge", "-o", str(output)], trained)
    assert "merge parity: PASS" in result.stdout
    parity = json.loads((output / "parity.json").read_text())
    assert parity["ok"] and parity["loss_difference"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no peft
    assert type(model).__name__ == "LlamaForCausalLM" and (output / "tokenizer.json").is_file()
    train_run = json.loads((output / "provenance.json").read_text())["mlflow"]["run_id"]
    # the merge's MLflow run sits under the training run, with its params and result file
    logged = re.search(r"logged to MLflow run (\w+), under training run (\w+)", result.stdout)
    assert logged and logged.group(2) == train_run
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    merge_run = client.get_run(logged.group(1))
    assert merge_run.data.tags["mlflow.parentRunId"] == train_run and merge_run.info.run_name.startswith("merge of ")
    assert merge_run.data.params["output"] == str(output) and merge_run.data.metrics["merge/ok"] == 1.0
    assert json.loads(Path(client.download_artifacts(logged.group(1), "merge/merge.json")).read_text())["ok"]
    # The merged weights are the base's plus scale * B @ A of the saved adapter, worked out here from the files
    # (parity alone cannot see a dropped adapter when the adapter moves the loss by less than the tolerance)
    base = load_file(trained / "models/base/model.safetensors")
    merged = load_file(output / "model.safetensors")
    adapter = load_file(trained / "models/adapter/adapter_model.safetensors")
    settings = json.loads((trained / "models/adapter/adapter_config.json").read_text())
    scale = settings["lora_alpha"] / (math.sqrt(settings["r"]) if settings["use_rslora"] else settings["r"])
    lora_a = [key for key in adapter if key.endswith(".lora_A.weight")]
    assert len(lora_a) == 7 * 2  # every projection of both layers
    for key in lora_a:
        weight = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        delta = scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        assert float(delta.abs().max()) > 1e-3, key  # the adapter did learn something here
        torch.testing.assert_close(merged[weight], base[weight] + delta, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(merged[k], t) for k, t in base.items() if k not in {w for w in merged if "proj" in w})


def test_merge_whose_parity_fails_writes_nothing(trained, tmp_path, monkeypatch):
    """A merged model that does not reload to the same answers (here: its saved weights come back perturbed)
    stops `merge` with the figures and leaves no folder behind."""
    from slmtune import export
    from slmtune.config import load_config
    from slmtune.errors import ExportError

    class Perturbed:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            model = AutoModelForCausalLM.from_pretrained(*args, **kwargs)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(1.05)
            return model

    monkeypatch.chdir(trained)
    monkeypatch.setattr(export, "AutoModelForCausalLM", Perturbed)
    output = tmp_path / "merged"
    with pytest.raises(ExportError, match=r"merge parity failed .*nothing written to"):
        export.merge_adapter(load_config("params.yaml"), None, output)
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_merge_by_mlflow_run_id_and_refuses_a_missing_adapter(trained, tmp_path):
    run_id = json.loads((trained / "models/adapter/provenance.json").read_text())["mlflow"]["run_id"]
    result = run([*SLMTUNE, "merge", "--adapter", run_id, "-o", str(tmp_path / "m")], trained)
    assert "merge parity: PASS" in result.stdout
    missing = run([*SLMTUNE, "merge", "--adapter", "0123456789abcdef", "-o", str(tmp_path / "n")], trained, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith(
        "error: 0123456789abcdef: not a folder, and no MLflow run"
    )
    assert not (tmp_path / "n").exists()


def test_gguf_export_round_trips_through_transformers(trained, tmp_path):
    from gguf import GGUFReader

    merged = tmp_path / "merged"
    run([*SLMTUNE, "merge", "-o", str(merged)], trained)
    output = tmp_path / "gguf"
    result = run([*SLMTUNE, "export", "--model", str(merged), "-o", str(output)], trained)
    files = json.loads((output / "export.json").read_text())["files"]
    assert [f["file"] for f in files] == ["model-f16.gguf", "model-q8_0.gguf"]
    f16, q8 = files
    assert f16["ok"] and f16["relative_difference"] < 0.01 and f16["tokenizer_identical"]
    assert q8["ok"] and q8["bytes"] < f16["bytes"]
    assert f16["weights_relative_error"] < 1e-3 and q8["weights_relative_error"] < 2e-2
    # Independently of the exporter's own check: every tensor transformers reads back from the F16 file is the
    # merged model's, to F16 rounding (the tiny model's loss cannot tell a wrong q/k permutation apart)
    reference = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(output, gguf_file="model-f16.gguf").state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=2e-3, atol=1e-3 * float(tensor.abs().max()), msg=name)
    reader = GGUFReader(output / "model-q8_0.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert result.stdout.count(": PASS") == 2


def test_export_needs_a_merged_model(trained, tmp_path):
    result = run([*SLMTUNE, "export", "--model", str(tmp_path / "nothing")], trained, check=False)
    assert result.returncode == 1 and "Run `slmtune merge` first" in result.stderr


def test_export_refuses_unknown_types_and_architectures_it_cannot_write(tmp_path):
    from conftest import sample_texts
    from slmtune.config import Config
    from slmtune.errors import ExportError
    from slmtune.export import export_gguf, write_gguf
    from tiny_models import save_tiny_model

    with pytest.raises(ExportError, match=r"^--type q4_k: use one of f16, q8_0\.$"):
        export_gguf(Config(), str(tmp_path), str(tmp_path / "out"), ["f16", "q4_k"])
    gpt2 = save_tiny_model(tmp_path / "gpt2", sample_texts(), arch="gpt2")
    with pytest.raises(ExportError, match=r"GGUF export supports model types llama, not gpt2; use llama\.cpp"):
        write_gguf(gpt2, tmp_path / "model.gguf", "f16", "tiny")
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.gguf").exists()
