"""What an adapter came from: code (git), data and models (DVC md5s), packages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

PROVENANCE_FILE = "provenance.json"
EXPS_TEMP_MARKER = os.path.join(".dvc", "tmp", "exps")
TRACKED_PACKAGES = (
    "slmtune", "torch", "transformers", "peft", "trl", "datasets", "accelerate",
    "bitsandbytes", "evaluate", "mlflow", "dvc", "hydra-core", "omegaconf",
)  # fmt: skip


def project_root(start: str | Path | None = None) -> Path:
    """The real project root, also from inside a `dvc exp` temporary workspace.

    DVC sets DVC_ROOT to the workspace it runs a stage in; queued and `--temp` experiments run in
    `<root>/.dvc/tmp/exps/...`, so anything that must outlive them (the MLflow store) is anchored
    above that folder.
    """
    root = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    text = str(root)
    marker = os.sep + EXPS_TEMP_MARKER + os.sep
    if marker in text + os.sep:
        return Path((text + os.sep).split(marker)[0])
    return root


def _git(args: list[str], cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def git_state(cwd: str | Path = ".") -> dict[str, Any]:
    """HEAD commit and whether tracked files differ from it (None outside a git repository)."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes, as DVC 3 records it."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for a file or directory (directories: md5 of the sorted listing + '.dir')."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory to hash")
    entries = sorted(
        (
            {"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()}
            for f in path.rglob("*")
            if f.is_file()
        ),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dvc_lock_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """Path -> md5 of every dependency and output recorded in `dvc.lock` (empty when there is none yet)."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            if "md5" in entry:
                hashes[entry["path"]] = entry["md5"]
    return hashes


def read_provenance(adapter_dir: str | Path) -> dict[str, Any]:
    """The provenance JSON the train stage wrote beside an adapter."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no provenance; was this adapter made by the train stage?")
    return json.loads(path.read_text(encoding="utf-8"))
