"""LoRA fine-tuning with peft and the transformers Trainer."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import Config, config_to_dict
from .lineage import PROVENANCE_FILE, code_digests, dvc_md5, git_state, model_card, package_versions
from .modeling import default_target_modules, load_model, load_tokenizer, parameter_counts
from .outputs import write_json
from .prompting import padding_collator
from .tracking import BASELINE_TAG, DIRTY_FILES_TAG, EXP_NAME_TAG, THREADS_TAG, experiment_tags, log_datasets, log_flat_params, pipeline_run

def lora_model(model: Any, config: Config) -> Any:
    """Wrap `model` with trainable LoRA adapters as configured; their initialisation is seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    method = config.method
    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=list(method.target_modules) if method.target_modules else default_target_modules(model),
        bias=method.bias,
        task_type="CAUSAL_LM",
    )
    set_seed(config.train.seed)
    return get_peft_model(model, lora)


def training_arguments(config: Config, output_dir: str, has_val: bool = True) -> Any:
    """Trainer arguments from the config: dynamic padding via length-grouped batches, no checkpoints."""
    from transformers import TrainingArguments

    train = config.train
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
        train_sampling_strategy="group_by_length",
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.eval_steps,
        save_strategy="no",
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class StepLog(TrainerCallback):
    """Keeps every logged training step and forwards it to the active MLflow run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numeric:
            mlflow.log_metrics({f"train/{k}" if k == "loss" else k: v for k, v in numeric.items()}, step=state.global_step)
        if "loss" in numeric:
            self.rows.append(
                {"step": state.global_step, "loss": numeric["loss"], "learning_rate": numeric.get("learning_rate", 0.0)}
            )

    def write_csv(self, path: str | Path) -> None:
        """Per-step loss and learning rate, the file DVC plots."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "learning_rate"])
            writer.writeheader()
            writer.writerows(self.rows)


def build_trainer(config: Config, model: Any, tokenizer: Any, splits: Any, output_dir: str, callbacks: list) -> Any:
    """A Trainer whose batches are padded to their longest example only (never to max_length)."""
    from transformers import Trainer

    has_val = "val" in splits
    return Trainer(
        model=model,
        args=training_arguments(config, output_dir, has_val),
        train_dataset=splits["train"],
        eval_dataset=splits["val"] if has_val else None,
        data_collator=padding_collator(tokenizer),
        callbacks=callbacks,
    )


def fit(config: Config, model: Any, tokenizer: Any, splits: Any, step_log: StepLog) -> dict[str, float]:
    """Train `model` in place on the tokenized splits; return the final train and validation losses."""
    from transformers import set_seed

    set_seed(config.train.seed)
    with tempfile.TemporaryDirectory(prefix="slmtune-trainer-") as scratch:
        trainer = build_trainer(config, model, tokenizer, splits, scratch, [step_log])
        result = trainer.train()
        metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step)}
        if trainer.eval_dataset is not None:
            metrics["val_loss"] = float(trainer.evaluate()["eval_loss"])
    return metrics


def input_digests(config: Config) -> dict[str, dict[str, Any]]:
    """DVC md5 of every data and model input of the adapter: each data source, the prepared and
    tokenized data and the base model. Hub datasets cannot be hashed: their pinned revision stands in."""
    digests: dict[str, dict[str, Any]] = {}
    for name, source in config.data.sources.items():
        if source.format == "hub":
            digests[f"source/{name}"] = {"path": source.path, "md5": None, "revision": source.revision}
        else:
            digests[f"source/{name}"] = {"path": source.path, "md5": dvc_md5(source.path)}
    for name in ("prepared", "tokenized", "base_model"):
        path = getattr(config.paths, name)
        digests[name] = {"path": path, "md5": dvc_md5(path)}
    return digests


def save_adapter(model: Any, adapter_dir: Path) -> None:
    """peft's adapter files, with `target_modules` in a fixed order (peft keeps a set, whose order
    follows the hash seed) so that the same training gives the same bytes."""
    import json

    model.save_pretrained(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    write_json(config_path, adapter_config)


def log_data_figures(config: Config) -> None:
    """The data report's figures as MLflow metrics, with the report and its histogram as artifacts."""
    import json

    import mlflow

    data_stats = json.loads(Path(config.paths.data_stats).read_text(encoding="utf-8"))
    token_stats = json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))
    figures = {f"data/rows/{split}": n for split, n in data_stats["rows"].items()}
    for split, stats in token_stats["splits"].items():
        figures.update({f"data/examples/{split}": stats["examples"], f"data/tokens/{split}": stats["tokens"],
                        f"data/trained_share/{split}": stats["trained_share"], f"data/length_p95/{split}": stats["length"]["p95"],
                        f"data/truncated/{split}": stats["truncated"]})  # fmt: skip
    for reason, count in (data_stats["dropped"] | token_stats["dropped"]).items():
        figures[f"data/dropped/{reason.replace(' ', '_')}"] = count
    mlflow.log_metrics(figures)
    for path in (config.paths.data_report, config.paths.length_plot, config.paths.data_stats, config.paths.token_stats):
        mlflow.log_artifact(path, "data")


def log_run_inputs(config: Config, counts: dict[str, int]) -> dict[str, Any]:
    """Params, resolved config, git state, parameter counts, dataset digests and data figures of the
    active run; returns the provenance entries they came from (config, git, inputs, code)."""
    import mlflow

    resolved = config_to_dict(config)
    git = git_state()
    digests = input_digests(config)
    log_flat_params(resolved)
    mlflow.log_dict(resolved, "config/resolved.yaml")
    threads = torch.get_num_threads()  # float reductions, hence the last bits, depend on it
    mlflow.set_tags({"mlflow.source.git.commit": git["commit"] or "unknown", "git_dirty": str(git["dirty"]),
                     DIRTY_FILES_TAG: " ".join(git["dirty_files"])[:5000], THREADS_TAG: str(threads)})  # fmt: skip
    mlflow.log_metrics({"params/trainable": counts["trainable"], "params/total": counts["total"]})
    log_datasets(config.tracking, digests)
    log_data_figures(config)
    tags = experiment_tags()
    return {
        "git": git,
        "dvc": {"exp_name": tags[EXP_NAME_TAG], "baseline_rev": tags[BASELINE_TAG]},
        "inputs": digests,
        "code": code_digests("train"),
        "config": resolved,
        "runtime": {"torch_threads": threads},
    }


def run_training(config: Config, adapter_dir: Path, train_log: Path) -> dict[str, Any]:
    """The train stage: open the MLflow run, fine-tune, write adapter + provenance + model card + loss log."""
    import mlflow
    from datasets import load_from_disk

    splits = load_from_disk(config.paths.tokenized).select_columns(["input_ids", "labels"])
    tokenizer = load_tokenizer(config.paths.base_model)
    model = lora_model(load_model(config.paths.base_model, config.model.dtype), config)
    counts = parameter_counts(model)
    print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
          f"|| trainable%: {100 * counts['trainable'] / counts['total']:.4f}")  # fmt: skip
    with pipeline_run(config.tracking, "train", system_metrics=True) as run:
        provenance = log_run_inputs(config, counts)
        step_log = StepLog()
        metrics = fit(config, model, tokenizer, splits, step_log)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
        save_adapter(model, adapter_dir)
        step_log.write_csv(train_log)
        provenance |= {
            "packages": package_versions(),
            "mlflow": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                       "tracking_uri": mlflow.get_tracking_uri()},
            "parameters": counts,
            "metrics": metrics,
        }  # fmt: skip
        write_json(adapter_dir / PROVENANCE_FILE, provenance)
        (adapter_dir / "README.md").write_text(model_card(provenance), encoding="utf-8")
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        mlflow.log_artifact(str(train_log), "reports")
    return provenance
