"""The train stage: fine-tune the base on the tokenized splits and publish the adapter (or, for full
fine-tuning, the whole model) with its provenance, model card and per-step loss log, all logged to the
pipeline's MLflow run. A killed run resumes from its last checkpoint. Under `accelerate launch` every
rank trains; rank 0 alone writes and logs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import torch
from datasets import load_from_disk

from ..config import Config, config_to_dict
from ..hub import check_hub_push, push_to_hub
from ..launch import is_main_process
from ..lineage import (
    PROVENANCE_FILE,
    code_digests,
    git_state,
    input_digests,
    model_card,
    package_versions,
    pipeline_written_files,
)
from ..modeling import load_tokenizer, parameter_counts
from ..outputs import check_free_space, write_json
from ..registry import log_tuned_model, registered_name
from ..resume import logged_steps, mark_resumable, resumable_run, resume_fingerprint
from ..telemetry import MemoryMonitor, StepLog
from ..tracking import (
    BASELINE_TAG,
    DIRTY_FILES_TAG,
    DIRTY_TAG,
    EXP_NAME_TAG,
    REGISTERED_TAG,
    THREADS_TAG,
    check_tracking_store,
    experiment_tags,
    log_data_figures,
    log_datasets,
    log_flat_params,
    log_training_summary,
    pipeline_run,
    run_record,
)
from ..training import fit, prepare_model, save_adapter, training_disk_need


def run_train(config: Config, adapter_dir: Path | None, train_log: Path | None) -> dict[str, Any]:
    """Train; on rank 0 write the adapter folder and the loss log and return the provenance (other ranks:
    nothing written, an empty dict)."""
    check_hub_push(config)
    if is_main_process():
        check_tracking_store(config.tracking)  # a server that is down stops us here, not after training
    monitor = MemoryMonitor(config.train.monitor_memory)
    splits = load_from_disk(config.paths.tokenized).select_columns(["input_ids", "labels"])
    tokenizer = load_tokenizer(config.paths.base_model)
    model = prepare_model(config, tokenizer, monitor, splits)
    counts = parameter_counts(model)
    share = 100 * counts["trainable"] / counts["total"]
    print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || trainable%: {share:.4f}")
    checkpoints = Path(config.paths.checkpoints)
    fix = "free some space, or lower train.save_total_limit"
    check_free_space(checkpoints, training_disk_need(config, counts), "training (checkpoints, adapter)", fix)
    inputs = input_digests(config)
    fingerprint = resume_fingerprint(config, inputs)
    resumed = resumable_run(checkpoints, fingerprint)
    if resumed and is_main_process():
        print(
            f"resuming from the last checkpoint, {resumed['checkpoint']} (MLflow run {resumed['run_id']})", flush=True
        )
    resume_from = resumed["checkpoint"] if resumed else None
    if not is_main_process():
        fit(config, model, tokenizer, splits, StepLog(), str(checkpoints), resume_from)
        return {}
    resume_id = resumed["run_id"] if resumed else None
    with pipeline_run(config.tracking, "train", system_metrics=True, resume_run_id=resume_id, config=config) as run:
        mark_resumable(checkpoints, fingerprint, run.info.run_id)
        provenance = _log_inputs(config, counts, inputs)
        if monitor.moments:
            mlflow.log_metrics(monitor.moments)
        step_log = StepLog(monitor, logged_steps(Path(resume_from)) if resume_from else None)
        metrics, state_dict, validation = fit(config, model, tokenizer, splits, step_log, str(checkpoints), resume_from)
        metrics |= {k: round(v, 1) for k, v in monitor.peaks().items()}
        log_training_summary(metrics)
        save_adapter(model, tokenizer, adapter_dir, state_dict)
        step_log.write_csv(train_log)
        provenance |= {
            "packages": package_versions(),
            "mlflow": run_record(run),
            "parameters": counts,
            "metrics": metrics,
            "validation": validation,
            "resumed": bool(resumed),
        }
        _publish(config, adapter_dir, train_log, provenance, run.info.run_id)
        version = log_tuned_model(config, adapter_dir)
        if version:
            mlflow.set_tag(REGISTERED_TAG, f"{registered_name(config)}/{version}")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return provenance


def _log_inputs(config: Config, counts: dict[str, int], digests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Params, resolved config, git state, parameter counts, dataset digests and data figures of the
    active run; returns the provenance entries they came from (config, git, inputs, code)."""
    resolved = config_to_dict(config)
    git = git_state(written=pipeline_written_files(resolved))  # the pipeline's own outputs do not make a run dirty
    log_flat_params(resolved)
    mlflow.log_dict(resolved, "config/resolved.yaml")
    threads = torch.get_num_threads()  # float reductions, hence the last bits, depend on it
    mlflow.set_tags(
        {
            "mlflow.source.git.commit": git["commit"] or "unknown",
            DIRTY_TAG: str(git["dirty"]),
            DIRTY_FILES_TAG: " ".join(git["dirty_files"])[:5000],
            THREADS_TAG: str(threads),
        }
    )
    mlflow.log_params({"parameters.trainable": counts["trainable"], "parameters.total": counts["total"]})
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


def _publish(config: Config, adapter_dir: Path, train_log: Path, provenance: dict[str, Any], run_id: str) -> None:
    """Provenance and model card beside the adapter; adapter and loss log as MLflow artifacts; the hub push."""
    write_json(adapter_dir / PROVENANCE_FILE, provenance)
    (adapter_dir / "README.md").write_text(model_card(provenance), encoding="utf-8")
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    mlflow.log_artifact(str(train_log), "reports")
    if config.train.push_to_hub:
        mlflow.set_tag("slmtune.hub_repo", push_to_hub(config, adapter_dir, run_id))
