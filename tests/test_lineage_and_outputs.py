import os

import pytest
import yaml

from conftest import REPO, run
from slmtune.lineage import check_lineage, dvc_md5, git_state, project_root, stage_code_deps
from slmtune.outputs import staged_outputs


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


def test_staged_outputs_publish_all_together(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "old").write_text("old")
    with staged_outputs(tmp_path / "dir", tmp_path / "f.json") as (d, f):
        d.mkdir()
        (d / "new").write_text("new")
        f.write_text("{}")
        assert not (tmp_path / "f.json").exists(), "nothing is visible before the block ends"
    assert os.listdir(tmp_path / "dir") == ["new"] and (tmp_path / "f.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["dir", "f.json"], "no temporaries left behind"


def test_staged_outputs_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_outputs(tmp_path / "out", tmp_path / "stats.json") as (out, stats):
            out.mkdir()
            stats.write_text("half")
            raise RuntimeError("stage failed")
    assert os.listdir(tmp_path) == []


def test_staged_outputs_require_every_declared_output(tmp_path):
    with pytest.raises(RuntimeError, match="did not write its declared output"):
        with staged_outputs(tmp_path / "a", tmp_path / "b") as (a, b):
            a.write_text("only one")
    assert os.listdir(tmp_path) == []


def _provenance(tmp_path, config):
    (tmp_path / "data.csv").write_text("q,a\nhi,there\n")
    (tmp_path / "code.py").write_text("print(1)\n")
    return {
        "inputs": {"source/kb": {"path": "data.csv", "md5": dvc_md5(tmp_path / "data.csv")},
                   "source/hub": {"path": "org/set", "md5": None, "revision": "abc"}},
        "code": {"code.py": dvc_md5(tmp_path / "code.py")},
        "config": config,
    }  # fmt: skip


def test_lineage_matches_then_flags_a_changed_byte_a_changed_param_and_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"model": {"source": "m"}, "data": {}, "method": {"r": 8}, "train": {"learning_rate": 0.001}, "eval": {"batch_size": 8}}
    provenance = _provenance(tmp_path, config)
    status = {row["name"]: row["status"] for row in check_lineage(provenance, config)}
    assert status == {"source/kb": "MATCH", "source/hub": "UNHASHED", "code.py": "MATCH", "model.source": "MATCH",
                      "method.r": "MATCH", "train.learning_rate": "MATCH"}  # fmt: skip

    (tmp_path / "data.csv").write_text("q,a\nhi,therE\n")
    changed = config | {"method": {"r": 16}, "eval": {"batch_size": 1}}  # evaluation settings do not shape the adapter
    rows = {row["name"]: row for row in check_lineage(provenance, changed)}
    assert rows["source/kb"]["status"] == "MISMATCH" and rows["method.r"]["status"] == "MISMATCH"
    assert (rows["method.r"]["recorded"], rows["method.r"]["current"]) == (8, 16)
    assert rows["code.py"]["status"] == "MATCH" and "eval.batch_size" not in rows

    (tmp_path / "code.py").unlink()
    assert {row["name"]: row["status"] for row in check_lineage(provenance, None)}["code.py"] == "MISSING"


def test_train_stage_code_deps_come_from_dvc_yaml():
    deps = stage_code_deps("train", REPO / "dvc.yaml")
    assert "stages/train.py" in deps and "src/slmtune/training.py" in deps
    assert not any("$" in dep for dep in deps)
