"""Training led by the validation loss: the weights of the evaluation with the lowest validation loss are kept
(the base's, evaluated before the first step, included) and published instead of the last step's, and training
stops once the validation loss has stopped improving.

transformers' own `load_best_model_at_end` + `EarlyStoppingCallback` do this through checkpoints: they need a
whole checkpoint (weights and optimizer states, 16 bytes a trained parameter) written at every evaluation, tie
`save_steps` to `eval_steps`, and cannot go back to the base. Here the best trained weights are kept in memory
(4 bytes a trained parameter) and written into each resume checkpoint, so a resumed run keeps them too; above
`KEEP_IN_MEMORY_BYTES` (full fine-tuning: 540 MB for a 135M model, on top of weights, gradients and optimizer
states) they are kept in a file beside the checkpoints instead, so that selecting the best does not raise the peak."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .outputs import write_json

BEST_WEIGHTS = "slmtune-best.safetensors"
"""In a checkpoint folder: the trained weights of the best evaluation so far (when selecting the best)."""
BEST_STATE = "slmtune-best.json"
"""In a checkpoint folder: the best validation loss so far, its step and the evaluations since."""
KEEP_IN_MEMORY_BYTES = 256 * 2**20
"""Best weights up to this size are copied in memory; larger ones are written to `BEST_WEIGHTS` in the trainer's
output folder (one process only: with several, each keeps its own in memory)."""


class ValidationLed(TrainerCallback):
    """Watches every validation loss: keeps a copy of the trained weights at each new best (`select_best`),
    stops training after `patience` evaluations in a row without a drop of more than `threshold` (0: never),
    and at the end of training puts the best weights back."""

    def __init__(self, model: Any, select_best: bool, patience: int, threshold: float = 0.0) -> None:
        self.model = model
        self.select_best = select_best
        self.patience = patience
        self.threshold = threshold
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.since_best = 0
        self.stopped_early = False
        self.weights: dict[str, torch.Tensor] | None = None
        self.weights_file: Path | None = None
        """The best weights when they are kept in a file instead of `weights`."""

    def _trained(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        enough = loss < self.best_loss - self.threshold
        if loss < self.best_loss:
            self.best_loss, self.best_step = float(loss), state.global_step
            if self.select_best:
                self._keep(args)
        self.since_best = 0 if enough else self.since_best + 1
        if self.patience and self.since_best >= self.patience and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_early = True

    def _keep(self, args: Any) -> None:
        """A copy of the trained weights as the best so far: in memory, or in a file when large."""
        trained = self._trained()
        size = sum(p.numel() * p.element_size() for p in trained.values())
        if size <= KEEP_IN_MEMORY_BYTES or getattr(args, "world_size", 1) > 1:
            self.weights = {name: p.detach().to("cpu", copy=True) for name, p in trained.items()}
            return
        path = Path(args.output_dir) / BEST_WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({name: p.detach().contiguous() for name, p in trained.items()}, str(partial))
        os.replace(partial, path)  # a new file: a checkpoint's link to the previous best keeps its bytes
        self.weights, self.weights_file = None, path

    def has_best(self) -> bool:
        return self.weights is not None or self.weights_file is not None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The last step is always evaluated: its weights are candidates too."""
        if state.global_step >= state.max_steps:
            control.should_evaluate = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Into the checkpoint just written (before it is sealed): the best so far, for a resumed run."""
        if not state.is_world_process_zero or self.best_step is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.weights is not None:
            save_file({name: t.contiguous() for name, t in self.weights.items()}, str(folder / BEST_WEIGHTS))
        elif self.weights_file is not None:
            _link_or_copy(self.weights_file, folder / BEST_WEIGHTS)
        state_file = folder / BEST_STATE
        write_json(state_file, {"loss": self.best_loss, "step": self.best_step, "since_best": self.since_best})

    def restore(self, checkpoint: str | Path) -> None:
        """The best so far of the run being resumed from `checkpoint`."""
        folder = Path(checkpoint)
        if not (folder / BEST_STATE).is_file():
            return
        saved = json.loads((folder / BEST_STATE).read_text(encoding="utf-8"))
        self.best_loss, self.best_step, self.since_best = saved["loss"], saved["step"], saved["since_best"]
        saved_weights = folder / BEST_WEIGHTS
        if not (self.select_best and saved_weights.is_file()):
            return
        if saved_weights.stat().st_size <= KEEP_IN_MEMORY_BYTES:
            self.weights = load_file(str(saved_weights))
        else:
            self.weights_file = folder.parent / BEST_WEIGHTS
            _link_or_copy(saved_weights, self.weights_file)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.has_best() or self.best_step == state.global_step:
            self._drop_file()
            return
        trained = self._trained()
        with torch.no_grad():
            if self.weights is not None:
                for name, value in self.weights.items():
                    trained[name].copy_(value.to(trained[name].device))
            else:  # one tensor at a time: no second whole copy in memory
                with safe_open(str(self.weights_file), framework="pt") as saved:
                    for name in saved.keys():
                        trained[name].copy_(saved.get_tensor(name).to(trained[name].device))
        self._drop_file()

    def _drop_file(self) -> None:
        """The file copy is the trainer's scratch: its checkpoints hold their own."""
        if self.weights_file is not None:
            self.weights_file.unlink(missing_ok=True)

    def published_step(self, last_step: int) -> int:
        """The step whose weights training ends with."""
        return self.best_step if self.has_best() and self.best_step is not None else last_step


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` with `source`'s bytes: a hard link where the file system allows (the source is only ever
    replaced, never written in place), else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
