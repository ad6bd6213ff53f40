"""Cross-entropy only where labels are trained, never over every position of a batch.

The model's head runs only on the positions whose next token is trained (transformers' boolean `logits_to_keep`:
prompt, padding and separator positions never reach the vocabulary projection), and the softmax runs in fp32 one
chunk of positions at a time, recomputed in the backward pass, so that no fp32 [positions x vocabulary] tensor
larger than one chunk exists. With 49k-token vocabularies the full-logits path is what dominates memory on long
examples. Used for the training step, the Trainer's validation loss and the evaluate stage's test losses.

Liger Kernel and Cut Cross-Entropy fuse the head with the loss as well, but run on GPUs (Triton) only; this path
runs everywhere and needs nothing beyond transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from .prompting import IGNORE_INDEX

CHUNK_POSITIONS = 1024
"""Positions per fp32 softmax chunk: 1024 x 49k vocabulary = 200 MB."""


def supports_trained_positions(model: Any) -> bool:
    """Whether the model's forward can keep the logits of a boolean mask of positions (transformers'
    `slice_logits_to_keep`); models without it take the Trainer's usual path."""
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = type(base).forward
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return False
    try:
        return "slice_logits_to_keep" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the positions whose next token is trained, the trained next tokens in that order)."""
    targets = labels[..., 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[..., :-1] = targets != IGNORE_INDEX
    return keep, targets[targets != IGNORE_INDEX]


def _fp32_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(logits.float(), targets, reduction="none")


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """Per-position fp32 cross-entropy of [n, vocabulary] logits, `chunk` positions at a time; in training each
    chunk's fp32 softmax is recomputed in the backward pass instead of kept."""
    if not len(targets):
        return logits.sum(dim=-1).float() * 0.0  # keeps the graph: a batch with nothing to train gives zero loss
    pieces = []
    for part, target in zip(logits.split(chunk), targets.split(chunk)):
        if part.requires_grad:
            pieces.append(checkpoint(_fp32_cross_entropy, part, target, use_reentrant=False))
        else:
            pieces.append(_fp32_cross_entropy(part, target))
    return torch.cat(pieces)


def trained_token_losses(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cross-entropy on every trained token of a causal-LM batch (in the flattened order of the
    mask), and the mask of the positions that predict them."""
    keep, targets = trained_positions(inputs["labels"])
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**forward, logits_to_keep=keep, use_cache=False).logits
    if logits.dim() != 2 or logits.shape[0] != len(targets):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for {len(targets)} kept positions; "
            "it does not slice its head with a boolean logits_to_keep."
        )
    return chunked_cross_entropy(logits, targets), keep
