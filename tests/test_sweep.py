"""`slmtune sweep` and `slmtune reproduce`: a Hydra grid as queued DVC experiments under one MLflow parent run."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY_OVERRIDES, built_once, make_project, run, stage_env
from slmtune.errors import ExperimentError
from slmtune.experiments import metric_direction, sweep_points, swept_keys
from slmtune.reports.sweep import SweepOutcome, rank_experiments, render_sweep_report
from slmtune.tracking import BASELINE_TAG, EXP_NAME_TAG

ROWS = {
    "exp-a": {
        "method.r": 4,
        "train.learning_rate": 1e-4,
        "tuned.loss": 2.5,
        "tuned.rougeL": 0.30,
        "verdict.result": "worse",
    },
    "exp-b": {"method.r": 8, "train.learning_rate": 1e-4, "tuned.loss": 1.5, "tuned.rougeL": 0.20},
    "exp-c": {"method.r": 4, "train.learning_rate": 3e-4, "tuned.loss": 2.0, "tuned.rougeL": 0.40},
}


def test_sweep_overrides_expand_like_dvc():
    overrides = ["method.r=4,8", "train.learning_rate=1e-4,3e-4", "train.max_steps=5"]
    points = sweep_points(overrides)
    assert len(points) == 4 and all("train.max_steps=5" in point for point in points)
    assert {tuple(sorted(p)) for p in points} == {
        tuple(sorted(["method.r=" + r, "train.learning_rate=" + lr, "train.max_steps=5"]))
        for r in ("4", "8")
        for lr in ("0.0001", "0.0003")
    }
    assert swept_keys(overrides) == ["method.r", "train.learning_rate"]


def test_sweep_ranks_by_the_chosen_metric_in_its_direction():
    assert rank_experiments(ROWS, "tuned.loss", metric_direction("tuned.loss", None)) == ["exp-b", "exp-c", "exp-a"]
    assert rank_experiments(ROWS, "tuned.rougeL", metric_direction("tuned.rougeL", None)) == ["exp-c", "exp-a", "exp-b"]
    assert metric_direction("tuned.bleu", None) == "max" and metric_direction("tuned.perplexity", None) == "min"
    with pytest.raises(ExperimentError, match="--direction"):
        metric_direction("tuned.meteor", None)
    states = {"exp-a": "Success", "exp-b": "Success", "exp-c": "Success", "exp-d": "Failed"}
    swept = ["method.r", "train.learning_rate"]
    outcome = SweepOutcome(ROWS, states, {"exp-b": "run-b"}, swept, "tuned.loss", "min", "parent")
    report = render_sweep_report(outcome, "sweep.png")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| rank | experiment | method.r | train.learning_rate | tuned.loss")
    assert [line.split(" | ")[1] for line in table[1:]] == ["`exp-b`", "`exp-c`", "`exp-a`"]
    assert table[0].endswith(" | verdict | MLflow run |") and [line.split(" | ")[-2] for line in table[1:]] == [
        "–",
        "–",
        "worse",
    ]
    assert "`exp-b`: `method.r=8`, `train.learning_rate=0.0001`, `tuned.loss` = 1.5" in report
    assert (
        "dvc exp apply exp-b" in report and "`exp-d`: see `dvc queue logs exp-d`" in report and "](sweep.png)" in report
    )


def test_the_report_gives_swept_values_as_overrides_and_names_ties_on_the_metric():
    # `dvc exp show` returns every number as a float (120000 -> 120000.0); the report must give back what `-S`
    # takes (an int key rejects 1.2e+05), and say when the best experiment is tied on the ranking metric
    rows = {
        "exp-a": {"train.token_budget": 120000.0, "train.learning_rate": 3e-4, "validation.fact_accuracy": 0.7},
        "exp-b": {"train.token_budget": 75000.0, "train.learning_rate": 1e-05, "validation.fact_accuracy": 0.7},
        "exp-c": {"train.token_budget": 75000.0, "train.learning_rate": 2e-4, "validation.fact_accuracy": 0.5},
    }
    swept = ["train.token_budget", "train.learning_rate"]
    states = dict.fromkeys(rows, "Success")
    report = render_sweep_report(
        SweepOutcome(rows, states, {}, swept, "validation.fact_accuracy", "max", "parent"), "sweep.png"
    )
    table = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")][1:]
    assert [cells[2:4] for cells in table] == [["120000", "0.0003"], ["75000", "1e-05"], ["75000", "0.0002"]]
    assert "`exp-a`: `train.token_budget=120000`, `train.learning_rate=0.0003`" in report
    assert "Tied on `validation.fact_accuracy` with `exp-b`" in report and "`exp-c`" not in report.split("Tied")[1]
    untied = render_sweep_report(
        SweepOutcome(
            rows | {"exp-a": rows["exp-a"] | {"validation.fact_accuracy": 0.8}},
            states,
            {},
            swept,
            "validation.fact_accuracy",
            "max",
            "parent",
        ),
        "sweep.png",
    )
    assert "Tied" not in untied


def test_experiments_are_read_under_their_baseline_and_a_swept_group_by_its_preset_name(monkeypatch):
    """HEAD may move while a sweep runs (a commit in the meantime): `dvc exp show` of HEAD would list none of them."""
    import dvc.api

    from slmtune.experiments import experiment_rows

    asked = []

    kb = {
        "params.yaml:data.sources.company_kb.path": "data/raw/company_kb.csv",
        "params.yaml:data.sources.reworded.path": "data/raw/company_kb_reworded.csv",
        "params.yaml:data.sources.reworded.split": "val",
    }
    handbook = {  # the company_kb preset's values and more: the more specific preset is the one shown
        "params.yaml:data.sources.handbook.path": "data/raw/lumora_handbook.txt",
        "params.yaml:data.sources.handbook.kind": "text",
        "params.yaml:data.sources.handbook.split": "train",
        "params.yaml:data.sources.handbook.weight": 2.0,  # dvc exp show reads numbers as floats
    }

    def exp_show(repo, revs=None):
        asked.append(revs)
        listed = [
            {"Experiment": "exp-a", "params.yaml:method.name": "full", "params.yaml:method.r": 16, **kb},
            {"Experiment": "exp-b", "params.yaml:method.name": "full", **kb, **handbook},
        ]
        return listed + [{"Experiment": "other", "params.yaml:method.name": "lora"}] if revs == "abc123" else []

    monkeypatch.setattr(dvc.api, "exp_show", exp_show)
    rows = experiment_rows(REPO, ["exp-a", "exp-b"], "abc123")
    assert asked == ["abc123"]
    flat = {"Experiment": "exp-a", "method.name": "full", "method.r": 16} | {k.split(":")[1]: v for k, v in kb.items()}
    assert rows["exp-a"] == {"method": "full", "data": "company_kb"} | flat
    assert (rows["exp-b"]["method"], rows["exp-b"]["data"]) == ("full", "company_kb_handbook")
    assert swept_keys(["method=lora,full", "train.max_steps=5"]) == ["method"]
    assert swept_keys(["data=company_kb,company_kb_handbook"]) == ["data"]


@pytest.fixture(scope="session")
def fresh_clone(shared_tmp, tiny_model_dir) -> Path:
    """A tiny project whose conf/ holds its settings (queued experiments recompose conf/), in the state of a
    fresh clone: dvc.lock committed, no outputs, no cache; built once for all workers (copy it)."""

    def build(folder: Path) -> str:
        project = make_project(
            folder / "project",
            [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES],
            frozen_conf=True,
        )
        _fresh_clone_state(project)
        return str(project)

    return Path(built_once(shared_tmp, "fresh-clone", build))


def fresh_clone_project(fresh_clone: Path, tmp_path: Path) -> Path:
    """A private copy of `fresh_clone` (its git history included)."""
    return shutil.copytree(fresh_clone, tmp_path / "project", symlinks=True)


def _fresh_clone_state(project: Path) -> None:
    """Commit dvc.lock as the repository ships it, then drop outputs and cache as a new clone has none."""
    run(["dvc", "repro", "tokenize"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], project)
    for path in ("models/base", "data/prepared", "data/tokenized", ".dvc/cache"):
        shutil.rmtree(project / path)


@pytest.mark.pipeline
def test_sweep_runs_the_grid_as_queued_experiments_under_one_parent_and_reproduces(tmp_path, fresh_clone):
    project = fresh_clone_project(fresh_clone, tmp_path)
    result = run(["slmtune", "sweep", "-S", "method.r=2,4", "-S", "train.learning_rate=1e-3", "-j", "2"], project)
    assert result.stdout.count("Running stage 'prepare'") == result.stdout.count("Running stage 'tokenize'") == 1

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("slmtune.sweep") == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 == len(runs) - 1 and {c.info.status for c in children} == {"FINISHED"}
    names = {c.data.tags[EXP_NAME_TAG]: c for c in children}
    baseline = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert {c.data.tags[BASELINE_TAG] for c in children} == {baseline}

    table = run(["dvc", "exp", "show", "--csv", "--no-pager"], project).stdout
    for name, child in names.items():
        assert name in table
        logs = run(["dvc", "queue", "logs", name], project).stdout
        assert "Stage 'prepare' didn't change, skipping" in logs and "Stage 'tokenize' didn't change, skipping" in logs
        assert "Running stage 'train'" in logs
        assert str(child.data.params["method.r"]) in ("2", "4") and "test/tuned/loss" in child.data.metrics
        assert f"{child.data.metrics['test/tuned/loss']:.6g}"[:5] in table

    report = (project / "reports/sweep.md").read_text()
    ranked = [line.split(" | ")[1].strip("`") for line in report.splitlines() if line.startswith("| ") and "`" in line]
    losses = [names[name].data.metrics["test/tuned/loss"] for name in ranked]
    assert sorted(ranked) == sorted(names) and losses == sorted(losses)
    assert (project / "reports/sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert {a.path for a in MlflowClient().list_artifacts(parents[0].info.run_id, "sweep")} == {
        "sweep/sweep.md",
        "sweep/sweep.png",
    }

    chosen = names[ranked[0]]
    plan = run(["slmtune", "reproduce", chosen.info.run_id], project)  # without --run: the plan only
    assert f"refs/exps/{baseline[:2]}/{baseline[2:]}/{ranked[0]}" in plan.stdout and "reproducing in" not in plan.stdout
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1
    result = run(["slmtune", "reproduce", chosen.info.run_id, "--run"], project)
    assert f"refs/exps/{baseline[:2]}/{baseline[2:]}/{ranked[0]}" in result.stdout
    assert "MATCH     adapter_model.safetensors" in result.stdout and "reproduction: MATCH" in result.stdout
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1


def test_sweep_refuses_untracked_pipeline_files_before_queueing(tiny_project: Path):
    (tiny_project / "data/raw/new.csv").write_text("instruction,output\nq,a\n")
    result = run(["slmtune", "sweep", "-S", "method.r=2,4"], tiny_project, check=False)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: queued experiments see only files git tracks: data/raw/new.csv untracked. Commit them first."
    )
    unknown = run(["slmtune", "sweep", "-S", "method.rank=2,4"], tiny_project, check=False)
    assert unknown.returncode == 1 and "method.rank" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    assert "Queued" not in run(["dvc", "queue", "status"], tiny_project).stdout


@pytest.mark.pipeline
def test_sweep_with_a_failing_experiment_exits_1_and_a_busy_queue_is_refused(tmp_path, fresh_clone):
    project = fresh_clone_project(fresh_clone, tmp_path)
    # every example is longer than 8 tokens: this experiment's tokenize stage fails
    failed = run(["slmtune", "sweep", "-S", "data.max_length=8"], project, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: 1 experiment(s) failed: ")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.info.status == "FAILED"

    run(["dvc", "exp", "run", "--queue", "-S", "method.r=8"], project)  # someone else's experiment, not yet run
    busy = run(["slmtune", "sweep", "-S", "method.r=2,4"], project, check=False)
    assert busy.returncode == 1 and "the DVC queue already holds 1 unfinished experiment(s)" in busy.stderr
    assert "dvc queue remove --queued" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1


def sweep_processes(project: Path) -> list[str]:
    """Command lines of the processes still working for `project`: queue workers, experiments, stages."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if str(project) in (process.info["cwd"] or "") and process.pid != os.getpid():
                found.append(" ".join(process.info["cmdline"] or []))
    return found


@pytest.mark.pipeline
def test_an_interrupted_sweep_stops_its_workers_and_a_rerun_finishes_only_what_did_not(tmp_path, fresh_clone):
    project = fresh_clone_project(fresh_clone, tmp_path)
    # one quick experiment, one that is still training when the sweep is interrupted
    command = ["slmtune", "sweep", "-S", "train.max_steps=4,240", "-S", "train.eval_steps=1000", "-j", "1"]
    log = tmp_path / "sweep.log"
    with open(log, "w") as output:
        sweep = subprocess.Popen(command, cwd=project, env=stage_env(), stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not re.search(r"\[1/2 done\] \S+: Success.*\n.*: Running", log.read_text(), re.S):
            assert sweep.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(5)  # into the second experiment's training
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(timeout=180) == 130, log.read_text()
    printed = log.read_text()
    assert "sweep interrupted by SIGINT: stopping its experiments and the queue workers" in printed
    assert "error: sweep interrupted by SIGINT: 1 of 2 experiment(s) finished; run the same command again" in printed
    deadline = time.monotonic() + 60
    while sweep_processes(project):
        assert time.monotonic() < deadline, sweep_processes(project)
        time.sleep(1)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("slmtune.sweep") == "parent"]
    assert parent.info.status == "KILLED" and parent.data.tags["slmtune.stopped"] == "sweep interrupted by SIGINT"
    done = re.search(r"\[1/2 done\] (\S+): Success", printed)[1]
    children = {r.data.tags[EXP_NAME_TAG]: r for r in runs if r.info.run_id != parent.info.run_id}
    (stopped,) = set(children) - {done}
    assert children[done].info.status == "FINISHED" and children[done].data.params["train.max_steps"] == "4"
    assert children[stopped].info.status == "KILLED"
    assert children[stopped].data.tags["slmtune.stopped"] == "sweep interrupted by SIGINT"
    report = (project / "reports/sweep.md").read_text()
    assert f"| 1 | `{done}` |" in report and f"`{stopped}`" in report.split("## Interrupted")[1]
    status = run(["dvc", "queue", "status"], project).stdout
    assert "Queued" not in status and "Running" not in status

    again = run(command, project)  # the same command: only the unfinished experiment trains
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    assert "SCHEDULED" not in {r.info.status for r in runs}
    (second,) = [
        r for r in runs if r.data.tags.get("slmtune.sweep") == "parent" and r.info.run_id != parent.info.run_id
    ]
    rerun = {
        r.data.params.get("train.max_steps"): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == second.info.run_id
    }
    assert {k: c.info.status for k, c in rerun.items()} == {"4": "FINISHED", "240": "FINISHED"}, again.stdout
    quick = run(["dvc", "queue", "logs", rerun["4"].data.tags[EXP_NAME_TAG]], project).stdout
    slow = run(["dvc", "queue", "logs", rerun["240"].data.tags[EXP_NAME_TAG]], project).stdout
    assert "Running stage 'train'" not in quick and "Stage 'train' is cached - skipping run" in quick, quick
    assert "Running stage 'train'" in slow
    assert rerun["4"].data.metrics["test/tuned/loss"] == children[done].data.metrics["test/tuned/loss"]


def test_reproduction_mismatch_is_exit_1():
    from slmtune.experiments import compare_metrics

    recorded = {"test/tuned/loss": 1.25, "test/base/loss": 2.0}
    assert compare_metrics(recorded, {"tuned": {"loss": 1.25}, "base": {"loss": 2.0}}) == 0
    assert compare_metrics(recorded, {"tuned": {"loss": 1.30}, "base": {"loss": 2.0}}) == 1
    assert compare_metrics({}, {"tuned": {"loss": 1.25}}) == 1  # nothing recorded to compare with
