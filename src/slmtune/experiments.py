"""DVC experiments driven from one command: sweeps with MLflow parent/child runs, and reproductions.

A sweep is DVC's own machinery: `dvc exp run --queue -S ...` stashes one experiment per grid point,
`dvc queue start -j N` runs them in temporary workspaces. This module adds what DVC does not: the
shared upstream stages run once first, an MLflow parent run holds one scheduled child run per
experiment (the train stage of that experiment resumes it), and a ranked report at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dvc.api
import mlflow
import psutil
import yaml
from dvc.repo import Repo
from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import Config, compose_params, flatten, load_config
from .errors import ExperimentError
from .lineage import file_md5, git_state
from .metrics import direction
from .outputs import staged_outputs
from .reports.sweep import SweepOutcome, plot_sweep, render_sweep_report
from .tracking import (
    ADAPTER_RUN_TAG,
    BASELINE_TAG,
    DIRTY_FILES_TAG,
    EXP_NAME_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    THREADS_TAG,
    VERDICT_TAG,
    open_store,
    tracking_uri,
)

UPSTREAM_TARGET = "tokenize"
"""Running this stage (and so everything before it) in the workspace first lets every experiment of a
sweep reuse base, prepare and tokenize from the DVC cache instead of computing them in parallel."""
DONE = ("Success", "Failed")
EXPERIMENT_FILES = ("params.yaml", "dvc.lock")
"""Files a DVC experiment changes by design (its params and lock); the run's config restores them."""
CONFIG_SECTIONS = ("paths", "model", "data", "method", "train", "eval", "tracking")
POLL_S = 3.0
METRICS_TOLERANCE = 1e-6
STOP_WAIT_S = 60.0
"""How long an interrupted sweep waits for DVC to mark its stopped experiments done."""
WORKER_EXIT_S = 60.0
"""How long an interrupted sweep waits for the idle queue workers to exit."""
STOPPED_TAG = "slmtune.stopped"


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM reached `slmtune sweep`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals(handler: Any) -> Any:
    """SIGINT and SIGTERM handled by `handler` in the block, as before after it."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise SweepInterrupted(signum)


def interruptible() -> Any:
    """SIGINT and SIGTERM raise `SweepInterrupted` in the block (SIGTERM would otherwise end the process at once,
    with nothing cleaned up)."""
    return _stop_signals(_raise_interrupted)


def uninterrupted() -> Any:
    """SIGINT and SIGTERM ignored while an interrupted sweep cleans up (a second Ctrl-C would leave workers)."""
    return _stop_signals(signal.SIG_IGN)


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, capture: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=capture, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        raise ExperimentError(
            f"`{' '.join(args)}` failed: {detail[-1] if detail else 'exit ' + str(result.returncode)}"
        )
    return result


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every grid point of Hydra sweep overrides (`a=1,2 b=x` -> `[a=1 b=x], [a=2 b=x]`), as DVC expands them."""
    return [point["params.yaml"] for point in get_hydra_sweeps({"params.yaml": overrides})]


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys that take several values in a sweep."""
    return [o.key_or_group for o in to_hydra_overrides(overrides) if o.is_sweep_override()]


def untracked_pipeline_files(root: Path, config: Config) -> list[str]:
    """Untracked files a queued experiment would miss: under conf/, stages/, src/, the raw data folder or a source."""
    watched = [
        "conf/",
        "stages/",
        "src/",
        "dvc.yaml",
        "dvc.lock",
        "params.yaml",
        config.paths.raw_data.rstrip("/") + "/",
    ]
    watched += [source.path for source in config.data.sources.values() if source.format != "hub"]
    lines = _run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout.splitlines()
    untracked = [line[3:] for line in lines if line.startswith("??")]
    return [path for path in untracked if any(path == w or path.startswith(w) for w in watched)]


def check_tracked(root: Path, config: Config) -> None:
    untracked = untracked_pipeline_files(root, config)
    if untracked:
        shown = ", ".join(untracked[:5]) + (f" and {len(untracked) - 5} more" if len(untracked) > 5 else "")
        raise ExperimentError(f"queued experiments see only files git tracks: {shown} untracked. Commit them first.")


def check_sweep_inputs(root: Path, config: Config, overrides: list[str]) -> list[list[str]]:
    """Validate every grid point against the schema, and the tree and queue against what a sweep needs."""
    if not overrides:
        raise ExperimentError("no overrides: give at least one, e.g. -S 'method.r=4,8'")
    points = sweep_points(overrides)
    with tempfile.TemporaryDirectory() as scratch:
        for point in points:
            compose_params(root, Path(scratch) / "params.yaml", point)
    check_tracked(root, config)
    busy = [task for task in queue_status(root).values() if task["status"] not in DONE]
    if busy:
        raise ExperimentError(
            f"the DVC queue already holds {len(busy)} unfinished experiment(s) ({', '.join(t['name'] for t in busy)}): "
            "run them with `dvc queue start` or drop them with `dvc queue remove --queued` first."
        )
    return points


def queue_status(root: Path) -> dict[str, dict[str, Any]]:
    """Task rev -> {name, status} for every experiment DVC's queue knows."""
    with Repo(str(root)) as repo:
        return {
            task["rev"]: {"name": task.get("name"), "status": task["status"]}
            for task in repo.experiments.celery_queue.status()
        }


def queue_experiments(root: Path, overrides: list[str]) -> dict[str, str]:
    """`dvc exp run --queue -S ...`; returns task rev -> experiment name of the newly queued ones."""
    before = set(queue_status(root))
    _run(["dvc", "exp", "run", "--queue", *(arg for o in overrides for arg in ("-S", o))], root)
    return {rev: task["name"] for rev, task in queue_status(root).items() if rev not in before}


def worker_env(jobs: int) -> dict[str, str]:
    """The environment queue workers inherit: CPU threads split between the parallel workers (several
    PyTorch processes each using every core slow each other down), unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def start_workers(root: Path, jobs: int) -> None:
    """`dvc queue start -j N`. Its output goes to a file: the workers it spawns inherit the handles,
    and a pipe would stay open (and this call blocked) until they exit."""
    with tempfile.TemporaryFile(mode="w+") as log:
        command = ["dvc", "queue", "start", "-j", str(jobs)]
        result = subprocess.run(command, cwd=root, env=worker_env(jobs), stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            log.seek(0)
            last = (log.read().strip().splitlines() or [f"exit {result.returncode}"])[-1]
            raise ExperimentError(f"`dvc queue start -j {jobs}` failed: {last}")


def wait_for(root: Path, tasks: dict[str, str]) -> dict[str, str]:
    """Poll the queue until every task is done; print each change; return name -> Success | Failed."""
    seen: dict[str, str] = {}
    while True:
        status = queue_status(root)
        for rev, name in tasks.items():
            state = status.get(rev, {}).get("status", "Queued")
            if seen.get(name) != state:
                seen[name] = state
                done = sum(s in DONE for s in seen.values())
                print(f"[{done}/{len(tasks)} done] {name}: {state}", flush=True)
        if all(seen.get(name) in DONE for name in tasks.values()):
            return seen
        time.sleep(POLL_S)


def workers_alive(root: Path) -> bool:
    """Whether any of this project's queue workers still answers."""
    with Repo(str(root)) as repo:
        return bool(repo.experiments.celery_queue.worker_status())


def end_experiment_processes(root: Path, grace_s: float = 10.0) -> None:
    """End every process working in the queue's temporary workspaces (experiments and their stages). DVC's
    `queue kill` sends SIGINT, which the queue's processes inherit as ignored: what is still there after a
    moment gets SIGTERM, then SIGKILL after `grace_s`."""
    temp = str(root / ".dvc" / "tmp" / "exps") + os.sep
    processes = []
    for process in psutil.process_iter(["cwd"]):
        if process.pid != os.getpid() and ((process.info["cwd"] or "") + os.sep).startswith(temp):
            processes.append(process)
    _, alive = psutil.wait_procs(processes, timeout=2.0)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5.0)


def _queue_command(root: Path, *args: str) -> None:
    """A `dvc queue` command of the clean-up after an interruption: its failure is shown, not raised (the
    clean-up goes on with the next step)."""
    result = subprocess.run(["dvc", "queue", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        last = detail[-1] if detail else f"exit {result.returncode}"
        print(f"warning: `dvc queue {' '.join(args)}` failed: {last}", flush=True)


def stop_queue(root: Path, tasks: dict[str, str]) -> dict[str, str]:
    """Stop an interrupted sweep's experiments and the queue workers: drop the queued ones, interrupt the running
    ones (`dvc queue kill`, then SIGTERM / SIGKILL to whatever still runs in their workspaces, stages included),
    wait for the idle workers to exit. Returns name -> final state (Success, Failed, or Killed for those that did
    not finish)."""
    status = queue_status(root)
    # a sweep starts only on an idle queue: anything unfinished there is this sweep's (even if interrupted while
    # it was still queueing, before it knew every task)
    tasks = tasks | {rev: task["name"] for rev, task in status.items() if task["status"] not in DONE}
    states = {name: status.get(rev, {}).get("status", "Queued") for rev, name in tasks.items()}
    queued = [name for name, state in states.items() if state == "Queued"]
    if queued:
        _queue_command(root, "remove", *queued)
    running = [name for name, state in states.items() if state not in DONE and name not in queued]
    if running:
        _queue_command(root, "kill", *running)
        end_experiment_processes(root)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            status = queue_status(root)
            if all(status.get(rev, {}).get("status", "Failed") in DONE for rev, n in tasks.items() if n in running):
                break
            time.sleep(1.0)
    # workers exit on their own once the queue stays empty for 10 s (DVC's temporary workers); a `dvc queue stop`
    # sent now would stay in the broker when they have gone, and stop the next sweep's worker after one task
    deadline = time.monotonic() + WORKER_EXIT_S
    while workers_alive(root) and time.monotonic() < deadline:
        time.sleep(1.0)
    return {name: states[name] if states[name] in DONE else "Killed" for name in states}


def experiment_rows(root: Path, names: list[str], baseline: str) -> dict[str, dict[str, Any]]:
    """Name -> flat params and metrics of finished experiments, as `dvc exp show` lists them under their baseline
    commit (which HEAD may have left while they ran)."""
    rows = {}
    presets = {folder.name: group_presets(folder) for folder in sorted((root / "conf").glob("*")) if folder.is_dir()}
    for row in dvc.api.exp_show(repo=str(root), revs=baseline):
        if row.get("Experiment") in names:
            flat = {key.split(":", 1)[-1]: value for key, value in row.items()}
            # a swept config group (`-S method=lora,full`) is shown by its preset's name (`method.name`), or for a
            # group without one (`-S data=company_kb,company_kb_handbook`) by the preset its params hold
            groups = {key.split(".")[0]: value for key, value in flat.items() if key.endswith(".name")}
            groups = {group: name for group, name in groups.items() if "." not in group}
            for group, options in presets.items():
                if group not in groups and (preset := preset_of(options, flat)) is not None:
                    groups[group] = preset
            rows[row["Experiment"]] = groups | flat
    return rows


def group_presets(group: Path) -> dict[str, dict[str, Any]]:
    """Preset name -> its flat values (`data.sources.company_kb.path`...) for a config group folder of conf/."""
    presets = {}
    for path in sorted(group.glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if isinstance(tree, dict):
            presets[path.stem] = flatten({k: v for k, v in tree.items() if k != "defaults"}, f"{group.name}.")
    return presets


def preset_of(presets: dict[str, dict[str, Any]], flat: dict[str, Any]) -> str | None:
    """The preset of a config group whose every value an experiment's flat params hold; the most specific when
    several do (a preset that adds a source to another's), None when none does."""
    matches = [
        (len(values), name)
        for name, values in presets.items()
        if values and all(flat.get(key) == value for key, value in values.items())
    ]
    return max(matches)[1] if matches else None


def schedule_child_runs(experiment_id: str, parent_id: str, names: list[str], baseline: str) -> dict[str, str]:
    """One SCHEDULED MLflow run per queued experiment, nested under the sweep's parent run."""
    client = MlflowClient()
    children = {}
    for name in names:
        tags = {PARENT_TAG: parent_id, EXP_NAME_TAG: name, BASELINE_TAG: baseline, SWEEP_TAG: parent_id}
        run = client.create_run(experiment_id, tags=tags, run_name=name)
        client.update_run(run.info.run_id, status="SCHEDULED")
        children[name] = run.info.run_id
    return children


def close_child_runs(
    children: dict[str, str], states: dict[str, str], rows: dict[str, dict[str, Any]], stopped: str | None = None
) -> None:
    """Children no stage resumed: FAILED for failed experiments; for experiments DVC restored whole from
    its run cache, the restored params and metrics, linked to the run that computed them. After an
    interruption (`stopped`: why), every child whose experiment did not finish is KILLED, with the reason."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    for name, run_id in children.items():
        status = client.get_run(run_id).info.status
        if stopped and states.get(name) == "Killed":  # even if its train stage had finished (and closed the run)
            client.set_tag(run_id, STOPPED_TAG, stopped)
            client.set_terminated(run_id, status="KILLED")
            continue
        if status != "SCHEDULED":
            continue
        if states[name] != "Success" or name not in rows:
            client.set_terminated(run_id, status="FAILED")
            continue
        row = rows[name]
        metrics = [
            Metric(f"test/{k.replace('.', '/')}", float(v), now, 0)
            for k, v in row.items()
            if k.split(".")[0] in ("base", "tuned") and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        params = [Param(k, str(v)) for k, v in row.items() if k.split(".")[0] in CONFIG_SECTIONS]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_tag(run_id, ADAPTER_RUN_TAG, str(row.get("mlflow_run_id")))
        if row.get("verdict.result"):
            client.set_tag(run_id, VERDICT_TAG, str(row["verdict.result"]))
        client.set_tag(run_id, "slmtune.restored_from_run_cache", "true")
        client.set_terminated(run_id, status="FINISHED")


def metric_direction(metric: str, given: str | None) -> str:
    """min or max for the ranking metric: given, or known from the metric registry."""
    known = given or direction(metric)
    if known is None:
        raise ExperimentError(f"metric '{metric}': unknown direction; add --direction min or --direction max")
    return known


def write_sweep_report(config: Config, sweep: SweepOutcome) -> dict[str, Any]:
    """Write `sweep.md` and its plot; return the best experiment's name and metric value."""
    link = os.path.relpath(config.paths.sweep_plot, Path(config.paths.sweep_report).parent)
    with staged_outputs(config.paths.sweep_report, config.paths.sweep_plot) as (report_path, plot_path):
        plot_sweep(plot_path, sweep)
        report_path.write_text(render_sweep_report(sweep, link), encoding="utf-8")
    ranked = sweep.ranked()
    best = ranked[0] if ranked and isinstance(sweep.rows[ranked[0]].get(sweep.metric), (int, float)) else None
    return {"best": best, "best_value": float(sweep.rows[best][sweep.metric]) if best else None}


def run_sweep(root: Path, overrides: list[str], jobs: int, metric: str, direction: str | None) -> int:
    """The `slmtune sweep` command; returns the exit code (1 when any experiment failed)."""
    root = root.resolve()
    os.chdir(root)
    config = load_config()
    order = metric_direction(metric, direction)
    points = check_sweep_inputs(root, config, overrides)
    print(f"sweep: {len(points)} experiments; first the shared stages (`dvc repro {UPSTREAM_TARGET}`)", flush=True)
    try:
        with interruptible():
            _run(["dvc", "repro", UPSTREAM_TARGET], root, capture=False)
    except SweepInterrupted as signalled:
        print(f"error: sweep interrupted by {signalled} before queueing: nothing was queued", file=sys.stderr)
        return 128 + signalled.signum
    check_tracked(root, config)  # a first run writes dvc.lock: the experiments need it to reuse these stages
    baseline = git_state(root)["commit"]
    experiment_id = open_store(config.tracking)
    tasks: dict[str, str] = {}
    children: dict[str, str] = {}
    stopped = None
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep {' '.join(overrides)}"[:250]) as parent:
        mlflow.set_tags({SWEEP_TAG: "parent", BASELINE_TAG: baseline})
        mlflow.log_params(
            {
                "sweep.overrides": " ".join(overrides)[:6000],
                "sweep.metric": metric,
                "sweep.direction": order,
                "sweep.jobs": jobs,
                "sweep.size": len(points),
            }
        )
        try:
            with interruptible():
                tasks = queue_experiments(root, overrides)
                children = schedule_child_runs(experiment_id, parent.info.run_id, list(tasks.values()), baseline)
                print(f"queued {', '.join(tasks.values())}; MLflow parent run {parent.info.run_id}", flush=True)
                start_workers(root, jobs)
                states = wait_for(root, tasks)
        except SweepInterrupted as signalled:
            signum = signalled.signum
            with uninterrupted():
                stopped = f"sweep interrupted by {signalled}"
                print(f"{stopped}: stopping its experiments and the queue workers", flush=True)
                states = stop_queue(root, tasks)
                missing = [name for name in tasks.values() if name not in children]  # stopped while scheduling
                children |= schedule_child_runs(experiment_id, parent.info.run_id, missing, baseline)
        with uninterrupted() if stopped else contextlib.nullcontext():
            rows = experiment_rows(root, [name for name, state in states.items() if state == "Success"], baseline)
            close_child_runs(children, states, rows, stopped)
            outcome = SweepOutcome(
                rows, states, children, swept_keys(overrides), metric, order, parent.info.run_id, stopped
            )
            summary = write_sweep_report(config, outcome)
            mlflow.log_artifact(config.paths.sweep_report, "sweep")
            mlflow.log_artifact(config.paths.sweep_plot, "sweep")
            if summary["best"]:
                mlflow.set_tag("slmtune.best_exp", summary["best"])
                mlflow.log_metric(f"best/{metric}", summary["best_value"])
            if stopped:
                mlflow.set_tag(STOPPED_TAG, stopped)
                mlflow.end_run(status="KILLED")
    print(f"wrote {config.paths.sweep_report} and {config.paths.sweep_plot}; best: {summary['best']}", flush=True)
    if stopped:
        finished = sum(state == "Success" for state in states.values())
        print(
            f"error: {stopped}: {finished} of {len(states)} experiment(s) finished; run the same command again to "
            "finish the others (finished ones are restored from DVC's run cache, not trained again)",
            file=sys.stderr,
        )
        return 128 + signum
    failed = [name for name, state in states.items() if state != "Success"]
    if failed:
        print(
            f"error: {len(failed)} experiment(s) failed: {', '.join(failed)}; see `dvc queue logs <name>`",
            file=sys.stderr,
        )
        return 1
    return 0


def find_exp_ref(root: Path, name: str) -> str | None:
    """The git ref DVC keeps an experiment under (`refs/exps/<baseline>/<name>`), if this clone has it."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], root).stdout.split()
    return next((ref for ref in refs if ref.rsplit("/", 1)[-1] == name), None)


def reproduction_plan(root: Path, config: Config, run_id: str) -> dict[str, Any]:
    """What an MLflow run was made from and the commands that make it again."""
    open_store(config.tracking)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ExperimentError(
            f"MLflow run '{run_id}' not found in {config.tracking.tracking_uri or 'mlflow.db'}"
        ) from None
    tags = run.data.tags
    if "mlflow.source.git.commit" not in tags and ADAPTER_RUN_TAG not in tags:
        raise ExperimentError(
            f"MLflow run '{run_id}' was not made by the pipeline (no commit or adapter tag); give a train or evaluate "
            "run id"
        )
    name = tags.get(EXP_NAME_TAG, "workspace")
    commit = tags.get("mlflow.source.git.commit") or tags.get(BASELINE_TAG)
    ref = find_exp_ref(root, name) if name != "workspace" else None
    adapter_run = tags.get(ADAPTER_RUN_TAG, run_id)
    adapter_tags = tags if adapter_run == run_id else _run_tags(adapter_run)
    commands = (
        [f"dvc exp apply {name}", "dvc repro --force"] if ref else [f"git checkout {commit}", "dvc repro --force"]
    )
    return {
        "run_id": run_id,
        "adapter_run_id": adapter_run,
        "exp_name": name,
        "exp_ref": ref,
        "baseline": tags.get(BASELINE_TAG),
        "commit": commit,
        "metrics": {
            k: v for k, v in run.data.metrics.items() if k.startswith("test/") and k.count("/") == 2
        },  # not per category
        "threads": adapter_tags.get(THREADS_TAG),
        "uncommitted": [f for f in adapter_tags.get(DIRTY_FILES_TAG, "").split() if f not in EXPERIMENT_FILES],
        "commands": commands,
    }


def _run_tags(run_id: str) -> dict[str, str]:
    """A run's tags; none when the run is not in this store (an adapter restored from elsewhere)."""
    try:
        return MlflowClient().get_run(run_id).data.tags
    except MlflowException:
        return {}


def print_plan(plan: dict[str, Any]) -> None:
    print(
        f"MLflow run {plan['run_id']}: DVC experiment '{plan['exp_name']}', baseline {plan['baseline']}, code "
        f"{plan['commit']}"
    )
    if plan["exp_ref"]:
        print(f"experiment ref: {plan['exp_ref']}")
    if plan["uncommitted"]:
        print(
            f"warning: the run's code had uncommitted changes ({', '.join(plan['uncommitted'])}): "
            "a reproduction from the commit may differ"
        )
    print("reproduce in this workspace (replaces its params and outputs):")
    for command in plan["commands"]:
        print(f"  {command}")
    print(f"or in a throwaway git worktree, comparing the metrics:\n  slmtune reproduce {plan['run_id']} --run")


def reproduce_run(root: Path, config: Config, plan: dict[str, Any], keep: bool = False) -> int:
    """Check out the run's commit in a temporary worktree, write the run's resolved config as its
    params.yaml, run the whole pipeline there (own cache: nothing reused) and compare the test metrics."""
    resolved_path = download_artifacts(run_id=plan["run_id"], artifact_path="config/resolved.yaml")
    resolved = yaml.safe_load(Path(resolved_path).read_text(encoding="utf-8"))
    resolved["tracking"]["tracking_uri"] = resolved["tracking"]["tracking_uri"] or tracking_uri(config.tracking, root)
    workdir = Path(tempfile.mkdtemp(prefix="slmtune-reproduce-"))
    _run(["git", "worktree", "add", "--detach", str(workdir), plan["commit"]], root)
    try:
        (workdir / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(workdir / "src"), SLMTUNE_REPRODUCES=plan["run_id"])
        if plan["threads"]:
            env["OMP_NUM_THREADS"] = plan["threads"]  # as many as the original run used
        env.pop("DVC_ROOT", None)
        print(f"reproducing in {workdir}: dvc repro", flush=True)
        _run(["dvc", "repro"], workdir, env=env, capture=False)
        new = json.loads((workdir / resolved["paths"]["metrics"]).read_text(encoding="utf-8"))
        weights = compare_adapter_weights(plan, workdir / resolved["paths"]["adapter"])
    finally:
        if not keep:
            _run(["git", "worktree", "remove", "--force", str(workdir)], root)
    return max(compare_metrics(plan["metrics"], new), weights)


def compare_adapter_weights(plan: dict[str, Any], adapter_dir: Path) -> int:
    """md5 of the reproduced adapter weights (the whole model's after full fine-tuning) against those the
    original run logged; 0 when equal."""
    weights = (
        "adapter_model.safetensors" if (adapter_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    )
    recorded = file_md5(download_artifacts(run_id=plan["adapter_run_id"], artifact_path=f"adapter/{weights}"))
    again = file_md5(adapter_dir / weights)
    print(f"{'MATCH' if recorded == again else 'MISMATCH':9} {weights:28} recorded {recorded}  reproduced {again}")
    return 0 if recorded == again else 1


def compare_metrics(recorded: dict[str, float], reproduced: dict[str, Any]) -> int:
    """Print recorded vs reproduced test metrics; 0 when all agree within METRICS_TOLERANCE."""
    mismatches = 0
    for key, value in sorted(recorded.items()):
        _, model, name = key.split("/", 2)
        again = reproduced.get(model, {}).get(name)
        same = again is not None and abs(again - value) <= METRICS_TOLERANCE * max(1.0, abs(value))
        mismatches += not same
        print(
            f"{'MATCH' if same else 'MISMATCH':9} {key:28} recorded {value:.8g}  reproduced "
            f"{again if again is None else format(again, '.8g')}"
        )
    print("reproduction: " + ("MATCH" if not mismatches else f"MISMATCH in {mismatches} metric(s)"))
    return 1 if mismatches or not recorded else 0


def reproduce(root: Path, run_id: str, run: bool, keep: bool) -> int:
    """The `slmtune reproduce` command: print the plan; with `run`, carry it out and compare (exit 1 on a
    mismatch)."""
    root = root.resolve()
    os.chdir(root)
    config = load_config()
    plan = reproduction_plan(root, config, run_id)
    print_plan(plan)
    return reproduce_run(root, config, plan, keep=keep) if run else 0
