"""Publishing a trained adapter (or fully fine-tuned model) to the Hugging Face Hub (`train.push_to_hub`)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token

from .config import Config
from .errors import ConfigError


def check_hub_push(config: Config) -> None:
    """With `train.push_to_hub`, fail before any training when the upload could not happen: the hub is
    offline or there is no token."""
    if not config.train.push_to_hub:
        return
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise ConfigError(
            "params.yaml: train.push_to_hub=true but the Hugging Face Hub is offline (HF_HUB_OFFLINE=1), "
            "so nothing was trained. Go online (HF_HUB_OFFLINE=0) and log in (`hf auth login`), or set "
            "train.push_to_hub=false."
        )
    if not get_token():
        raise ConfigError(
            "params.yaml: train.push_to_hub=true but no Hugging Face token is set, so nothing was trained. "
            "Log in with `hf auth login` (or set HF_TOKEN), or set train.push_to_hub=false."
        )


def push_to_hub(config: Config, folder: Path, run_id: str) -> str:
    """Upload the adapter folder to `train.hub_model_id` (a private repository when it is created); return its URL."""
    api = HfApi()
    repo = api.create_repo(config.train.hub_model_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo.repo_id, commit_message=f"slmtune: MLflow run {run_id}")
    print(f"pushed {folder} to {repo}", flush=True)
    return str(repo)
