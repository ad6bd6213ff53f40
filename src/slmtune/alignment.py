"""Preference tuning through TRL's trainers (DPO, ORPO, KTO), starting from the SFT adapter.

The policy is the SFT result with a trainable adapter; the reference is the same model with that adapter disabled,
never a second copy of the model:

- SFT by LoRA (or QLoRA, DoRA...): the base (quantised as the method says) with the SFT adapter loaded trainable, so
  preference tuning continues the SFT adapter. The reference is the base (the adapter disabled: TRL's path for a
  new adapter). TRL would otherwise keep a frozen copy of the SFT adapter as the reference; we drop it, so that the
  reward the objective raises is the one the evaluation measures, against the base.
- full fine-tuning: the fully fine-tuned model with a new LoRA adapter (the method's r, alpha, dropout; the
  architecture's projections); the reference is the SFT model (the adapter disabled; the base is not in memory).
  The adapter is merged into the weights when saved, so the result is a model folder like the SFT one.

Every later command loads the aligned result the way it loads the SFT one.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PrinterCallback

from .config import Config
from .inference import generate_answers
from .modeling import is_adapter, load_model, load_tuned
from .preferences import (
    PreferenceData,
    conversation,
    pair_logps,
    pairs_of,
    preference_scores,
    prompt_key,
    trl_rows,
)
from .prompting import generation_prompt
from .telemetry import TrainingProgress
from .training import lora_config, use_bf16

LOGGED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")
"""The per-step figures of TRL's log history that go to MLflow."""
MODELS = ("base", "sft", "aligned")
"""The models the align stage scores: the base, the SFT result, the aligned one."""


def policy_model(config: Config) -> tuple[Any, Any]:
    """The model to align and the peft config to wrap it in (None when it already carries the SFT adapter)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    sft = Path(config.paths.adapter)
    method = config.method
    if is_adapter(sft):
        model = load_model(config.paths.base_model, config.model.dtype, method)
        if method.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(model, str(sft), is_trainable=True)
        model.config.use_cache = False
        return model, None
    model = load_model(sft, config.model.dtype)
    model.config.use_cache = False
    return model, lora_config(model, config)


def trainer_for(
    config: Config, model: Any, tokenizer: Any, rows: list[dict[str, Any]], peft_config: Any, output_dir: str
) -> Any:
    """TRL's trainer for `align.objective`, with our schedule, precision and seed."""
    align, train = config.align, config.train
    common = {
        "output_dir": output_dir,
        "per_device_train_batch_size": align.batch_size,
        "num_train_epochs": align.epochs,
        "max_steps": align.max_steps,
        "learning_rate": align.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": train.seed,
        "bf16": use_bf16(train),
        "use_cpu": use_bf16(train) and not _cuda(),
        "dataloader_pin_memory": _cuda(),
        "max_length": align.max_length,
        "beta": align.beta,
        "disable_tqdm": True,
    }
    dataset = Dataset.from_list(rows)
    if align.objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses = {"loss_type": [align.loss_type]}
        if align.sft_weight > 0:  # RPO: the preference loss plus the chosen answers' token loss
            losses = {"loss_type": [align.loss_type, "sft"], "loss_weights": [1.0, align.sft_weight]}
        args = DPOConfig(**common, **losses)
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    elif align.objective == "kto":
        from trl import KTOConfig, KTOTrainer

        desirable = sum(row["label"] for row in rows)
        undesirable = len(rows) - desirable
        # TRL's advice: weight the rarer side so that desirable_weight * n_desirable / (undesirable_weight *
        # n_undesirable) lies in [1, 4/3]
        weights = {"desirable_weight": max(1.0, undesirable / max(desirable, 1))}
        args = KTOConfig(**common, loss_type=align.loss_type, **weights)
        trainer = KTOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common)
        trainer = ORPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    if peft_config is None and "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL then takes the reference with the adapter disabled: the base
    trainer.remove_callback(PrinterCallback)  # raw log dicts; our progress bar (or plain lines) instead
    trainer.add_callback(TrainingProgress(desc=f"align {align.objective}"))
    return trainer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def align_model(
    config: Config, tokenizer: Any, records: list[dict[str, Any]], output_dir: str
) -> tuple[Any, list[dict[str, float]], dict[str, float]]:
    """Train the SFT result on the preference rows; returns the trained model (peft, or merged for full SFT), the
    per-step log and TRL's training summary."""
    model, peft_config = policy_model(config)
    rows = trl_rows(records, config.data, tokenizer, config.align.objective)
    trainer = trainer_for(config, model, tokenizer, rows, peft_config, output_dir)
    result = trainer.train()
    model = trainer.model
    if peft_config is not None:  # full SFT: the new adapter goes into the weights
        model = model.merge_and_unload()
    steps = [
        {"step": entry["step"]} | {k: float(entry[k]) for k in LOGGED if k in entry}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    summary = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return model, steps, summary


def score_models(
    config: Config, data: PreferenceData, tokenizer: Any, models: tuple[str, ...], aligned_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Held-out preference scores of each model (the base's log-likelihoods are the reward's reference) and every
    model's answer to each held-out prompt."""
    pairs = pairs_of(data.test)
    prompts = list({prompt_key(r): r for r in data.test}.values())
    ids = [generation_prompt(conversation(r, "-"), config.data, tokenizer, 0)[1] for r in prompts]
    metrics: dict[str, Any] = {
        "train_rows": len(data.train),
        "heldout_rows": len(data.test),
        "heldout_pairs": len(pairs),
        "heldout_prompts": len(prompts),
        "dropped": data.stats["dropped"],
    }
    answers: dict[str, list[str]] = {}
    reference = None
    for name in models:
        model = _load(config, name, aligned_dir)
        logps = pair_logps(model, tokenizer, pairs, config.data) if pairs else None
        if logps is not None:
            reference = reference or logps  # the base comes first: the reference of every reward
            metrics[name] = preference_scores(logps, reference, config.align.beta)
        answers[name] = generate_answers(model, tokenizer, ids, config.align.max_new_tokens, 8, desc=f"{name} model")
        del model
        gc.collect()
    generations = [
        {
            "source": r["source"],
            "prompt": r["messages"][-1]["content"],
            "chosen": r.get("chosen", r.get("completion") if r.get("label") else None),
            "rejected": r.get("rejected", r.get("completion") if not r.get("label", True) else None),
        }
        | {name: answers[name][i] for name in models}
        for i, r in enumerate(prompts)
    ]
    return metrics, generations


def _load(config: Config, name: str, aligned_dir: Path) -> Any:
    if name == "base":
        model = load_model(config.paths.base_model, config.model.dtype)
        model.eval()
        return model
    return load_tuned(config, Path(config.paths.adapter) if name == "sft" else aligned_dir)[0]
