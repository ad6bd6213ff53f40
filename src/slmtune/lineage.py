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

from .config import flatten
from .errors import MissingFileError

PROVENANCE_FILE = "provenance.json"
EXPS_TEMP_MARKER = os.path.join(".dvc", "tmp", "exps")
TRACKED_PACKAGES = (
    *("slmtune", "torch", "transformers", "peft", "trl", "datasets", "accelerate"),
    *("bitsandbytes", "evaluate", "mlflow", "dvc", "hydra-core", "omegaconf"),
)


ALIGNMENT_FILE = "alignment.json"
"""The align stage's marker in `paths.aligned` when no preference objective ran: the SFT adapter is final."""


def final_adapter(paths: Any) -> Path:
    """The adapter every command after training uses: the aligned one when the align stage trained one (its folder
    holds an adapter or a model), else the SFT adapter `train` wrote."""
    aligned = Path(paths.aligned)
    if (aligned / "adapter_config.json").is_file() or (aligned / "config.json").is_file():
        return aligned
    return Path(paths.adapter)


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
    return out.stdout.rstrip()  # keep leading spaces: `git status --porcelain` columns start with one


def git_state(cwd: str | Path = ".", written: tuple[str, ...] = ()) -> dict[str, Any]:
    """HEAD commit, whether tracked files differ from it and which (None outside a git repository), leaving
    out `written`: files (or folders) the pipeline itself writes, which differ from the commit mid-run.

    In a DVC experiment the tree is dirty by design: `params.yaml` (and `dvc.lock`) carry its changes.
    """
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    prefixes = tuple(w.rstrip("/") + "/" for w in written)
    files = sorted(
        name
        for name in (line[3:].split(" -> ")[-1] for line in (status.splitlines() if status else []))
        if name not in written and not name.startswith(prefixes)
    )
    return {"commit": commit, "dirty": bool(files) if status is not None else None, "dirty_files": files}


def pipeline_written_files(params: dict[str, Any], dvc_yaml: str | Path = "dvc.yaml") -> tuple[str, ...]:
    """Every file or folder the pipeline writes: each stage's outs, metrics and plots in `dvc.yaml` (their
    `${...}` resolved from `params`), and `dvc.lock`."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))
    flat = flatten(params)
    written = ["dvc.lock"]
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                for key, value in flat.items():
                    path = path.replace("${" + key + "}", str(value))
                written.append(Path(path).as_posix())
    return tuple(written)


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
        raise MissingFileError(f"{path}: no such file or directory to hash")
    entries = sorted(
        ({"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*") if f.is_file()),
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
        raise MissingFileError(f"{path}: no provenance; was this adapter made by the train stage?")
    return json.loads(path.read_text(encoding="utf-8"))


def stage_code_deps(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The code files and folders a stage depends on, as `dvc.yaml` lists them (data paths are `${...}`)."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))
    deps = spec["stages"][stage].get("deps") or []
    return [dep for dep in deps if "${" not in dep]


def code_digests(stage: str = "train", dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """md5 of each code dependency of `stage`: what DVC compares to decide whether it reruns."""
    return {path: dvc_md5(path) for path in stage_code_deps(stage, dvc_yaml)}


ADAPTER_CONFIG_SECTIONS = ("model", "data", "method", "train")
"""The parts of the configuration that shape an adapter (paths, evaluation and tracking do not); an aligned adapter
(its provenance names the SFT adapter) is also shaped by `align`."""


def check_lineage(provenance: dict[str, Any], current_config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Re-hash the adapter's recorded inputs and code, compare its config with the current one.

    Returns one row per check: kind (input, code, param), name, recorded and current value, and a
    status: MATCH, MISMATCH, MISSING (the input is gone) or UNHASHED (a hub dataset: pinned revision only).
    """
    rows = []
    for name, entry in provenance["inputs"].items():
        if entry.get("md5") is None:
            rows.append(
                {
                    "kind": "input",
                    "name": name,
                    "recorded": entry.get("revision"),
                    "current": None,
                    "status": "UNHASHED",
                }
            )
            continue
        current = dvc_md5(entry["path"]) if Path(entry["path"]).exists() else None
        rows.append(_compared("input", name, entry["md5"], current))
    for path, recorded in provenance.get("code", {}).items():
        rows.append(_compared("code", path, recorded, dvc_md5(path) if Path(path).exists() else None))
    if current_config is not None:
        sections = ADAPTER_CONFIG_SECTIONS + (("align",) if "sft" in provenance else ())
        recorded_flat = flatten_sections(provenance["config"], sections)
        current_flat = flatten_sections(current_config, sections)
        for key in sorted(set(recorded_flat) | set(current_flat)):
            rows.append(
                _compared("param", key, recorded_flat.get(key), current_flat.get(key), missing_is_mismatch=True)
            )
    return rows


def flatten_sections(config: dict[str, Any], sections: tuple[str, ...] = ADAPTER_CONFIG_SECTIONS) -> dict[str, Any]:
    """`section.key.sub` -> value for the adapter-shaping sections of a resolved config."""
    return flatten({name: config.get(name) for name in sections})


def _compared(kind: str, name: str, recorded: Any, current: Any, missing_is_mismatch: bool = False) -> dict[str, Any]:
    if current is None and not missing_is_mismatch:
        status = "MISSING"
    else:
        status = "MATCH" if recorded == current else "MISMATCH"
    return {"kind": kind, "name": name, "recorded": recorded, "current": current, "status": status}


def model_card(provenance: dict[str, Any]) -> str:
    """The adapter's `README.md`: what it is, what it was made from, how it scored, how to verify it."""
    config, git, run = provenance["config"], provenance["git"], provenance["mlflow"]
    method, model = config["method"], config["model"]
    dirty = f" (uncommitted changes: {', '.join(git['dirty_files'])})" if git.get("dirty") else ""
    exp = provenance.get("dvc", {})
    inputs = "\n".join(
        f"| {name} | `{entry['path']}` | `{entry['md5'] or 'revision ' + str(entry.get('revision'))}` |"
        for name, entry in provenance["inputs"].items()
    )
    code = "\n".join(f"| `{path}` | `{md5}` |" for path, md5 in provenance.get("code", {}).items())
    metrics = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(provenance["metrics"].items()))
    counts = provenance["parameters"]
    versions = ", ".join(f"{name} {version}" for name, version in provenance["packages"].items())
    full = method.get("adapter") == "none"
    shape = "(every weight)" if full else f"r={method['r']}, alpha={method['alpha']}"
    auto = "AutoModelForSequenceClassification" if model.get("task") == "classification" else "AutoModelForCausalLM"
    base_path, adapter_path = config["paths"]["base_model"], config["paths"]["adapter"]
    if full:
        loading = f'from transformers import {auto}\nmodel = {auto}.from_pretrained("{adapter_path}")'
    else:
        loading = (
            f"from peft import PeftModel\nfrom transformers import {auto}\n"
            f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base_path}"), "{adapter_path}")'
        )
    return f"""---
library_name: {"transformers" if full else "peft"}
base_model: {model["source"]}
tags: [slmtune, {method["name"]}]
---

# {method["name"].upper()} {"fine-tuned model" if full else "adapter"} for `{model["source"]}`

Made by the slmtune `train` stage: {method["name"]} {shape}, \
learning rate {config["train"]["learning_rate"]}, seed {config["train"]["seed"]}; \
{counts["trainable"]:,} trainable of {counts["total"]:,} parameters.

- MLflow run: `{run["run_id"]}` (experiment {run["experiment_id"]})
- DVC experiment: `{exp.get("exp_name", "workspace")}`, baseline `{exp.get("baseline_rev", "unknown")}`
- Git commit: `{git.get("commit") or "unknown"}`{dirty}

## Training metrics

| metric | value |
|---|---:|
{metrics}

Test-split metrics (base vs tuned) are in `reports/metrics.json` and the MLflow run.

## Inputs (DVC md5)

| input | path | md5 |
|---|---|---|
{inputs}

## Code (md5)

| file | md5 |
|---|---|
{code}

Packages: {versions}. The full resolved configuration is in `provenance.json`.

## Verify and use

`slmtune lineage {config["paths"]["adapter"]}` re-hashes the inputs and code above and \
compares the configuration with `params.yaml` (non-zero exit on any mismatch).

```python
{loading}
```
"""


def aligned_card(provenance: dict[str, Any]) -> str:
    """The aligned adapter's `README.md`: the objective, the SFT adapter it started from, the held-out scores."""
    config, sft, run = provenance["config"], provenance["sft"], provenance["mlflow"]
    align = config["align"]
    inputs = "\n".join(
        f"| {name} | `{entry['path']}` | `{entry['md5']}` |" for name, entry in provenance["inputs"].items()
    )
    metrics = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(provenance["metrics"].items()))
    return f"""---
library_name: {"peft" if (Path(config["paths"]["aligned"]) / "adapter_config.json").is_file() else "transformers"}
base_model: {config["model"]["source"]}
tags: [slmtune, {align["objective"]}, {config["method"]["name"]}]
---

# {align["objective"].upper()}-aligned {config["method"]["name"]} model for `{config["model"]["source"]}`

Made by the slmtune `align` stage through TRL: {align["objective"]} (loss {align["loss_type"]}, beta {align["beta"]}),
learning rate {align["learning_rate"]}, starting from the SFT adapter `{sft["path"]}` (md5 `{sft["md5"]}`, MLflow run
`{sft["mlflow_run_id"]}`).

- MLflow run: `{run["run_id"]}` (experiment {run["experiment_id"]})
- Git commit: `{provenance["git"].get("commit") or "unknown"}`

## Held-out preference scores

| metric | value |
|---|---:|
{metrics}

## Inputs (DVC md5)

| input | path | md5 |
|---|---|---|
{inputs}

`slmtune lineage {config["paths"]["aligned"]}` re-hashes these inputs (the SFT adapter included) and the code, and
compares the configuration with `params.yaml`.
"""


def input_digests(config: Any) -> dict[str, dict[str, Any]]:
    """DVC md5 of every data and model input of the adapter: each data source, the prepared, augmented and
    tokenized data and the base model. Hub datasets cannot be hashed: their pinned revision stands in."""
    digests: dict[str, dict[str, Any]] = {}
    for name, source in config.data.sources.items():
        if source.format == "hub":
            digests[f"source/{name}"] = {"path": source.path, "md5": None, "revision": source.revision}
        else:
            digests[f"source/{name}"] = {"path": source.path, "md5": dvc_md5(source.path)}
    for name in ("prepared", "augmented", "tokenized", "base_model"):
        path = getattr(config.paths, name)
        digests[name] = {"path": path, "md5": dvc_md5(path)}
    return digests


def print_lineage(adapter: str, provenance: dict[str, Any], current_config: dict[str, Any] | None) -> int:
    """Print an adapter's provenance and the re-check of its inputs, code and params; 1 on any mismatch."""
    git, run, exp = provenance["git"], provenance["mlflow"], provenance.get("dvc", {})
    dirty = f" (uncommitted: {', '.join(git['dirty_files'])})" if git.get("dirty") else ""
    print(f"adapter      {adapter}")
    print(f"MLflow run   {run['run_id']} (experiment {run['experiment_id']})")
    print(f"DVC exp      {exp.get('exp_name', 'unknown')}, baseline {exp.get('baseline_rev', 'unknown')}")
    print(f"git commit   {git.get('commit')}{dirty}")
    print("metrics      " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(provenance["metrics"].items())))
    rows = check_lineage(provenance, current_config)
    for kind in ("input", "code", "param"):
        group = [row for row in rows if row["kind"] == kind]
        shown = [row for row in group if kind != "param" or row["status"] != "MATCH"]
        if kind == "param" and len(shown) < len(group):
            names = ", ".join(ADAPTER_CONFIG_SECTIONS + (("align",) if "sft" in provenance else ()))
            print(f"MATCH      params: {len(group) - len(shown)} keys of {names} equal params.yaml")
        for row in shown:
            if row["status"] in ("MATCH", "UNHASHED"):
                detail = row["recorded"]
            else:
                detail = f"recorded {row['recorded']}, now {row['current']}"
            print(f"{row['status']:10} {kind} {row['name']}: {detail}")
    if current_config is None:
        print("(no params.yaml here: params not compared)")
    bad = [row for row in rows if row["status"] in ("MISMATCH", "MISSING")]
    print("lineage: " + ("MATCH" if not bad else f"MISMATCH ({len(bad)} of {len(rows)} checks differ)"))
    return 1 if bad else 0
