"""Resuming a killed train stage: its checkpoints are reused only when they were trained with exactly
the settings and inputs about to be trained; anything else in the checkpoint folder is stale."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .config import Config, config_to_dict
from .launch import is_main_process
from .outputs import write_json

RESUME_FILE = "slmtune-resume.json"
"""Written beside the checkpoints: the fingerprint of what they train and the MLflow run to resume."""


def resume_fingerprint(config: Config, inputs: dict[str, dict[str, Any]]) -> str:
    """What a checkpoint must have been trained with to be resumed: the training settings and inputs."""
    resolved = config_to_dict(config)
    keys = {
        "model": [config.model.dtype, config.model.task],
        "method": resolved["method"],
        "train": {k: v for k, v in resolved["train"].items() if k not in ("monitor_memory", "logging_steps")},
        "inputs": {name: entry["md5"] for name, entry in inputs.items()},
    }
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


def mark_resumable(checkpoints: Path, fingerprint: str, run_id: str) -> None:
    """Record what the checkpoints about to be written train, and the MLflow run they belong to."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / RESUME_FILE, {"fingerprint": fingerprint, "run_id": run_id})


def logged_steps(checkpoints: Path) -> list[dict[str, float]]:
    """The loss log of the interrupted run, from its last checkpoint's trainer state."""
    last = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    history = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return [
        {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate", 0.0)}
        for h in history
        if "loss" in h
    ]
