"""Fine-tuning with peft and the transformers Trainer: the model as it trains (quantised, wrapped in LoRA
adapters, or whole), the Trainer and its batches, the loop, and saving the result."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .config import Config
from .errors import ConfigError
from .modeling import default_target_modules, head_modules, load_model
from .outputs import write_json
from .prompting import IGNORE_INDEX, padding_collator
from .telemetry import MemoryMonitor, StepLog, TokenCounter


def class_labels(config: Config) -> list[str] | None:
    """The classes `tokenize` found (classification), else None."""
    if config.model.task != "classification":
        return None
    return json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))["labels"]


def lora_model(model: Any, config: Config) -> Any:
    """Wrap `model` with trainable LoRA (or DoRA / rsLoRA) adapters as configured; their init is seeded.
    A classifier's new head trains in full and is saved with the adapter."""
    method = config.method
    targets = list(method.target_modules) if method.target_modules else default_target_modules(model)
    classify = config.model.task == "classification"
    to_save = list(method.modules_to_save) if method.modules_to_save else (head_modules(model) if classify else None)
    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=method.bias,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        modules_to_save=to_save,
        task_type="SEQ_CLS" if classify else "CAUSAL_LM",
    )
    set_seed(config.train.seed)
    return get_peft_model(model, lora)


def prepare_model(config: Config, tokenizer: Any, monitor: MemoryMonitor) -> Any:
    """The model as it trains: loaded (quantised for QLoRA / 8-bit), prepared for k-bit training, wrapped
    in adapters unless the method is full fine-tuning."""
    method = config.method
    model = load_model(
        config.paths.base_model, config.model.dtype, method, class_labels(config), tokenizer.pad_token_id
    )
    monitor.record("load")
    model.config.use_cache = False  # no KV cache in training (a cache also hides packed-sequence boundaries)
    if method.quantization != "none":
        # casts norms and the head to fp32 and lets gradients reach the adapters through frozen quantised layers
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if method.adapter == "lora":
        model = lora_model(model, config)
    monitor.record("prepared")
    return model


def use_bf16(train: Any) -> bool:
    if train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return train.precision == "bf16"


def training_arguments(config: Config, output_dir: str, has_val: bool = True) -> TrainingArguments:
    """Trainer arguments from the config: length-grouped (or packed) batches, checkpoints in `output_dir`."""
    train = config.train
    early = train.early_stopping_patience > 0 and has_val
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        bf16=use_bf16(train),
        fp16=train.precision == "fp16",
        train_sampling_strategy="group_by_length" if train.group_by_length and not train.packing else "random",
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=max(train.save_steps, 1),
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if train.num_processes > 1 else None,
    )


def make_collator(config: Config, tokenizer: Any) -> TokenCounter:
    """Padding-free (packed) batches, padding to the batch's longest example, or (classification) class ids."""
    if config.model.task == "classification":
        return TokenCounter(DataCollatorWithPadding(tokenizer, padding="longest"))
    if config.train.packing:
        return TokenCounter(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX))
    return TokenCounter(padding_collator(tokenizer))


def build_trainer(
    config: Config, model: Any, tokenizer: Any, splits: Any, output_dir: str, callbacks: list, collator: Any = None
) -> Trainer:
    """A Trainer whose batches carry no padding beyond the batch's longest example (or none, packed)."""
    has_val = "val" in splits
    train = config.train
    if train.early_stopping_patience > 0:
        if not has_val:
            raise ConfigError(
                "train.early_stopping_patience needs a validation split; raise data.val_fraction or set it to 0."
            )
        callbacks = [*callbacks, EarlyStoppingCallback(train.early_stopping_patience, train.early_stopping_threshold)]
    return Trainer(
        model=model,
        args=training_arguments(config, output_dir, has_val),
        train_dataset=splits["train"],
        eval_dataset=splits["val"] if has_val else None,
        data_collator=collator or make_collator(config, tokenizer),
        callbacks=callbacks,
    )


def check_world_size(trainer: Trainer) -> None:
    """Every launched process must be a rank of one job: otherwise each would train alone on all the data."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but the Trainer sees a world of {trainer.args.world_size}: each "
            "would train alone on all the data. Launch through the train stage (train.num_processes) or set "
            "ACCELERATE_USE_CPU=true without a GPU."
        )


def fit(
    config: Config,
    model: Any,
    tokenizer: Any,
    splits: Any,
    step_log: StepLog,
    output_dir: str | None = None,
    resume: bool = False,
) -> tuple[dict[str, float], dict | None]:
    """Train `model` in place on the tokenized splits, checkpointing into `output_dir` (a scratch folder
    when None) and resuming from its last checkpoint with `resume`; return losses and throughput, and after
    FSDP training the full state dict gathered from the shards (else None)."""
    set_seed(config.train.seed)
    with tempfile.TemporaryDirectory(prefix="slmtune-trainer-") as scratch:
        collator = make_collator(config, tokenizer)
        trainer = build_trainer(config, model, tokenizer, splits, output_dir or scratch, [step_log], collator)
        check_world_size(trainer)
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        runtime = float(result.metrics["train_runtime"])
        metrics = {
            "train_loss": float(result.training_loss),
            "steps": float(result.global_step),
            "train_runtime_s": runtime,
            "tokens_per_second": collator.tokens / runtime if runtime else 0.0,
        }
        if trainer.eval_dataset is not None:
            metrics["val_loss"] = final_val_loss(trainer)
        # Sharded (FSDP) weights: every rank joins in gathering the full state dict that rank 0 saves.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    return metrics, state_dict


def final_val_loss(trainer: Trainer) -> float:
    """The validation loss of the weights training ended with: the evaluation logged at the last step when
    there was one (and no best checkpoint was reloaded), else a new evaluation."""
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    logged = [e["eval_loss"] for e in last if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    if logged and not trainer.args.load_best_model_at_end:
        return float(logged[-1])
    return float(trainer.evaluate()["eval_loss"])


def save_adapter(model: Any, tokenizer: Any, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """peft's adapter files, with `target_modules` in a fixed order (peft keeps a set, whose order
    follows the hash seed) so that the same training gives the same bytes. Full fine-tuning saves the
    whole model and its tokenizer: a model folder that loads on its own. After FSDP training, `state_dict`
    is the one `fit` gathered from the shards."""
    if not hasattr(model, "peft_config"):
        model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        return
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(adapter_config.get(key), list):
            adapter_config[key] = sorted(set(adapter_config[key]))
    write_json(config_path, adapter_config)
