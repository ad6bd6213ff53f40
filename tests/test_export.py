"""`slmtune merge` (a standalone model, parity-checked) and `slmtune export` (GGUF, loaded back and compared)."""

import json

from conftest import SLMTUNE, run


def test_merge_saves_a_standalone_model_with_parity(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    result = run([*SLMTUNE, "merge", "-o", str(output)], trained)
    assert "merge parity: PASS" in result.stdout
    parity = json.loads((output / "parity.json").read_text())
    assert parity["ok"] and parity["loss_difference"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no peft
    assert type(model).__name__ == "LlamaForCausalLM" and (output / "tokenizer.json").is_file()
    assert json.loads((output / "provenance.json").read_text())["mlflow"]["run_id"]


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
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

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
