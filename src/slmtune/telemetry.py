"""What a training run reports about itself while it runs: per-step losses (the loss log DVC plots and the
MLflow curves), memory, and the real tokens it was fed."""

from __future__ import annotations

import csv
import resource
from pathlib import Path
from typing import Any

import mlflow
import psutil
import torch
from transformers import TrainerCallback


class TokenCounter:
    """A collator that also counts the real (non-pad) tokens it hands to the model."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
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


class StepLog(TrainerCallback):
    """Keeps every logged training step and forwards it (and, when monitoring, memory) to the active MLflow run."""

    def __init__(self, monitor: MemoryMonitor | None = None, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows or [])
        self.monitor = monitor

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numeric:
            named = {f"train/{k}" if k == "loss" else k: v for k, v in numeric.items()}
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
