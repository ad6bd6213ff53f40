"""Padding-free attention without a varlen kernel: a padding-free row holds several examples back to back (position
ids restart at 0 for each). transformers keeps them apart with a block-diagonal mask, so SDPA computes the whole
row x row score matrix, quadratic in the row's length, although each example only attends to itself. On GPUs
flash-attention's varlen kernel does the per-example work (without it, training pads batches on a GPU: see
`training.padding_free`); on CPUs this attention runs SDPA once per example of the row, causal and without a mask,
so its cost is the sum of the examples' own squares.
Registered with transformers' AttentionInterface; anything that is not a padding-free row goes to plain SDPA.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_padding_free"


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each example in a padding-free row: where the position ids restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


_last_row: tuple[Any, int, list[tuple[int, int]]] = (None, -1, [])


def row_segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """`segments` of a row's position ids, computed once per forward pass: every layer is handed the same tensor,
    and reading it to the host waits for the device (on a GPU, a host sync per layer otherwise)."""
    global _last_row
    ref, version, bounds = _last_row
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return bounds
    bounds = segments(position_ids[0])
    _last_row = (weakref.ref(position_ids), position_ids._version, bounds)
    return bounds


def padding_free_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per example of a padding-free row (batch of one, no cache, restarting position ids), else plain SDPA; on a
    CPU in fp32."""
    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and kwargs.get("position_bias") is None
    )
    bounds = row_segments(position_ids) if packed else []
    dtype = query.dtype
    on_cpu = query.device.type == "cpu"
    autocast = on_cpu and torch.is_autocast_enabled("cpu")
    if on_cpu and (autocast or dtype in (torch.bfloat16, torch.float16)):
        # PyTorch's CPU SDPA kernel runs slower in bf16 than in fp32 (an AMX Xeon, a 135M model's layer, 8
        # examples forward and backward: 20 against 12 ms; a Zen 4: 30 against 19): the scores in fp32, also
        # under bf16 autocast (which would cast them down)
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False) if autocast else contextlib.nullcontext():
        if len(bounds) < 2:
            output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
            return output.to(dtype), None
        outputs = [
            sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
            for a, b in bounds
        ]
    return torch.cat(outputs, dim=1).to(dtype), None  # [batch, length, heads, head_dim], as sdpa_attention_forward


AttentionInterface.register(NAME, padding_free_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_padding_free_attention(model: Any, max_length: int) -> str | None:
    """Switch a model that runs SDPA or eager attention to the per-example attention; returns the implementation
    to restore afterwards, or None where it does not apply (another kernel, or a sliding window shorter than the
    longest example, which per-example causal attention would not apply)."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None)
    if current not in ("sdpa", "eager") or (window and window < max_length):
        return None
    model.set_attn_implementation(NAME)
    return current
