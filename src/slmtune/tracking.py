"""MLflow tracking: one run per pipeline execution, opened by `train`, resumed by later stages."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import TrackingConfig, flatten
from .lineage import project_root

MLFLOW_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_LENGTH = 6000


def tracking_uri(tracking: TrackingConfig, root: Path | None = None) -> str:
    """The configured URI, or a SQLite file at the real project root (also from `dvc exp` temp dirs)."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    return f"sqlite:///{(root or project_root()) / MLFLOW_DB}"


def _experiment_id(tracking: TrackingConfig, root: Path | None) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if tracking.tracking_uri else ((root or project_root()) / ARTIFACTS_DIR).as_uri()
    return mlflow.create_experiment(tracking.experiment, artifact_location=location)


@contextmanager
def mlflow_run(
    tracking: TrackingConfig, run_id: str | None = None, run_name: str | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Open a new run (or resume `run_id`); the run is closed, as FAILED on error, whatever happens."""
    import mlflow

    root = project_root()
    mlflow.set_tracking_uri(tracking_uri(tracking, root))
    experiment_id = None if run_id else _experiment_id(tracking, root)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=run_name,
        log_system_metrics=system_metrics and tracking.log_system_metrics,
    ) as run:
        yield run


def log_flat_params(config: dict[str, Any]) -> None:
    """Log a nested config as `a.b.c` params (long values are cut to MLflow's limit)."""
    import mlflow

    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(config).items()}
    mlflow.log_params(params)


def log_dataset(path: str | Path, digest: str, name: str, context: str) -> None:
    """Record a dataset input with its DVC md5 as the digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context=context)
