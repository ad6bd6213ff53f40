"""Lineage: DVC md5s, git state, provenance checks, `slmtune lineage`, and code deps that are the modules each
stage imports."""

import json

import pytest
import yaml

from conftest import REPO, STAGES, copy_project, imported_code, run
from slmtune.config import Config, config_to_dict
from slmtune.lineage import (
    check_lineage,
    dvc_md5,
    git_state,
    pipeline_written_files,
    project_root,
    stage_code_deps,
)


def test_md5_matches_what_dvc_records(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (tmp_path / "file.csv").write_text("x,y\r\n1,2\r\n")
    run(["dvc", "add", "-q", "folder", "file.csv"], tmp_path)
    for name in ("folder", "file.csv"):
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / name) == recorded


def test_project_root_escapes_dvc_experiment_temp_dirs(tmp_path, monkeypatch):
    temp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(temp))
    assert project_root() == tmp_path.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert project_root() == tmp_path.resolve()


def test_git_state_reports_commit_and_dirtiness(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    (tmp_path / "f").write_text("1")
    run(["git", "add", "f"], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], tmp_path)
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "f").write_text("2")
    assert git_state(tmp_path)["dirty"] is True and git_state(tmp_path)["dirty_files"] == ["f"]
    assert git_state("/")["commit"] is None


def test_the_pipelines_own_outputs_do_not_make_a_run_dirty(tmp_path):
    """DVC deletes a stage's committed outputs before running it (a fresh clone's `reports/train_log.csv`
    while `train` runs): the run is still clean; a changed source file is not."""
    written = pipeline_written_files(config_to_dict(Config()), REPO / "dvc.yaml")
    for path in (
        "dvc.lock",
        "models/adapter",
        "reports/train_log.csv",
        "reports/metrics.json",
        "reports/data_stats.json",
    ):
        assert path in written
    assert not any(path.startswith(("src/", "conf/", "data/raw")) or path == "params.yaml" for path in written)
    for name in ("reports/train_log.csv", "models/adapter/adapter_config.json", "dvc.lock", "src/code.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1")
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], tmp_path)
    (tmp_path / "reports/train_log.csv").unlink()
    (tmp_path / "models/adapter/adapter_config.json").write_text("2")
    (tmp_path / "dvc.lock").write_text("2")
    assert git_state(tmp_path, written)["dirty"] is False and git_state(tmp_path)["dirty"] is True
    (tmp_path / "src/code.py").write_text("2")
    assert git_state(tmp_path, written) | {"commit": None} == {
        "commit": None,
        "dirty": True,
        "dirty_files": ["src/code.py"],
    }


def _provenance(tmp_path, config):
    (tmp_path / "data.csv").write_text("q,a\nhi,there\n")
    (tmp_path / "code.py").write_text("print(1)\n")
    return {
        "inputs": {
            "source/kb": {"path": "data.csv", "md5": dvc_md5(tmp_path / "data.csv")},
            "source/hub": {"path": "org/set", "md5": None, "revision": "abc"},
        },
        "code": {"code.py": dvc_md5(tmp_path / "code.py")},
        "config": config,
    }


def test_lineage_matches_then_flags_a_changed_byte_a_changed_param_and_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "model": {"source": "m"},
        "data": {},
        "method": {"r": 8},
        "train": {"learning_rate": 0.001},
        "eval": {"batch_size": 8},
    }
    provenance = _provenance(tmp_path, config)
    status = {row["name"]: row["status"] for row in check_lineage(provenance, config)}
    assert status == {
        "source/kb": "MATCH",
        "source/hub": "UNHASHED",
        "code.py": "MATCH",
        "model.source": "MATCH",
        "method.r": "MATCH",
        "train.learning_rate": "MATCH",
    }

    (tmp_path / "data.csv").write_text("q,a\nhi,therE\n")
    changed = config | {"method": {"r": 16}, "eval": {"batch_size": 1}}  # evaluation settings do not shape the adapter
    rows = {row["name"]: row for row in check_lineage(provenance, changed)}
    assert rows["source/kb"]["status"] == "MISMATCH" and rows["method.r"]["status"] == "MISMATCH"
    assert (rows["method.r"]["recorded"], rows["method.r"]["current"]) == (8, 16)
    assert rows["code.py"]["status"] == "MATCH" and "eval.batch_size" not in rows

    (tmp_path / "code.py").unlink()
    assert {row["name"]: row["status"] for row in check_lineage(provenance, None)}["code.py"] == "MISSING"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_exactly_the_code_it_imports(stage):
    deps = stage_code_deps(stage, REPO / "dvc.yaml")
    assert sorted(deps) == sorted(imported_code(stage)), "list these in dvc.yaml: " + " ".join(imported_code(stage))


def test_import_closure_follows_relative_imports_inside_functions(tmp_path):
    package = tmp_path / "src/slmtune"
    (package / "pipeline").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pipeline/__init__.py").write_text("from ..config import X\n")
    (package / "pipeline/train.py").write_text("def f():\n    from ..lazy import y\n")
    (package / "config.py").write_text("import os\n")
    (package / "lazy.py").write_text("from . import config\n")
    (package / "unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/train.py").write_text("from slmtune.pipeline.train import f\n")
    assert sorted(imported_code("train", tmp_path)) == [
        "src/slmtune/__init__.py",
        "src/slmtune/config.py",
        "src/slmtune/lazy.py",
        "src/slmtune/pipeline/__init__.py",
        "src/slmtune/pipeline/train.py",
        "stages/train.py",
    ]


def test_editing_the_batch_collator_reruns_train(tiny_trained, tmp_path):
    project = copy_project(tiny_trained.project, tmp_path)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
    prompting = project / "src/slmtune/prompting.py"
    text = prompting.read_text()
    assert "def padding_collator(" in text
    prompting.write_text(text.replace("def padding_collator(", "def padding_collator(  # edited\n    ", 1))
    dry = run(["dvc", "repro", "--dry", "train"], project).stdout
    assert "Running stage 'train'" in dry


def test_lineage_command_matches_a_fresh_adapter_and_flags_one_changed_byte(tiny_trained, tmp_path):
    tiny_project = copy_project(tiny_trained.project, tmp_path)
    result = run(["slmtune", "lineage", "models/adapter"], tiny_project)
    assert result.stdout.rstrip().endswith("lineage: MATCH")
    assert "MATCH      input source/company_kb" in result.stdout and "MATCH      code stages/train.py" in result.stdout
    provenance = json.loads((tiny_project / "models/adapter/provenance.json").read_text())
    card = (tiny_project / "models/adapter/README.md").read_text()
    assert provenance["mlflow"]["run_id"] in card and provenance["inputs"]["tokenized"]["md5"] in card

    data = tiny_project / "data/raw/company_kb.csv"
    raw = bytearray(data.read_bytes())
    raw[-2] = ord("X") if raw[-2] != ord("X") else ord("Y")
    data.write_bytes(bytes(raw))
    changed = run(["slmtune", "lineage"], tiny_project, check=False)
    assert changed.returncode == 1
    assert "MISMATCH   input source/company_kb: recorded " in changed.stdout
    assert changed.stdout.rstrip().splitlines()[-1].startswith("lineage: MISMATCH (1 of ")
