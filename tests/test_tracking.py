"""MLflow runs: one per pipeline execution, tagged with its DVC experiment; a store shared by parallel workers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import stage_env
from slmtune.config import TrackingConfig
from slmtune.experiments import close_child_runs, schedule_child_runs
from slmtune.tracking import ADAPTER_RUN_TAG, BASELINE_TAG, EXP_NAME_TAG, evaluation_run, open_store, pipeline_run

WORKER = """
import sys
import time
from pathlib import Path

import mlflow
from slmtune.config import TrackingConfig
from slmtune.tracking import mlflow_run

Path(f"ready-{sys.argv[1]}").touch()  # imported; now wait at the barrier so that all four open the store at once
deadline = time.monotonic() + 120
while not Path("go").exists():
    assert time.monotonic() < deadline, "no go from the test"
    time.sleep(0.005)
with mlflow_run(TrackingConfig(log_system_metrics=False), run_name=sys.argv[1]):
    for step in range(100):
        mlflow.log_metric("m", step, step=step)
"""


def test_parallel_workers_create_and_share_one_sqlite_store(tmp_path: Path):
    env = stage_env() | {"DVC_ROOT": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, f"w{i}"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4:  # a barrier: none touches the store before all are ready
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "workers did not get ready"
        time.sleep(0.01)
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "go").touch()
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, "\n".join(errors)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["slmtune"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1", "w2", "w3"]
    for r in runs:
        assert len(MlflowClient().get_metric_history(r.info.run_id, "m")) == 100


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> TrackingConfig:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}", log_system_metrics=False)


def test_evaluation_joins_its_train_run_once_then_gets_its_own(tracking):
    with pipeline_run(tracking, "train") as train:
        pass
    train_id = train.info.run_id
    with evaluation_run(tracking, train_id, {"eval": {"max_new_tokens": 8}}) as first:
        mlflow.log_metric("test/tuned/loss", 1.0)
    assert first.info.run_id == train_id

    with evaluation_run(tracking, train_id, {"eval": {"max_new_tokens": 16}}) as second:
        mlflow.log_metric("test/tuned/loss", 2.0)
    assert second.info.run_id != train_id
    again = MlflowClient().get_run(second.info.run_id)
    assert again.data.tags[ADAPTER_RUN_TAG] == train_id and again.data.params["eval.max_new_tokens"] == "16"
    assert [m.value for m in MlflowClient().get_metric_history(train_id, "test/tuned/loss")] == [1.0]

    with evaluation_run(tracking, "0" * 32, {}) as foreign:  # an adapter whose run is in another store
        pass
    assert foreign.info.run_id not in (train_id, second.info.run_id)


def test_workspace_runs_are_tagged_and_experiment_runs_resume_their_scheduled_run(tracking, monkeypatch):
    with pipeline_run(tracking, "train") as workspace:
        pass
    tags = MlflowClient().get_run(workspace.info.run_id).data.tags
    assert tags[EXP_NAME_TAG] == "workspace" and tags[BASELINE_TAG] == "unknown"

    experiment_id = open_store(tracking)
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        pass
    children = schedule_child_runs(experiment_id, parent.info.run_id, ["exp-a", "exp-b"], "abc123")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with pipeline_run(tracking, "train") as run:
        pass
    assert run.info.run_id == children["exp-b"]
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert MlflowClient().get_run(children["exp-a"]).info.status == "SCHEDULED"


def test_children_no_stage_resumed_are_closed_from_the_experiment_results(tracking):
    experiment_id = open_store(tracking)
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        pass
    children = schedule_child_runs(experiment_id, parent.info.run_id, ["cached", "broken"], "abc123")
    rows = {
        "cached": {
            "tuned.loss": 1.25,
            "base.loss": 3.5,
            "method.r": 4,
            "mlflow_run_id": "earlier",
            "Experiment": "cached",
        }
    }
    close_child_runs(children, {"cached": "Success", "broken": "Failed"}, rows)
    cached, broken = (MlflowClient().get_run(children[name]) for name in ("cached", "broken"))
    assert cached.info.status == "FINISHED" and broken.info.status == "FAILED"
    assert cached.data.metrics == {"test/tuned/loss": 1.25, "test/base/loss": 3.5}
    assert cached.data.params == {"method.r": "4"} and cached.data.tags[ADAPTER_RUN_TAG] == "earlier"


def test_a_tracking_server_that_is_down_or_silent_is_refused_at_once(tmp_path: Path, monkeypatch):
    """One request, no retries, a short timeout: MLflow's own client would retry for minutes."""
    import socket

    from slmtune import tracking
    from slmtune.errors import TrackingStoreError

    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 2)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            down = probe.getsockname()[1]  # nothing listens there once closed
        for port, reason in ((down, "does not answer"), (silent.getsockname()[1], "does not answer")):
            start = time.monotonic()
            with pytest.raises(TrackingStoreError, match=f"http://127.0.0.1:{port}: the MLflow server {reason}"):
                tracking.check_tracking_store(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}"))
            assert time.monotonic() - start < 15
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if not os.access(readonly, os.W_OK):  # root writes anywhere
        with pytest.raises(TrackingStoreError, match="is not writable"):
            tracking.check_tracking_store(TrackingConfig(tracking_uri=f"sqlite:///{readonly}/mlflow.db"))
    tracking.check_tracking_store(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/new/mlflow.db"))


def test_resuming_a_run_the_store_does_not_have_is_one_line_naming_the_store(tracking):
    from slmtune.errors import TrackingStoreError
    from slmtune.tracking import mlflow_run

    missing = pytest.raises(TrackingStoreError, match=r"MLflow run 0123abcd is not in the tracking store sqlite:///")
    with missing, mlflow_run(tracking, run_id="0123abcd"):
        pass
    with mlflow_run(tracking, run_name="present") as run:
        present = run.info.run_id
    with mlflow_run(tracking, run_id=present) as again:
        assert again.info.run_id == present


CI_VARIABLES = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS"}
CI_VARIABLES |= {"TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION"}
CI_VARIABLES |= {"CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"}


@pytest.mark.parametrize("opt_in", [False, True])
def test_mlflow_sends_no_telemetry_unless_the_user_turns_it_on(opt_in):
    """MLflow 3 starts a telemetry client (it fetches config.mlflow-telemetry.io and posts usage records) in every
    process that imports it, off only where it sees a CI variable: so the check runs without them, as on a user's
    machine. Importing slmtune first turns it off; MLFLOW_DISABLE_TELEMETRY=false is the user's way back."""
    env = {key: value for key, value in os.environ.items() if key not in CI_VARIABLES}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
    env.pop("DO_NOT_TRACK", None)
    if opt_in:
        env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    code = (
        "import slmtune, mlflow; from mlflow.telemetry.client import get_telemetry_client;"
        "print('client' if get_telemetry_client() is not None else 'none')"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == ("client" if opt_in else "none")
