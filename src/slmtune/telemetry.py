"""What a training run reports about itself while it runs: per-step losses (the loss log DVC plots and the
MLflow curves), memory, and the real tokens it was fed."""

from __future__ import annotations

import csv
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import psutil
import torch
from transformers import TrainerCallback

from .progress import bar


class TokenCounter:
    """A collator that also counts the real (non-pad) tokens it hands to the model while `counting` (the Trainer
    collates validation batches with the same collator: the trainer turns counting off for those)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0
        self.counting = True

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        if self.counting:
            self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.collator(features)


class MemoryMonitor:
    """Peak RSS (and CUDA memory) of this process; with `enabled`, also the current figures at named
    moments and every logged step, printed and sent to MLflow (the seed's --monitor_gpu)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.moments: dict[str, float] = {}

    @staticmethod
    def current() -> dict[str, float]:
        figures = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
        if torch.cuda.is_available():
            figures["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        return figures

    @staticmethod
    def peaks() -> dict[str, float]:
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
            mlflow.log_metrics({f"memory/{k}": v for k, v in figures.items()}, step=step)


STEP_METRICS = {
    "loss": "loss/train",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
    "epoch": "train/epoch",
    "eval_loss": "loss/val",
}
"""The Trainer's per-step log keys and their one MLflow name each: the two loss curves under loss/ (MLflow lists
chart sections alphabetically, so they come before the evaluation's one-bar charts), the other training
figures under train/. The rest (eval runtimes, the end-of-training summary) is left out: the train stage logs the
run's own summary once (`train/mean_loss`, `train/runtime_s`, `train/tokens_per_second`)."""


def mlflow_step_metrics(logs: dict[str, float]) -> dict[str, float]:
    """A Trainer log entry under this project's metric names; the end-of-training summary gives nothing."""
    if "train_runtime" in logs:
        return {}
    return {STEP_METRICS[k]: v for k, v in logs.items() if k in STEP_METRICS}


class StepLog(TrainerCallback):
    """Keeps every logged training step and forwards it (and, when monitoring, memory) to the active MLflow run."""

    def __init__(self, monitor: MemoryMonitor | None = None, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows or [])
        self.monitor = monitor

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        named = mlflow_step_metrics(numeric)
        if named:
            mlflow.log_metrics(named, step=state.global_step)
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


class TrainingProgress(TrainerCallback):
    """The training bar (rank 0): step/total, loss, tokens/s and time left in a terminal, plain lines in a log;
    validation losses as lines above it. Replaces the Trainer's printer of raw log dicts. tokens/s: the trained
    tokens over the time spent training, less `paused()` seconds (validation passes, whose tokens the counter
    leaves out), as the run's final `train/tokens_per_second`."""

    def __init__(
        self, tokens: TokenCounter | None = None, desc: str = "train", paused: Callable[[], float] | None = None
    ) -> None:
        self.tokens = tokens
        self.desc = desc
        self.paused = paused
        self.bar: Any = None
        self.loss: float | None = None
        self.start_tokens = 0
        self.start = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = bar(state.max_steps, self.desc, unit="step", initial=state.global_step)
            self.start_tokens = self.tokens.tokens if self.tokens else 0
            self.start = time.monotonic()

    def figures(self) -> str:
        figures = [f"loss {self.loss:.3f}"] if self.loss is not None else []
        elapsed = time.monotonic() - self.start - (self.paused() if self.paused else 0.0)
        if self.tokens is not None and elapsed > 0:
            figures.append(f"{(self.tokens.tokens - self.start_tokens) / elapsed:,.0f} tok/s")
        return ", ".join(figures)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.figures(), refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
            self.bar.set_postfix_str(self.figures())
        if "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}/{state.max_steps}: validation loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
