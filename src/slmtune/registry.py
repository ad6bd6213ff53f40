"""The tuned model as an MLflow model, registered: the Models page lists every trained version, each linked to
its training run, and `mlflow.pyfunc.load_model("models:/<name>/<version>")` answers prompts with it.

The pyfunc (`mlflow_model.py`, logged as models-from-code) holds the adapter (or the fully fine-tuned model) and
this package's code; the base weights are not copied (hundreds of MB per version): loading materialises them from
the recorded `model.source`. The stage imports only this module, so training does not depend on the inference
code the pyfunc runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from .config import data_name
from .lineage import package_versions

MODEL_FILE = Path(__file__).with_name("mlflow_model.py")
MODEL_NAME = "model"
"""The model's name inside its training run (`runs:/<id>/model`)."""


def registered_name(config: Any) -> str:
    """`tracking.registered_model`, or `<experiment>-<data sources>` (those it learns from)."""
    return config.tracking.registered_model or f"{config.tracking.experiment}-{data_name(config.data)}"


RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "gguf", "omegaconf", "mlflow")
"""What loading and running the pyfunc needs (this package's own code travels with the model)."""


def log_tuned_model(config: Any, adapter_dir: Path) -> str | None:
    """Log the adapter as an MLflow pyfunc model in the active run and register it; returns the registered
    version (None when registration is off or the task is not causal LM)."""
    if not config.tracking.register_model or config.model.task != "causal_lm":
        return None
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(MODEL_FILE),  # models from code, not a pickled object
        artifacts={"adapter": str(adapter_dir)},
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=[f"{name}=={version}" for name, version in package_versions(RUNTIME_PACKAGES).items()],
        registered_model_name=registered_name(config),
    )
    return str(info.registered_model_version)  # MLflow prints the name and version
