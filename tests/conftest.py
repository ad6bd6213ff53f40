"""Shared fixtures: a tiny model built offline, and throwaway copies of the project."""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict
from filelock import FileLock

from slmtune.config import DataConfig, SourceConfig, compose_params
from slmtune.data import read_records
from slmtune.prompting import build_example
from tiny_models import build_tiny_tokenizer, save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
PROJECT_FILES = ("conf", "dvc.yaml", "stages", "src", "data/raw", ".dvc/config", ".dvcignore", ".gitignore")
# Fast settings for the tiny model: a few steps, short answers.
STAGES = ["base", "prepare", "augment", "tokenize", "train", "align", "evaluate", "report"]
TINY_OVERRIDES = [
    "method=lora",  # the logic under test is an adapter's (the shipped default, full fine-tuning, has its own tests)
    "train.max_steps=6",
    "train.eval_steps=3",
    "train.batch_size=4",
    "eval.max_new_tokens=8",
    "tracking.log_system_metrics=false",
]


PIPELINE_FIXTURES = {"tiny_project", "tiny_trained", "trained", "tokenized"}
"""Fixtures that run the real pipeline: a test using one is marked `pipeline` (left out by `make test-fast`)."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PIPELINE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.pipeline)


def sample_texts() -> list[str]:
    with open(REPO / "data/raw/company_kb.csv", encoding="utf-8") as handle:
        return [" ".join(row.values()) for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer(sample_texts())


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run sees (the parent of the workers' own temporary folders)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(shared: Path, name: str, build: Callable[[Path], Any]) -> Any:
    """`build(folder)` run once per test run whatever the number of workers, in `shared / name`: the first worker
    to ask builds it under a file lock, the others wait for it and read what it returned (JSON) from there. A
    build that failed is retried by the next worker that asks, from an empty folder. (pytest-xdist's way to run
    a session fixture once.)"""
    folder, done = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        value = build(folder)
        done.write_text(json.dumps(value))
        return value


@pytest.fixture(scope="session")
def tiny_model_dir(shared_tmp) -> Path:
    return Path(built_once(shared_tmp, "tiny-llama", lambda folder: str(save_tiny_llama(folder, sample_texts()))))


def stage_env() -> dict[str, str]:
    """Environment for DVC and the stages: this interpreter's `python` first on PATH, offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("DVC_ROOT", None)
    env.pop("TQDM_DISABLE", None)  # importing slmtune here, without a terminal, set it; a stage decides for itself
    return env


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


SLMTUNE = [sys.executable, "-m", "slmtune.cli"]


class Terminal:
    """`slmtune chat` in a pseudo-terminal: what a user's terminal would show, as it arrives."""

    def __init__(self, project: Path, *args: str, sigint: str = "default"):
        """`sigint`: how the launching shell left SIGINT for the command, default or ignored (nohup)."""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, attached to the terminal
            os.chdir(project)
            signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL)
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

    def answer_pieces(self) -> list[str]:
        """The last answer as it arrived, one entry per read that carried some of it: the text after the last
        'model> ' and before the next 'you> ' (the terminal's echo of the question comes before 'model> ')."""
        starts = [i for i, (_, chunk) in enumerate(self.chunks) if "model> " in chunk]
        if not starts:
            return []
        pieces = [self.chunks[starts[-1]][1].rsplit("model> ", 1)[1]]
        pieces += [chunk for _, chunk in self.chunks[starts[-1] + 1 :]]
        answer = []
        for piece in pieces:
            answer.append(piece.split("you> ", 1)[0])
            if "you> " in piece:
                break
        return [piece for piece in answer if piece.strip()]

    def exit_status(self, timeout: float = 30) -> int:
        """The chat's exit code; it is killed and the test fails when it has not exited within `timeout`
        (reads wait at most 0.1 s, so the deadline fires even when the chat prints nothing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
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
    return make_project(
        tmp_path / "project", [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES]
    )


def kb_rows() -> list[dict[str, str | None]]:
    """The instruction fixture with other column names (question/context/answer), as binary formats store it."""
    with open(FIXTURES / "instruction.csv", encoding="utf-8") as handle:
        return [
            {"question": r["instruction"], "context": r["input"] or None, "answer": r["output"]}
            for r in csv.DictReader(handle)
        ]


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
    builder = Json(
        cache_dir=str(cache_dir),
        data_files=DataFilesDict.from_patterns({"train": [str(source)]}),
        dataset_name=f"{owner}___{name}",
        hash=commit,
    )
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


@dataclass
class Reproduced:
    """A project the real `dvc repro` ran through, twice: what it printed each time."""

    project: Path
    first: str
    second: str
    log: str
    """Everything the first run printed, stdout and stderr: what a DVC log or CI shows."""


@pytest.fixture(scope="session")
def tiny_trained(shared_tmp, tiny_model_dir) -> Reproduced:
    """The default project (company_kb) on the tiny Llama, through every stage by `dvc repro`, then `dvc repro`
    again; shared by the tests that read a trained project (those that change it `copy_project` it first), built
    once for all workers."""

    def build(folder: Path) -> dict[str, str]:
        project = make_project(
            folder / "project", [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES]
        )
        first = run(["dvc", "repro"], project)
        second = run(["dvc", "repro"], project)
        return {
            "project": str(project),
            "first": first.stdout,
            "second": second.stdout,
            "log": first.stdout + first.stderr,
        }

    built = built_once(shared_tmp, "tiny-trained", build)
    return Reproduced(Path(built["project"]), built["first"], built["second"], built["log"])


@pytest.fixture(scope="session")
def trained(shared_tmp, tiny_model_dir) -> Path:
    """A tiny-Llama project on the Dolly preset (which has categories), through every stage once; shared
    by the evaluate, report, chat, generate, merge and export tests (read it, or `copy_project` it), built once
    for all workers."""

    def build(folder: Path) -> str:
        project = make_project(
            folder / "project",
            [
                f"model.source={tiny_model_dir}",
                "model.gguf_file=null",
                *TINY_OVERRIDES,
                "data=dolly",
                "train.max_steps=12",
                "train.learning_rate=2e-3",
            ],
        )
        run(["dvc", "repro"], project)
        return str(project)

    return Path(built_once(shared_tmp, "trained", build))


def _link_weights(source: str, target: str) -> None:
    """Hard-link large files under models/ and the DVC cache (written once, never edited in place: DVC
    replaces outputs whole and keeps its cache read-only); copy everything else (SQLite, dvc.lock, git)."""
    shared = (f"{os.sep}models{os.sep}", f"{os.sep}.dvc{os.sep}cache{os.sep}")
    if os.path.getsize(source) > 1 << 20 and any(part in source for part in shared):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def copy_project(project: Path, tmp_path: Path) -> Path:
    """A private copy of a prepared project (its DVC cache included) for a test that changes it."""
    return shutil.copytree(project, tmp_path / "project", symlinks=True, copy_function=_link_weights)


def assert_trained_through_every_stage(project: Path) -> dict:
    result = run(["dvc", "repro"], project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    assert (project / "models/adapter/adapter_model.safetensors").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["test_examples"] > 0 and metrics["tuned"]["loss"] > 0
    return metrics


def bad_data_project(root: Path, tiny_model_dir: Path, fixture: str, *settings: str) -> Path:
    """A project whose only source is one malformed fixture, copied under data/raw/bad/."""
    project = make_project(root, [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES])
    (project / "data/raw/bad").mkdir()
    shutil.copy(FIXTURES / "bad" / fixture, project / "data/raw/bad" / fixture)
    overrides = [
        "~data.sources.company_kb",
        "~data.sources.reworded",
        f"+data.sources.bad.path=data/raw/bad/{fixture}",
        "data.val_fraction=0",
        *settings,
    ]
    if fixture.endswith(".jsonl") and "conversation" not in fixture:
        overrides += ["+data.sources.bad.columns.instruction=prompt", "+data.sources.bad.columns.output=response"]
    if "conversation" in fixture:
        overrides.append("+data.sources.bad.kind=chat")
    run(
        ["slmtune", "params", *overrides, f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES],
        project,
    )
    return project


def data_report_rows(project: Path) -> dict[str, dict[str, int]]:
    """Rows per split and source."""
    stats = json.loads((project / "reports/data_stats.json").read_text())
    return stats["rows_by_source"]


DATA = DataConfig()


@pytest.fixture(scope="module")
def records():
    return read_records("kb", SourceConfig(path=str(REPO / "data/raw/company_kb.csv")))[0]


def splits_for(records, tokenizer, n_train=16, n_val=4):
    examples = [build_example(r, DATA, tokenizer) for r in records[: n_train + n_val]]

    def to_ds(part):
        return Dataset.from_dict({"input_ids": [e.input_ids for e in part], "labels": [e.labels for e in part]})

    if not n_val:
        return DatasetDict(train=to_ds(examples))
    return DatasetDict(train=to_ds(examples[:n_train]), val=to_ds(examples[n_train:]))


def _module_file(root: Path, module: str) -> Path | None:
    path = root / "src" / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _slmtune_imports(root: Path, file: Path, module: str) -> set[str]:
    """The slmtune modules (and their parent packages) `file` imports, at the top or inside a function."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            candidates = [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            if parts[0] == "slmtune":
                found |= {m for i in range(1, len(parts) + 1) if _module_file(root, m := ".".join(parts[:i]))}
    return found


def imported_code(stage: str, root: Path = REPO) -> list[str]:
    """The code a DVC stage runs: its script and every slmtune module it imports, directly or not (the
    evaluate stage also loads the metric modules from their folder)."""
    script = root / "stages" / f"{stage}.py"
    seen: set[str] = set()
    todo = list(_slmtune_imports(root, script, "__main__"))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _slmtune_imports(root, _module_file(root, module), module)
    files = [f"stages/{stage}.py"] + [_module_file(root, m).relative_to(root).as_posix() for m in seen]
    if "src/slmtune/metrics/__init__.py" in files and stage == "evaluate":
        files[files.index("src/slmtune/metrics/__init__.py")] = "src/slmtune/metrics"
    return sorted(files)
