"""Shared fixtures: a tiny model built offline, and throwaway copies of the project."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmtune.config import compose_params
from tiny_models import build_tiny_tokenizer, save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("conf", "dvc.yaml", "stages", "src", "data/raw", ".dvc/config", ".dvcignore", ".gitignore")
# Fast settings for the tiny model: a few steps, short answers.
TINY_OVERRIDES = [
    "train.max_steps=6",
    "train.eval_steps=3",
    "train.batch_size=4",
    "eval.max_new_tokens=8",
    "tracking.log_system_metrics=false",
]


def sample_texts() -> list[str]:
    with open(REPO / "data/raw/company_kb.csv", encoding="utf-8") as handle:
        return [" ".join(row.values()) for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer(sample_texts())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), sample_texts())


def stage_env() -> dict[str, str]:
    """Environment for DVC and the stages: this interpreter's `python` first on PATH, offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("DVC_ROOT", None)
    return env


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(root: Path, overrides: list[str]) -> Path:
    """A committed git + DVC copy of the project in `root`, with params.yaml composed from `overrides`."""
    for name in PROJECT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    compose_params(root, root / "params.yaml", overrides)
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project copy"], root)
    return root


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir) -> Path:
    """A project copy whose base model is the tiny Llama."""
    return make_project(tmp_path / "project", [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])
