"""Shared fixtures: a tiny model built offline, and throwaway copies of the project."""

from __future__ import annotations

import csv
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmtune.config import compose_params
from tiny_models import build_tiny_tokenizer, save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
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


SLMTUNE = [sys.executable, "-m", "slmtune.cli"]


class Terminal:
    """`slmtune chat` in a pseudo-terminal: what a user's terminal would show, as it arrives."""

    def __init__(self, project: Path, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, attached to the terminal
            os.chdir(project)
            os.execve(sys.executable, [*SLMTUNE, "chat", *args], stage_env())
        self.seen = ""
        self.chunks: list[tuple[float, str]] = []  # (arrival time, text) of every read

    def read_until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while text not in self.seen[start:]:
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s; terminal shows:\n{self.seen}"
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
                self.seen += chunk
                self.chunks.append((time.monotonic(), chunk))
        return self.seen[start:]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError(f"chat did not exit; terminal shows:\n{self.seen}")



def make_project(root: Path, overrides: list[str], frozen_conf: bool = False) -> Path:
    """A committed git + DVC copy of the project in `root`, with params.yaml composed from `overrides`.

    `dvc exp run` recomposes conf/, which knows nothing of `overrides`: with `frozen_conf` the composed
    params.yaml also becomes conf/config.yaml, so that experiments start from the same settings.
    """
    for name in PROJECT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    compose_params(root, root / "params.yaml", overrides)
    if frozen_conf:
        (root / "conf/config.yaml").write_text((root / "params.yaml").read_text())
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project copy"], root)
    return root


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir) -> Path:
    """A project copy whose base model is the tiny Llama."""
    return make_project(tmp_path / "project", [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])


def kb_rows() -> list[dict[str, str | None]]:
    """The instruction fixture with other column names (question/context/answer), as binary formats store it."""
    with open(FIXTURES / "instruction.csv", encoding="utf-8") as handle:
        return [{"question": r["instruction"], "context": r["input"] or None, "answer": r["output"]} for r in csv.DictReader(handle)]


def write_kb_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(kb_rows()), path)
    return path


def write_kb_disk(path: Path) -> Path:
    """A `save_to_disk` DatasetDict with its own train (8 rows) and test (4 rows) splits."""
    from datasets import Dataset, DatasetDict

    rows = kb_rows()
    DatasetDict(train=Dataset.from_list(rows[:8]), test=Dataset.from_list(rows[8:])).save_to_disk(str(path))
    return path


@pytest.fixture
def kb_parquet(tmp_path) -> Path:
    return write_kb_parquet(tmp_path / "kb.parquet")


@pytest.fixture
def kb_disk(tmp_path) -> Path:
    return write_kb_disk(tmp_path / "kb_disk")


HUB_ROWS = [{"content": f"Tiny document number {i} of the cached hub corpus, about leave day {i}."} for i in range(12)]


def cache_hub_dataset(cache_dir: Path, repo_id: str, rows: list[dict]) -> None:
    """Lay out `repo_id` in a `datasets` cache the way an earlier online `load_dataset(repo_id)` leaves it."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    source = cache_dir / f"{name}.jsonl"
    cache_dir.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    commit = "0" * 40
    builder = Json(cache_dir=str(cache_dir), data_files=DataFilesDict.from_patterns({"train": [str(source)]}),
                   dataset_name=f"{owner}___{name}", hash=commit)  # fmt: skip
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    target = cache_dir / f"{owner}___{name}" / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True)
    built.rename(target)
    shutil.rmtree(built.parent.parent)
    (target / f"{owner}___{name}-train.arrow").rename(target / f"{name}-train.arrow")
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    info["splits"]["train"]["dataset_name"] = name
    (target / "dataset_info.json").write_text(json.dumps(info))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A datasets cache holding `slmtune-test/tiny_corpus` (12 rows, text column `content`), used offline."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    cache_hub_dataset(cache, "slmtune-test/tiny_corpus", HUB_ROWS)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache
