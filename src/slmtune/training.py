"""LoRA fine-tuning with peft and the transformers Trainer."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import Config, ConfigError, config_to_dict
from .lineage import PROVENANCE_FILE, code_digests, dvc_md5, git_state, model_card, package_versions
from .modeling import default_target_modules, load_model, load_tokenizer, parameter_counts
from .outputs import write_json
from .prompting import IGNORE_INDEX, padding_collator
from .tracking import BASELINE_TAG, DIRTY_FILES_TAG, EXP_NAME_TAG, THREADS_TAG, experiment_tags, log_datasets, log_flat_params, pipeline_run

def is_main_process() -> bool:
    """False in the non-zero ranks of an `accelerate launch`; those train but write and log nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def class_labels(config: Config) -> list[str] | None:
    """The classes `tokenize` found (classification), else None."""
    if config.model.task != "classification":
        return None
    return json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))["labels"]


def lora_model(model: Any, config: Config) -> Any:
    """Wrap `model` with trainable LoRA (or DoRA / rsLoRA) adapters as configured; their init is seeded.
    A classifier's new head trains in full and is saved with the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .modeling import head_modules

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


def prepare_model(config: Config, tokenizer: Any, monitor: "MemoryMonitor") -> Any:
    """The model as it trains: loaded (quantised for QLoRA / 8-bit), prepared for k-bit training, wrapped
    in adapters unless the method is full fine-tuning."""
    from peft import prepare_model_for_kbit_training

    method = config.method
    model = load_model(config.paths.base_model, config.model.dtype, method, class_labels(config), tokenizer.pad_token_id)
    monitor.record("load")
    model.config.use_cache = False  # no KV cache in training (a cache also hides packed-sequence boundaries)
    if method.quantization != "none":
        # casts norms and the head to fp32 and lets gradients reach the adapters through frozen quantised layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    if method.adapter == "lora":
        model = lora_model(model, config)
    monitor.record("prepared")
    return model


def use_bf16(train: Any) -> bool:
    import torch

    if train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return train.precision == "bf16"


def training_arguments(config: Config, output_dir: str, has_val: bool = True) -> Any:
    """Trainer arguments from the config: length-grouped (or packed) batches, checkpoints in `output_dir`."""
    from transformers import TrainingArguments

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


class TokenCounter:
    """A collator that also counts the real (non-pad) tokens it hands to the model."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.collator(features)


def make_collator(config: Config, tokenizer: Any) -> TokenCounter:
    """Padding-free (packed) batches, padding to the batch's longest example, or (classification) class ids."""
    from transformers import DataCollatorWithFlattening, DataCollatorWithPadding

    if config.model.task == "classification":
        return TokenCounter(DataCollatorWithPadding(tokenizer, padding="longest"))
    if config.train.packing:
        return TokenCounter(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX))
    return TokenCounter(padding_collator(tokenizer))


class MemoryMonitor:
    """Peak RSS (and CUDA memory) of this process; with `enabled`, also the current figures at named
    moments and every logged step, printed and sent to MLflow (the seed's --monitor_gpu)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.moments: dict[str, float] = {}

    @staticmethod
    def current() -> dict[str, float]:
        import psutil
        import torch

        figures = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
        if torch.cuda.is_available():
            figures["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        return figures

    @staticmethod
    def peaks() -> dict[str, float]:
        import resource

        import torch

        figures = {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            figures["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return figures

    def record(self, moment: str, step: int | None = None) -> None:
        if not self.enabled:
            return
        figures = self.current()
        if step is None:
            self.moments.update({f"memory/{moment}/{k}": v for k, v in figures.items()})
            print(f"memory at {moment}: " + ", ".join(f"{k} {v:,.0f}" for k, v in figures.items()), flush=True)
        else:  # called by StepLog on rank 0 only
            import mlflow

            mlflow.log_metrics({f"memory/{k}": v for k, v in figures.items()}, step=step)


class StepLog(TrainerCallback):
    """Keeps every logged training step and forwards it (and, when monitoring, memory) to the active MLflow run."""

    def __init__(self, monitor: MemoryMonitor | None = None, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows or [])
        self.monitor = monitor

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        import mlflow

        if not state.is_world_process_zero:
            return
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numeric:
            mlflow.log_metrics({f"train/{k}" if k == "loss" else k: v for k, v in numeric.items()}, step=state.global_step)
        if "loss" in numeric:
            self.rows.append(
                {"step": state.global_step, "loss": numeric["loss"], "learning_rate": numeric.get("learning_rate", 0.0)}
            )
        if self.monitor is not None:
            self.monitor.record("train", step=state.global_step)

    def write_csv(self, path: str | Path) -> None:
        """Per-step loss and learning rate, the file DVC plots."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "learning_rate"])
            writer.writeheader()
            writer.writerows(self.rows)


def build_trainer(config: Config, model: Any, tokenizer: Any, splits: Any, output_dir: str, callbacks: list,
                  collator: Any = None) -> Any:  # fmt: skip
    """A Trainer whose batches carry no padding beyond the batch's longest example (or none, packed)."""
    from transformers import EarlyStoppingCallback, Trainer

    has_val = "val" in splits
    train = config.train
    if train.early_stopping_patience > 0:
        if not has_val:
            raise ConfigError("train.early_stopping_patience needs a validation split; raise data.val_fraction or set it to 0.")
        callbacks = [*callbacks, EarlyStoppingCallback(train.early_stopping_patience, train.early_stopping_threshold)]
    return Trainer(
        model=model,
        args=training_arguments(config, output_dir, has_val),
        train_dataset=splits["train"],
        eval_dataset=splits["val"] if has_val else None,
        data_collator=collator or make_collator(config, tokenizer),
        callbacks=callbacks,
    )


def fit(config: Config, model: Any, tokenizer: Any, splits: Any, step_log: StepLog, output_dir: str | None = None,
        resume: bool = False) -> tuple[dict[str, float], dict | None]:  # fmt: skip
    """Train `model` in place on the tokenized splits, checkpointing into `output_dir` (a scratch folder
    when None) and resuming from its last checkpoint with `resume`; return losses and throughput, and after
    FSDP training the full state dict gathered from the shards (else None)."""
    from transformers import set_seed

    set_seed(config.train.seed)
    with tempfile.TemporaryDirectory(prefix="slmtune-trainer-") as scratch:
        collator = make_collator(config, tokenizer)
        trainer = build_trainer(config, model, tokenizer, splits, output_dir or scratch, [step_log], collator)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if trainer.args.world_size != launched:
            raise RuntimeError(f"{launched} processes were launched but the Trainer sees a world of "
                               f"{trainer.args.world_size}: each would train alone on all the data. Launch through "
                               "the train stage (train.num_processes) or set ACCELERATE_USE_CPU=true without a GPU.")  # fmt: skip
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        runtime = float(result.metrics["train_runtime"])
        metrics = {"train_loss": float(result.training_loss), "steps": float(result.global_step),
                   "train_runtime_s": runtime, "tokens_per_second": collator.tokens / runtime if runtime else 0.0}  # fmt: skip
        if trainer.eval_dataset is not None:
            metrics["val_loss"] = float(trainer.evaluate()["eval_loss"])
        # Sharded (FSDP) weights: every rank joins in gathering the full state dict that rank 0 saves.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    return metrics, state_dict


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


def log_run_inputs(config: Config, counts: dict[str, int], digests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Params, resolved config, git state, parameter counts, dataset digests and data figures of the
    active run; returns the provenance entries they came from (config, git, inputs, code)."""
    import mlflow

    resolved = config_to_dict(config)
    git = git_state()
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


RESUME_FILE = "slmtune-resume.json"


def check_hub_push(config: Config) -> None:
    """With `train.push_to_hub`, fail before any training when the upload could not happen: the hub is
    offline or there is no token."""
    if not config.train.push_to_hub:
        return
    from huggingface_hub import constants, get_token

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise ConfigError("params.yaml: train.push_to_hub=true but the Hugging Face Hub is offline (HF_HUB_OFFLINE=1), "
                          "so nothing was trained. Go online (HF_HUB_OFFLINE=0) and log in (`hf auth login`), or set "
                          "train.push_to_hub=false.")  # fmt: skip
    if not get_token():
        raise ConfigError("params.yaml: train.push_to_hub=true but no Hugging Face token is set, so nothing was trained. "
                          "Log in with `hf auth login` (or set HF_TOKEN), or set train.push_to_hub=false.")  # fmt: skip


def push_to_hub(config: Config, folder: Path, run_id: str) -> str:
    """Upload the adapter folder to `train.hub_model_id` (a private repository when it is created); return its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(config.train.hub_model_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo.repo_id, commit_message=f"slmtune: MLflow run {run_id}")
    print(f"pushed {folder} to {repo}", flush=True)
    return str(repo)


def needs_launch(config: Config) -> bool:
    """Whether this is the stage's own process and training wants several (`accelerate launch` sets RANK)."""
    return config.train.num_processes > 1 and "RANK" not in os.environ


def launch_command(config: Config, script: str) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of the train stage on `train.num_processes` processes, and its environment: DDP
    over the GPUs or, without one, CPU processes over gloo (torchrun alone would leave each CPU process
    training on its own: accelerate needs ACCELERATE_USE_CPU to see them as one job); a given
    `train.accelerate_config` (multi-node, FSDP) decides the rest. `python -P` is kept (PYTHONSAFEPATH) so
    that stages/ does not shadow modules."""
    import sys

    import torch

    env = dict(os.environ, PYTHONSAFEPATH="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.train.num_processes)]
    if config.train.accelerate_config:
        command += ["--config_file", config.train.accelerate_config]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not torch.cuda.is_available():
            threads = max(1, (os.cpu_count() or 1) // config.train.num_processes)
            command += ["--num_cpu_threads_per_process", str(threads)]
            env["ACCELERATE_USE_CPU"] = "true"
    return command + [script], env


def launch_distributed(config: Config, script: str) -> None:
    """Run the train stage under `accelerate launch`. Raises if any rank fails."""
    import subprocess

    check_hub_push(config)

    command, env = launch_command(config, script)
    print("launching: " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {result.returncode}")


def resume_fingerprint(config: Config, inputs: dict[str, dict[str, Any]]) -> str:
    """What a checkpoint must have been trained with to be resumed: the training settings and inputs."""
    resolved = config_to_dict(config)
    keys = {"model": [config.model.dtype, config.model.task], "method": resolved["method"],
            "train": {k: v for k, v in resolved["train"].items() if k not in ("monitor_memory", "logging_steps")},
            "inputs": {name: entry["md5"] for name, entry in inputs.items()}}  # fmt: skip
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def resumable_run(checkpoints: Path, fingerprint: str) -> dict[str, Any] | None:
    """The interrupted run whose checkpoints are in `checkpoints` if it trained what we are about to train;
    anything else there (another config, other data, no checkpoint yet) is stale and removed."""
    state_file = checkpoints / RESUME_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("fingerprint") == fingerprint and any(checkpoints.glob("checkpoint-*")):
            return state
    if checkpoints.exists() and is_main_process():
        shutil.rmtree(checkpoints)
    return None


def logged_steps(checkpoints: Path) -> list[dict[str, float]]:
    """The loss log of the interrupted run, from its last checkpoint's trainer state."""
    last = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    history = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate", 0.0)} for h in history if "loss" in h]


def run_training(config: Config, adapter_dir: Path, train_log: Path) -> dict[str, Any]:
    """The train stage: open the MLflow run, fine-tune (resuming an interrupted run from its last checkpoint),
    write adapter (or full model) + provenance + model card + loss log. In an `accelerate launch`, only rank 0
    logs and writes; every rank trains."""
    import mlflow
    from datasets import load_from_disk

    check_hub_push(config)
    monitor = MemoryMonitor(config.train.monitor_memory)
    splits = load_from_disk(config.paths.tokenized).select_columns(["input_ids", "labels"])
    tokenizer = load_tokenizer(config.paths.base_model)
    model = prepare_model(config, tokenizer, monitor)
    counts = parameter_counts(model)
    print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
          f"|| trainable%: {100 * counts['trainable'] / counts['total']:.4f}")  # fmt: skip
    checkpoints = Path(config.paths.checkpoints)
    inputs = input_digests(config)
    fingerprint = resume_fingerprint(config, inputs)
    resumed = resumable_run(checkpoints, fingerprint)
    main = is_main_process()
    if resumed:
        print(f"resuming from the last checkpoint in {checkpoints} (MLflow run {resumed['run_id']})", flush=True)
    if not main:
        fit(config, model, tokenizer, splits, StepLog(), str(checkpoints), bool(resumed))
        return {}
    run_context = pipeline_run(config.tracking, "train", system_metrics=True, resume_run_id=resumed["run_id"] if resumed else None)
    with run_context as run:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(checkpoints / RESUME_FILE, {"fingerprint": fingerprint, "run_id": run.info.run_id})
        provenance = log_run_inputs(config, counts, inputs)
        if monitor.moments:
            mlflow.log_metrics(monitor.moments)
        step_log = StepLog(monitor, logged_steps(checkpoints) if resumed else None)
        metrics, state_dict = fit(config, model, tokenizer, splits, step_log, str(checkpoints), bool(resumed))
        metrics |= {k: round(v, 1) for k, v in monitor.peaks().items()}
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
        save_adapter(model, tokenizer, adapter_dir, state_dict)
        step_log.write_csv(train_log)
        provenance |= {
            "packages": package_versions(),
            "mlflow": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                       "tracking_uri": mlflow.get_tracking_uri()},
            "parameters": counts,
            "metrics": metrics,
            "resumed": bool(resumed),
        }  # fmt: skip
        write_json(adapter_dir / PROVENANCE_FILE, provenance)
        (adapter_dir / "README.md").write_text(model_card(provenance), encoding="utf-8")
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        mlflow.log_artifact(str(train_log), "reports")
        if config.train.push_to_hub:
            mlflow.set_tag("slmtune.hub_repo", push_to_hub(config, adapter_dir, run.info.run_id))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return provenance
