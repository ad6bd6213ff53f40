"""Resuming a killed train stage: its checkpoints are reused only when they were trained with exactly
the settings and inputs about to be trained; anything else in the checkpoint folder is stale. Each
checkpoint is sealed once complete (the size and sha256 of its files, written last), so a half-written or
corrupt one is detected and the previous one resumed instead."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import Config, config_to_dict
from .launch import is_main_process
from .outputs import write_json

RESUME_FILE = "slmtune-resume.json"
"""Written beside the checkpoints: the fingerprint of what they train and the MLflow run to resume."""
SEAL_FILE = "slmtune-checkpoint.json"
"""Written into a checkpoint folder once every file of it is on disk: each file's size and sha256."""


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


def _file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL_FILE)


def seal_checkpoint(folder: Path) -> None:
    """Record every file of the complete checkpoint `folder` (size and sha256), in a file written last."""
    write_json(
        folder / SEAL_FILE, {"files": {p.relative_to(folder).as_posix(): _file_digest(p) for p in _files(folder)}}
    )


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed (not sealed: the run died while writing it; a file
    missing, truncated or changed since), or None when it is intact."""
    try:
        recorded = json.loads((folder / SEAL_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return "incomplete (never sealed: the run stopped while writing it)"
    for name, entry in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} is truncated ({path.stat().st_size} of {entry['size']} bytes)"
        if _file_digest(path)["sha256"] != entry["sha256"]:
            return f"{name} is corrupt (its sha256 changed)"
    return None


def last_intact_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint in `checkpoints` that is intact; newer broken ones are reported and removed."""
    folders = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"skipping checkpoint {folder}: {problem}", flush=True)
        if is_main_process():
            shutil.rmtree(folder)
    return None


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once the Trainer has written all of it (every rank's files: ranks meet first)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def resumable_run(checkpoints: Path, fingerprint: str) -> dict[str, Any] | None:
    """The interrupted run whose checkpoints are in `checkpoints` if it trained what we are about to train,
    with `checkpoint`: its newest intact checkpoint; anything else there (another config, other data, no
    intact checkpoint) is stale and removed."""
    state_file = checkpoints / RESUME_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("fingerprint") == fingerprint and (last := last_intact_checkpoint(checkpoints)):
            return {**state, "checkpoint": str(last)}
    if checkpoints.exists() and is_main_process():
        shutil.rmtree(checkpoints)
    return None


def mark_resumable(checkpoints: Path, fingerprint: str, run_id: str) -> None:
    """Record what the checkpoints about to be written train, and the MLflow run they belong to."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / RESUME_FILE, {"fingerprint": fingerprint, "run_id": run_id})


def logged_steps(checkpoint: Path) -> list[dict[str, float]]:
    """The loss log of the interrupted run up to `checkpoint`, from its trainer state."""
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return [
        {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate", 0.0)}
        for h in history
        if "loss" in h
    ]
