"""MLflow tracking: one run per pipeline execution, tagged with its DVC experiment.

`train` opens the run (or resumes the one a sweep scheduled for its experiment); `evaluate` logs into
that run when it belongs to the same execution, otherwise into a run of its own linked to the
adapter's run; `report` follows `evaluate`. The embedded store is a SQLite file at the real project
root, shared safely by parallel DVC queue workers (a file lock around its creation, a busy timeout).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
from filelock import FileLock
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import Config, ModelConfig, TrackingConfig, data_name, flatten, planned_epochs
from .errors import MissingFileError, TrackingStoreError
from .lineage import final_adapter, git_state, project_root

MLFLOW_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
STORE_LOCK = "mlflow.db.lock"
SQLITE_TIMEOUT_S = 120
"""How long a writer waits for another process's SQLite write lock (parallel sweep workers)."""
MAX_PARAM_LENGTH = 6000
WORKSPACE = "workspace"

EXP_NAME_TAG = "slmtune.dvc_exp_name"
BASELINE_TAG = "slmtune.dvc_baseline_rev"
PARENT_TAG = "mlflow.parentRunId"
ADAPTER_RUN_TAG = "slmtune.adapter_run_id"
SWEEP_TAG = "slmtune.sweep"
REPRODUCES_TAG = "slmtune.reproduces"
THREADS_TAG = "slmtune.torch_threads"
DIRTY_FILES_TAG = "slmtune.git_dirty_files"
DIRTY_TAG = "slmtune.git_dirty"
STAGE_TAG = "slmtune.stage"
SFT_RUN_TAG = "slmtune.sft_run_id"
"""On an align run: the run that trained the SFT adapter it started from."""
ALIGNED_RUN_TAG = "slmtune.aligned_run_id"
"""On a train run: the align run that preference-tuned its adapter."""
REGISTERED_TAG = "slmtune.registered_model"
VERDICT_TAG = "slmtune.verdict"
"""better, worse or unchanged against the base on the test split (the run that was evaluated)."""
VERDICT_TEXT_TAG = "slmtune.verdict_text"
"""The verdict's sentence, as the report opens with it."""
EVALUATED_METRIC = "test/tuned/loss"


def tracking_uri(tracking: TrackingConfig, root: Path | None = None) -> str:
    """The configured URI, or a SQLite file at the real project root (also from `dvc exp` temp dirs)."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    return f"sqlite:///{(root or project_root()) / MLFLOW_DB}?timeout={SQLITE_TIMEOUT_S}"


PROBE_TIMEOUT_S = 10
"""How long the check before training waits for a tracking server (one try: MLflow's own client retries
for minutes)."""


def check_tracking_store(tracking: TrackingConfig) -> None:
    """Fail fast, in one line, when the tracking store cannot be used: a server that does not answer within
    PROBE_TIMEOUT_S (one request, no retries), or a local store whose folder cannot be written."""
    uri = tracking_uri(tracking)
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S))
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # connection refused, timeout, DNS, HTTP errors: all mean "cannot use it"
            reason = " ".join(str(exc).split())[:200]
            raise TrackingStoreError(
                f"tracking.tracking_uri {uri}: the MLflow server does not answer ({reason}); start it, fix the URI, "
                "or set tracking.tracking_uri=null for the embedded store"
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    elif scheme in ("sqlite", "file"):
        path = Path(uri.split("?", 1)[0].split(":///", 1)[-1] if scheme == "sqlite" else uri[len("file://") :])
        folder = path.parent if scheme == "sqlite" else path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise TrackingStoreError(f"tracking store {uri}: {folder} is not writable; fix its permissions or the URI")


def experiment_tags() -> dict[str, str]:
    """The DVC experiment this process runs in (`workspace` for plain `dvc repro`) and its baseline commit."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV") or git_state(project_root())["commit"] or "unknown"
    tags = {EXP_NAME_TAG: os.environ.get("DVC_EXP_NAME") or WORKSPACE, BASELINE_TAG: baseline}
    if os.environ.get("SLMTUNE_REPRODUCES"):
        tags[REPRODUCES_TAG] = os.environ["SLMTUNE_REPRODUCES"]  # set by `slmtune reproduce --run`
    return tags


def store_lock(tracking: TrackingConfig) -> Any:
    """A file lock beside the embedded SQLite store (no-op for a tracking server).

    MLflow creates its schema, experiments and dataset records by check-then-insert: two processes
    doing it at once fail (`duplicate column name`, `UNIQUE constraint failed`), so they take turns.
    """
    return nullcontext() if tracking.tracking_uri else FileLock(str(project_root() / STORE_LOCK))


def open_store(tracking: TrackingConfig) -> str:
    """Point MLflow at the store and return the experiment id, creating both if needed."""

    root = project_root()
    mlflow.set_tracking_uri(tracking_uri(tracking, root))
    with store_lock(tracking):
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = None if tracking.tracking_uri else (root / ARTIFACTS_DIR).as_uri()
        return mlflow.create_experiment(tracking.experiment, artifact_location=location)


def scheduled_run_id(experiment_id: str, tags: dict[str, str]) -> str | None:
    """The run a sweep created ahead for this DVC experiment and that no stage has started yet."""
    if tags[EXP_NAME_TAG] == WORKSPACE:
        return None
    query = (
        f"tags.`{EXP_NAME_TAG}` = '{tags[EXP_NAME_TAG]}' and tags.`{BASELINE_TAG}` = '{tags[BASELINE_TAG]}' "
        "and attributes.status = 'SCHEDULED'"
    )
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def awaits_evaluation(run_id: str) -> bool:
    """Whether this train run is in the store and `evaluate` has not logged into it yet.

    A run restored with its adapter from DVC's cache was evaluated already, or lives in another store.
    """
    try:
        return EVALUATED_METRIC not in MlflowClient().get_run(run_id).data.metrics
    except MlflowException:
        return False


@contextmanager
def mlflow_run(
    tracking: TrackingConfig,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Open a new run (or resume `run_id`); the run is closed, as FAILED on error, whatever happens."""

    experiment_id = open_store(tracking)
    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:
            raise TrackingStoreError(
                f"MLflow run {run_id} is not in the tracking store {mlflow.get_tracking_uri()}: the outputs naming it "
                "came from another store (another clone or machine). Run `dvc repro -f evaluate` here, or set "
                "tracking.tracking_uri to the store that has it."
            ) from None
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name,
        tags=tags,
        log_system_metrics=system_metrics and tracking.log_system_metrics,
    ) as run:
        yield run


def run_record(run: Any) -> dict[str, str]:
    """What provenance records of the run that made an adapter: its id, experiment and store."""
    info = run.info
    return {"run_id": info.run_id, "experiment_id": info.experiment_id, "tracking_uri": mlflow.get_tracking_uri()}


def run_name(config: Config, exp_name: str = WORKSPACE) -> str:
    """What a run is, for the MLflow run list: the DVC experiment (outside the workspace), the data, the method
    and the settings people sweep, e.g. `company_kb · lora r16 · lr 0.001 · 6 epochs`."""
    method = config.method
    train = config.train
    described = method.name + (f" r{method.r}" if method.adapter == "lora" else "")
    epochs = train.epochs if train.epochs is not None else planned_epochs(config)
    length = f"{train.max_steps} steps" if train.max_steps > 0 else f"{epochs:g} epochs" if epochs else "auto epochs"
    name = f"{data_name(config.data)} · {described} · lr {train.learning_rate:g} · {length}"
    if config.model.source != ModelConfig.source:  # the shipped default goes without saying
        name = f"{Path(config.model.source).name} · {name}"
    return name if exp_name == WORKSPACE else f"{exp_name}: {name}"


@contextmanager
def pipeline_run(
    tracking: TrackingConfig,
    stage: str,
    system_metrics: bool = False,
    resume_run_id: str | None = None,
    config: Config | None = None,
) -> Iterator[Any]:
    """The run of this pipeline execution for `train`: the interrupted run it resumes, the sweep's
    scheduled run, else a new one (named by `run_name`)."""
    tags = experiment_tags()
    run_id = resume_run_id or scheduled_run_id(open_store(tracking), tags)
    name = run_name(config, tags[EXP_NAME_TAG]) if config else tags[EXP_NAME_TAG]
    with mlflow_run(
        tracking, run_id=run_id, run_name=name, tags=tags | {STAGE_TAG: stage}, system_metrics=system_metrics
    ) as run:
        if run_id:  # a sweep's scheduled run (named by its experiment) or a resumed one: the settings join the name
            mlflow.set_tag("mlflow.runName", name)
        yield run


def training_run(tracking: TrackingConfig, run_id: str) -> Any:
    """The training run `run_id` when it is in this tracking store, else None."""
    open_store(tracking)
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        return None


@contextmanager
def evaluation_run(tracking: TrackingConfig, adapter_run_id: str, config: dict[str, Any]) -> Iterator[Any]:
    """The run `evaluate` logs into.

    The adapter's run when training happened in this same execution (it has no test metrics yet);
    otherwise (train was restored from the cache) the sweep's scheduled run or a new run, tagged with
    the adapter's run id and given the full config so that it compares with the rest.
    """

    tags = experiment_tags()
    experiment_id = open_store(tracking)
    if awaits_evaluation(adapter_run_id):
        with mlflow_run(tracking, run_id=adapter_run_id) as run:
            yield run
        return
    run_id = scheduled_run_id(experiment_id, tags)
    name = tags[EXP_NAME_TAG] if tags[EXP_NAME_TAG] != WORKSPACE else "evaluate"
    with mlflow_run(tracking, run_id=run_id, run_name=name, tags=tags | {ADAPTER_RUN_TAG: adapter_run_id}) as run:
        log_flat_params(config)
        mlflow.log_dict(config, "config/resolved.yaml")
        yield run


SUMMARY_METRICS = {
    "train_loss": "train/mean_loss",
    "val_loss": "loss/val",
    "train_runtime_s": "train/runtime_s",
    "tokens_per_second": "train/tokens_per_second",
}
"""The training summary's figures and their MLflow names (`loss/val` continues the per-step validation curve)."""
RUN_FACTS = ("padding_free", "bf16", "gradient_checkpointing", "processes", "sharded")
"""How the run trained: facts, logged as `slmtune.` tags rather than one-bar metric charts."""


def log_training_summary(metrics: dict[str, float]) -> None:
    """The end-of-training figures, one MLflow name each: losses and speed as metrics (at the last step),
    memory peaks under memory/, how it trained as tags."""
    step = int(metrics.get("steps", 0))
    figures = {name: metrics[key] for key, name in SUMMARY_METRICS.items() if key in metrics}
    figures |= {k: v for k, v in metrics.items() if k.startswith("memory/")}
    mlflow.log_metrics(figures, step=step)
    # 1 / 0; gradient_checkpointing under `auto` may be a share of the micro-batches
    mlflow.set_tags({f"slmtune.{k}": f"{metrics[k]:.3g}" for k in RUN_FACTS if k in metrics})


def log_flat_params(config: dict[str, Any]) -> None:
    """Log a nested config as `a.b.c` params (long values are cut to MLflow's limit)."""

    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(config).items()}
    mlflow.log_params(params)


def log_datasets(tracking: TrackingConfig, digests: dict[str, dict[str, Any]]) -> None:
    """Record each data and model input with its DVC md5 (a hub dataset: its revision) as the digest."""
    with store_lock(tracking):
        for name, entry in digests.items():
            with warnings.catch_warnings():  # MLflow registers its local source twice and calls the path ambiguous
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                source = resolve_dataset_source(str(Path(entry["path"]).resolve()))
            digest = entry["md5"] or f"revision:{entry['revision']}"
            context = "model" if name == "base_model" else "train"
            mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context=context)


def data_figures(config: Config) -> dict[str, Any]:
    """The data report's figures (rows, examples, tokens, trained share, lengths, drops) by split, flat."""
    data_stats = json.loads(Path(config.paths.data_stats).read_text(encoding="utf-8"))
    token_stats = json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))
    figures: dict[str, Any] = {f"data_stats.rows.{split}": n for split, n in data_stats["rows"].items()}
    for split, stats in token_stats["splits"].items():
        figures[f"data_stats.examples.{split}"] = stats["examples"]
        figures[f"data_stats.tokens.{split}"] = stats["tokens"]
        figures[f"data_stats.trained_share.{split}"] = stats["trained_share"]
        figures[f"data_stats.length_p95.{split}"] = stats["length"]["p95"]
        figures[f"data_stats.length_max.{split}"] = stats["length"]["max"]
        figures[f"data_stats.truncated.{split}"] = stats["truncated"]
    figures["data_stats.max_length"] = token_stats["max_length"]
    augment = Path(config.paths.augment_stats)
    if augment.is_file():  # what knowledge augmentation added to the training split
        stats = json.loads(augment.read_text(encoding="utf-8"))
        figures["data_stats.augment.generator"] = stats["generator"]
        figures["data_stats.augment.generated"] = stats["generated"]
        figures.update({f"data_stats.augment.{kind}": n for kind, n in stats["by_kind"].items()})
        figures["data_stats.augment.dropped_leaks"] = stats.get("dropped_leaks", 0)
        figures["data_stats.augment.dropped_ambiguous"] = stats.get("dropped_ambiguous", 0)
    for reason, count in (data_stats["dropped"] | token_stats["dropped"]).items():
        figures[f"data_stats.dropped.{reason.replace(' ', '_')}"] = count
    return figures


def log_data_figures(config: Config) -> None:
    """The data report's figures as MLflow params (constants of the run, not curves: each would be a one-bar
    chart among the metrics), with the report, its histogram and the stats files as artifacts."""
    mlflow.log_params(data_figures(config))
    paths = config.paths
    for path in (paths.length_plot, paths.data_stats, paths.token_stats, paths.augment_stats):
        if Path(path).is_file():
            mlflow.log_artifact(path, "data")
    log_markdown(config.tracking, Path(config.paths.data_report), "data", {config.paths.length_plot: "data"})


def artifact_url(tracking: TrackingConfig, run_id: str, artifact_path: str) -> str:
    """An absolute URL that serves a run's artifact: the tracking server's, or `tracking.ui_url` for the embedded
    store (where `mlflow ui` serves it)."""
    uri = tracking_uri(tracking)
    server = uri if uri.split(":", 1)[0].lower() in ("http", "https") else tracking.ui_url
    return f"{server.rstrip('/')}/get-artifact?path={quote(artifact_path, safe='')}&run_uuid={run_id}"


def log_markdown(
    tracking: TrackingConfig, report: Path, folder: str, images: dict[str, str], final: Path | None = None
) -> None:
    """Log a markdown report to the active run, its image links (`images`: local path -> artifact folder, each
    logged there) made absolute artifact URLs: MLflow's markdown viewer shows no relative or data: image, so
    the copy in MLflow links the run's own artifacts; the local file keeps its relative links. `final`: where
    the report will live when `report` is a staged copy (its links are relative to that)."""
    run_id = mlflow.active_run().info.run_id
    text = report.read_text(encoding="utf-8")
    for path, image_folder in images.items():
        relative = os.path.relpath(path, (final or report).parent)
        url = artifact_url(tracking, run_id, f"{image_folder}/{Path(path).name}")
        text = text.replace(f"]({relative})", f"]({url})")
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / report.name
        copy.write_text(text, encoding="utf-8")
        mlflow.log_artifact(str(copy), folder)


def resolve_adapter(config: Config, spec: str | None) -> Path:
    """The adapter folder `spec` names: None -> the pipeline's final one (the aligned adapter when the align stage
    trained one, else paths.adapter); an existing folder;
    else an MLflow run id whose `adapter/` artifacts are downloaded (train runs log them)."""
    if spec is None:
        spec = str(final_adapter(config.paths))
    if Path(spec).is_dir():
        if not (Path(spec) / "adapter_config.json").is_file() and not (Path(spec) / "config.json").is_file():
            raise MissingFileError(
                f"{spec}: neither a peft adapter (adapter_config.json) nor a model folder (config.json)."
            )
        return Path(spec)
    if os.sep in spec or spec.startswith("."):
        raise MissingFileError(
            f"{spec}: no such folder. Run `dvc repro` to train an adapter, or pass an MLflow run id."
        )
    mlflow.set_tracking_uri(tracking_uri(config.tracking))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=spec, artifact_path="adapter"))
    except (MlflowException, OSError) as exc:
        raise MissingFileError(
            f"{spec}: not a folder, and no MLflow run with an adapter/ artifact at "
            f"{mlflow.get_tracking_uri()} ({str(exc).splitlines()[0]})."
        ) from None
