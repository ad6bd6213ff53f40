"""Fine-tuning with peft and the transformers Trainer: the model as it trains (quantised, wrapped in LoRA
adapters, or whole), the Trainer and its batches, the loop, and saving the result."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from .attention import use_padding_free_attention
from .config import Config
from .losses import supports_trained_positions, trained_token_losses
from .modeling import default_target_modules, head_modules, load_model
from .outputs import write_json
from .prompting import IGNORE_INDEX, padding_collator
from .resume import SealCheckpoints
from .selection import ValidationLed
from .telemetry import MemoryMonitor, StepLog, TokenCounter, TrainingProgress


def class_labels(config: Config) -> list[str] | None:
    """The classes `tokenize` found (classification), else None."""
    if config.model.task != "classification":
        return None
    return json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))["labels"]


def lora_config(model: Any, config: Config) -> LoraConfig:
    """The configured LoRA (or DoRA / rsLoRA) adapter for `model`: the method's r, alpha, dropout and targets (the
    architecture's projections by default); a classifier's new head trains in full and is saved with the adapter."""
    method = config.method
    targets = list(method.target_modules) if method.target_modules else default_target_modules(model)
    classify = config.model.task == "classification"
    to_save = list(method.modules_to_save) if method.modules_to_save else (head_modules(model) if classify else None)
    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=method.bias,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        modules_to_save=to_save,
        task_type="SEQ_CLS" if classify else "CAUSAL_LM",
    )


def lora_model(model: Any, config: Config) -> Any:
    """Wrap `model` with trainable adapters as `lora_config` says; their init is seeded."""
    lora = lora_config(model, config)
    set_seed(config.train.seed)
    return get_peft_model(model, lora)


def prepare_model(config: Config, tokenizer: Any, monitor: MemoryMonitor, splits: Any = None) -> Any:
    """The model as it trains: loaded (quantised for QLoRA / 8-bit), prepared for k-bit training, wrapped
    in adapters unless the method is full fine-tuning. `splits`: the tokenized data (its longest example
    decides gradient checkpointing when data.max_length is chosen from the data)."""
    method = config.method
    model = load_model(
        config.paths.base_model, config.model.dtype, method, class_labels(config), tokenizer.pad_token_id
    )
    monitor.record("load")
    model.config.use_cache = False  # no KV cache in training (a cache also hides packed-sequence boundaries)
    if method.quantization != "none":
        # casts norms and the head to fp32 and lets gradients reach the adapters through frozen quantised layers
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=use_gradient_checkpointing(config, model, splits),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if method.adapter == "lora":
        model = lora_model(model, config)
    monitor.record("prepared")
    return model


BF16_SPEEDUP_NEEDED = 1.2
"""How much faster than fp32 a bf16 matmul must run on a CPU for `precision: auto` to train in bf16. Training gains
about the square root of the matmul ratio (casts, norms and the softmax stay fp32): measured 1.34x faster with a
1.8x matmul (AMD Zen 4) and 0.73x, slower, with a 0.55x one (an Intel Xeon whose VM exposes AVX512-BF16 but not
AMX); the margin keeps a machine near the break-even point in fp32, where its weights are smaller."""


@functools.cache
def bf16_native() -> bool:
    """Whether training is faster in bf16 on this machine: a GPU that supports bf16, or a CPU that has the bf16
    instructions (AVX512-BF16 or AMX; elsewhere bf16 is emulated, hundreds of times slower) and, measured, runs a
    bf16 matmul at least `BF16_SPEEDUP_NEEDED` times as fast as an fp32 one. The flags alone do not say it: some
    CPUs (or their VMs) have them and still multiply bf16 slower than fp32. The measurement is stored per machine
    (`bf16_matmul_speedup`), so one machine always decides the same and its runs stay reproducible."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False
    return bf16_matmul_speedup() >= BF16_SPEEDUP_NEEDED


def bf16_matmul_speedup(size: int = 1024, repeats: int = 5) -> float:
    """bf16 over fp32 matmul throughput on this CPU, with this process's threads: the best of `repeats` alternating
    products of two `size` x `size` matrices in each precision (about 0.2 s with native bf16). Measured once per
    CPU model, flags, torch version and thread count, and kept in `~/.cache/slmtune/bf16_speedup.json`
    (`$XDG_CACHE_HOME`), so a noisy moment cannot flip a later run of the same machine to the other precision."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    key = "|".join((cpu_model(), f"flags:{flags}", torch.__version__, str(torch.get_num_threads()), str(size)))
    store = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmtune" / "bf16_speedup.json"
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
        return float(known[key])
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    pairs = {dtype: (torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)) for dtype in best}
    for a, b in pairs.values():
        torch.matmul(a, b)  # warm-up: oneDNN builds its kernels on the first product
    for _ in range(repeats):
        for dtype, (a, b) in pairs.items():
            started = time.perf_counter()
            torch.matmul(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    speedup = round(best[torch.float32] / best[torch.bfloat16], 3)  # as stored: the first run decides as later ones
    known = known if isinstance(known, dict) else {}
    known[key] = speedup
    with contextlib.suppress(OSError):  # a read-only home measures again next time
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, delete=False, suffix=".tmp") as handle:
            json.dump(known, handle, indent=1)
        os.replace(handle.name, store)
    return speedup


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, where bf16 is then not assumed native)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def use_bf16(train: Any) -> bool:
    """bf16 autocast (weights and optimizer states stay fp32): `auto` picks it only where it is faster
    (`bf16_native`)."""
    if train.precision == "auto":
        return bf16_native()
    return train.precision == "bf16"


def resolved_precision(train: Any) -> str:
    """The precision training runs in: `bf16` / `fp16` (autocast over fp32 weights) or `fp32`."""
    return "bf16" if use_bf16(train) else ("fp16" if train.precision == "fp16" else "fp32")


ACTIVATION_BUDGET_BYTES = 2 * 2**30
"""`train.gradient_checkpointing=auto` turns checkpointing on when one micro-batch's activations, as estimated by
`activation_bytes`, would exceed this (with the model, optimizer and runtime, a peak of about 3-4 GB for a
135M model)."""


def activation_bytes(model: Any, tokens: int, bf16: bool, lora_dropout: float = 0.0) -> int:
    """Estimated memory of the activations kept for the backward pass of one micro-batch of `tokens` tokens: per
    layer and token about 16 hidden-size and 5 intermediate-size values (norm inputs and outputs, q/k/v, rotary,
    attention output, residuals, MLP gate, up and product) at ~6 bytes each under bf16 autocast (8 in fp32), plus
    the LoRA dropout copies of each projection's input. Calibrated on SmolLM2-135M (measured 2.9 MB per token
    without dropout, 3.9 MB with 0.05, bf16, padding-free)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0
    per_layer = (16 * hidden + 5 * intermediate) * (6 if bf16 else 8)
    if lora_dropout > 0:
        per_layer += (6 * hidden + intermediate) * 5
    return tokens * layers * per_layer


def sequence_length(config: Config, splits: Any = None) -> int:
    """The longest sequence training sees: `data.max_length`, or when that is null (chosen from the data by the
    tokenize stage) the longest tokenized example of `splits` (0 when none is given)."""
    if config.data.max_length is not None:
        return config.data.max_length
    if splits is None:
        return 0
    return max((max(map(len, split["input_ids"]), default=0) for split in splits.values()), default=0)


def use_gradient_checkpointing(config: Config, model: Any, splits: Any = None) -> bool:
    """`true` / `false` as set; `auto`: set up when a micro-batch of `train.max_batch_tokens` tokens (or of the
    longest batch the data allows) would keep more than `activation_budget` bytes of activations; then only the
    micro-batches that would (`checkpoint_above`) recompute their layers."""
    setting = str(config.train.gradient_checkpointing).lower()
    if setting != "auto":
        return setting == "true"
    train = config.train
    longest = sequence_length(config, splits)
    tokens = train.batch_size * longest
    bound = micro_batch_tokens(config, model)
    if bound > 0:
        tokens = min(tokens, max(bound, longest))
    return tokens > checkpoint_above(config, model)


def activation_budget(model: Any) -> int:
    """Bytes of activations one micro-batch may keep before `train.gradient_checkpointing=auto` recomputes it. On a
    CPU, `ACTIVATION_BUDGET_BYTES` (host memory is shared with everything else on a user's machine). On a GPU, half
    of what the device has free once the model's training state is counted: its weights where they are not on the
    device yet (they are moved there when training starts), and for each trainable parameter its gradient and
    AdamW's two moments (12 bytes in fp32). A 1B model on an 80-140 GB GPU then trains without recomputation; on a
    small GPU the budget shrinks to zero and every micro-batch recomputes."""
    if not torch.cuda.is_available():
        return ACTIVATION_BUDGET_BYTES
    free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
    params = list(model.parameters())
    to_move = sum(p.numel() * p.element_size() for p in params if p.device.type != "cuda")
    state = 12 * sum(p.numel() for p in params if p.requires_grad)
    return max((free - to_move - state) // 2, 0)


def micro_batch_tokens(config: Config, model: Any) -> int:
    """The token positions one forward/backward pass may hold (`SlmTrainer` runs a larger batch as several passes;
    0: no bound). On a CPU `train.max_batch_tokens`: its memory is shared with everything else on a user's machine,
    and passes of 512 positions already keep its matmuls efficient. On a GPU at least what the activation budget
    holds (`checkpoint_above`): a pass costs a GPU a fixed number of kernel launches whatever its size, so cutting a
    batch that its memory holds into 512-position passes multiplies that cost (TRL, whose batches are never cut,
    trained the same 1B model on an H200 at 2,574 tokens/s, this train stage with 512-position passes at 1,546)."""
    bound = config.train.max_batch_tokens
    if bound <= 0 or not torch.cuda.is_available():
        return bound
    return max(bound, checkpoint_above(config, model))


def checkpoint_above(config: Config, model: Any) -> int:
    """The most token positions a micro-batch may hold and still keep its activations (`activation_bytes`) within
    `activation_budget`, and on a CPU at most `train.max_batch_tokens` (only a single example longer than that
    makes such a micro-batch): above it, `train.gradient_checkpointing=auto` recomputes the micro-batch's layers in
    the backward pass. Recomputing gives the same gradients, bit for bit, so which batches do changes only time and
    memory; a few long examples no longer slow every batch by the recomputation (about a quarter of a step), and
    the peak does not grow with the longest example (SmolLM2 full fine-tuning in bf16 on the knowledge base, 40
    steps: one 601-token text, under the budget's 706 positions, set the peak at 4,625 MB, 400 above any other
    micro-batch's)."""
    dropout = config.method.dropout if config.method.adapter == "lora" else 0.0
    per_token = activation_bytes(model, 1, use_bf16(config.train), dropout)
    above = activation_budget(model) // per_token if per_token else sys.maxsize
    if config.train.max_batch_tokens > 0 and not torch.cuda.is_available():
        above = min(above, config.train.max_batch_tokens)
    return above


def training_arguments(
    config: Config,
    output_dir: str,
    epochs: float,
    has_val: bool = True,
    checkpointing: bool = False,
    packed: bool = False,
    resuming: bool = False,
) -> TrainingArguments:
    """Trainer arguments from the config: length-grouped (or padding-free) batches, checkpoints in `output_dir`,
    `epochs` passes (`train.epochs_for` the data), validation `evaluations` times over the run unless eval_steps is
    set, and once before the first step (not when `resuming`)."""
    train = config.train
    bf16 = use_bf16(train)
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        neftune_noise_alpha=train.neftune_noise_alpha,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=bf16,
        fp16=train.precision == "fp16",
        use_cpu=bf16 and not torch.cuda.is_available(),  # transformers allows CPU bf16 autocast only when told
        prediction_loss_only=True,
        train_sampling_strategy="group_by_length" if train.group_by_length and not packed else "random",
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.eval_steps if train.eval_steps > 0 else 1 / train.evaluations,  # a ratio: of the run
        eval_on_start=has_val and not resuming,  # the base's validation loss: where the curve starts
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=max(train.save_steps, 1),
        save_total_limit=train.save_total_limit,
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if train.num_processes > 1 else None,
    )


def packs_correctly(model: Any) -> bool:
    """Whether the model keeps the examples of a padding-free row apart: two short sequences concatenated with
    restarting position ids must give the same logits as each alone. A model whose attention or positions do not
    follow the position ids (OPT under SDPA's mask: positions from the attention mask) mixes them, and trains on
    padded batches instead."""
    embeddings = model.get_input_embeddings()
    device, vocab = embeddings.weight.device, embeddings.num_embeddings
    first, second = torch.arange(3, 10, device=device) % vocab, torch.arange(11, 16, device=device) % vocab
    positions = torch.cat([torch.arange(7, device=device), torch.arange(5, device=device)])[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=s[None], use_cache=False).logits[0].float() for s in (first, second)]
            row = torch.cat([first, second])[None]
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    expected = torch.cat(alone)
    return bool((packed - expected).abs().max() <= 1e-3 * (1 + expected.abs().max()))


def padding_free(config: Config, model: Any, splits: Any = None) -> bool:
    """Padding-free batches when configured, the task is causal LM and the model keeps packed examples apart;
    the model then attends per example (`attention`; `restore_attention` undoes it). On a GPU only with a varlen
    attention kernel (flash-attn) in the model: measured on an H200 (1B Llama, full fine-tuning, the benchmark's
    long set), per-example SDPA ran at 760 real tokens/s, length-grouped padded batches at 1,546."""
    if not config.train.packing or config.model.task != "causal_lm":
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if torch.cuda.is_available() and getattr(base.config, "_attn_implementation", None) in ("sdpa", "eager"):
        # no varlen kernel (flash-attn): per-example SDPA calls cost a GPU more than padding to the batch's longest
        print("note: on a GPU without a varlen attention kernel (flash-attn), batches are padded, not padding-free")
        return False
    previous = use_padding_free_attention(base, sequence_length(config, splits))
    if packs_correctly(model):
        base._slmtune_attention_before = previous  # on the module: a saved config must not carry it
        return True
    if previous:
        base.set_attn_implementation(previous)
    print(f"note: {type(base).__name__} mixes the examples of a padding-free batch; training on padded batches")
    return False


def restore_attention(model: Any) -> None:
    """The attention implementation the model had before `padding_free` (saved configs must not name ours)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.__dict__.pop("_slmtune_attention_before", None)
    if previous:
        base.set_attn_implementation(previous)


def make_collator(config: Config, tokenizer: Any, packed: bool | None = None) -> TokenCounter:
    """Padding-free batches (each batch's examples concatenated into one row with restarting positions, no pad
    token), padding to the batch's longest example, or (classification) class ids. `packed` defaults to
    `train.packing` for causal LM."""
    if config.model.task == "classification":
        return TokenCounter(DataCollatorWithPadding(tokenizer, padding="longest"))
    if config.train.packing if packed is None else packed:
        return TokenCounter(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX))
    return TokenCounter(padding_collator(tokenizer))


def split_batch(inputs: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """A batch cut into pieces of at most `max_tokens` token positions (a single longer example stays whole):
    a padding-free row at example boundaries, a padded batch by rows, each piece trimmed to its own longest."""
    ids = inputs["input_ids"]
    if max_tokens <= 0 or ids.numel() <= max_tokens:
        return [inputs]
    if "attention_mask" not in inputs and "position_ids" in inputs and ids.shape[0] == 1:
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        bounds, begin = [], 0
        for end, following in zip(starts[1:], starts[2:] + [None]):
            if following is None or following - begin > max_tokens:
                bounds.append((begin, end))
                begin = end
        return [{key: value[:, a:b] for key, value in inputs.items()} for a, b in bounds]
    mask = inputs.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    pieces, rows = [], []
    for row, length in enumerate(lengths):
        if rows and (len(rows) + 1) * max(max(lengths[r] for r in rows), length) > max_tokens:
            pieces.append(rows)
            rows = []
        rows.append(row)
    pieces.append(rows)
    out = []
    for rows in pieces:
        part = {key: value[rows[0] : rows[-1] + 1] for key, value in inputs.items()}
        if mask is not None:
            columns = part["attention_mask"].bool().any(0)
            part = {key: value[:, columns] if value.dim() == 2 else value for key, value in part.items()}
        out.append(part)
    return out


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded by the data seed and the epoch.

    The stock sampler draws each epoch's order from the global torch RNG when the epoch starts; a run resumed
    after an epoch boundary draws it before the checkpoint's RNG state is restored, so its order (and every
    step after) differed from the uninterrupted run's. Seeded per epoch, the order is the same either way;
    the Trainer (through accelerate's loaders, skipped ones included) calls `set_epoch` before each epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def shard_cpu_processes(accelerator: Any) -> bool:
    """Turn FSDP on for CPU processes launched with an FSDP config; True when it did.

    accelerate (1.15) enables FSDP for accelerator devices only: CPU processes launched with an FSDP config
    quietly trained as DDP (each holding the whole model). torch's FSDP2 (`fully_shard`) shards over gloo, so
    the state is switched as accelerate itself switches it on a GPU, and its FSDP2 path (`fully_shard` per
    decoder layer, sharded checkpoints, the full state dict gathered for saving) does the rest."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP") != "true":
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables (FSDP2: launch.py checked)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # both shared states, as accelerate does: the Accelerator reads one, PartialState (and its helpers) the other
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


class SlmTrainer(Trainer):
    """The Trainer with this project's lean causal-LM step (`lean`): the loss only where labels are trained
    (`losses.trained_token_losses`, also for the validation loss), normalised by the trained tokens of the whole
    accumulated batch, and a batch of more than `max_batch_tokens` token positions run as several forward and
    backward passes summed into the same optimizer step (gradients synchronised once, after the last)."""

    def __init__(
        self,
        *args: Any,
        lean: bool = False,
        max_batch_tokens: int = 0,
        checkpoint_above: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lean = lean and not self.is_fsdp_enabled  # sharded parameters: the model's own loss
        self.max_batch_tokens = max_batch_tokens
        self.checkpoint_above = checkpoint_above
        """With activation checkpointing set up: only micro-batches of more token positions than this recompute
        their layers (None: every one does)."""
        self.micro_batches = self.checkpointed = 0
        self._checkpointed_layers: list[Any] | None = None
        self.eval_seconds = 0.0
        """Time spent in validation passes during `train()` (its runtime includes them)."""
        if self.lean:
            # the Trainer then counts the trained tokens of each accumulated batch (labels shifted, as causal LM
            # losses are) and hands the count to compute_loss, whose loss is then already scaled for accumulation
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = True

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if shard_cpu_processes(self.accelerator):
            self.is_fsdp_enabled = True

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """A validation pass, timed, its tokens not counted as trained ones."""
        counter = self.data_collator if isinstance(self.data_collator, TokenCounter) else None
        if counter:
            counter.counting = False
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - started
            if counter:
                counter.counting = True

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not self.lean:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        losses, _ = trained_token_losses(model, inputs)
        loss = losses.sum() / (num_items_in_batch if num_items_in_batch is not None else max(len(losses), 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count was summed over the processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        pieces = split_batch(inputs, self.max_batch_tokens) if self.lean else [inputs]
        if len(pieces) == 1:
            self._checkpoint_if_needed(model, inputs)
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            self._checkpoint_if_needed(model, piece)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, piece, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _checkpoint_if_needed(self, model: Any, inputs: dict[str, Any]) -> None:
        """Count the micro-batch, and whether its layers recompute: all of them with checkpointing on, else only
        those over `checkpoint_above` positions (the flag transformers' checkpointed layers read, set per batch)."""
        self.micro_batches += 1
        if not self.args.activation_checkpointing:
            return
        if self._checkpointed_layers is None:  # the Trainer turned checkpointing on when training started
            self._checkpointed_layers = [
                m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
            ]
        need = self.checkpoint_above is None or inputs["input_ids"].numel() > self.checkpoint_above
        for layer in self._checkpointed_layers:
            layer.gradient_checkpointing = need
        self.checkpointed += need


def build_trainer(
    config: Config,
    model: Any,
    tokenizer: Any,
    splits: Any,
    output_dir: str,
    callbacks: list,
    collator: Any = None,
    packed: bool = False,
    resuming: bool = False,
) -> Trainer:
    """A Trainer whose batches carry no padding beyond the batch's longest example (or none: `packed`, once
    `padding_free` said the model allows it), with the lean loss where the model supports it and batches bounded
    by `train.max_batch_tokens`; for as many epochs as `train.epochs_for` the training split's tokens."""
    has_val = "val" in splits
    train = config.train
    checkpointing = use_gradient_checkpointing(config, model, splits)
    lean = config.model.task == "causal_lm" and supports_trained_positions(model)
    epochs = train.epochs_for(split_tokens(splits["train"]))
    return SlmTrainer(
        model=model,
        args=training_arguments(config, output_dir, epochs, has_val, checkpointing, packed, resuming),
        train_dataset=splits["train"],
        eval_dataset=splits["val"] if has_val else None,
        data_collator=collator or make_collator(config, tokenizer, packed),
        callbacks=callbacks,
        lean=lean,
        max_batch_tokens=micro_batch_tokens(config, model),
        checkpoint_above=checkpoint_above(config, model) if train.gradient_checkpointing == "auto" else None,
    )


def split_tokens(split: Any) -> int:
    """Token positions (prompt and answer) of a tokenized split."""
    return sum(len(ids) for ids in split["input_ids"])


def validation_led(config: Config, model: Any, has_val: bool) -> ValidationLed | None:
    """The callback that keeps the best-validation weights and stops early, as configured; None without a
    validation split (training then runs its whole length and ends with the last step's weights)."""
    train = config.train
    if not has_val:
        if train.select_best or train.early_stopping_patience:
            print(
                "note: no validation split, so training runs its whole length and publishes the last step's "
                "weights; set data.val_fraction above 0 to let the validation loss choose"
            )
        return None
    return ValidationLed(model, train.select_best, train.early_stopping_patience, train.early_stopping_threshold)


def check_world_size(trainer: Trainer) -> None:
    """Every launched process must be a rank of one job: otherwise each would train alone on all the data."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but the Trainer sees a world of {trainer.args.world_size}: each "
            "would train alone on all the data. Launch through the train stage (train.num_processes) or set "
            "ACCELERATE_USE_CPU=true without a GPU."
        )


DISK_MARGIN_BYTES = 100 << 20
"""Logs, trainer state, tokenizer files and MLflow's records beside the weights."""


def training_disk_need(config: Config, counts: dict[str, int]) -> int:
    """Bytes the train stage writes at its peak: the checkpoints it keeps (fp32 trained weights and two Adam
    moments each: 12 bytes a trained parameter, and the best weights so far: 4 more), the adapter (the
    whole model after full fine-tuning) and its copy in the embedded MLflow store, and a margin."""
    train = config.train
    kept = train.save_total_limit if train.save_steps > 0 else 0
    per_checkpoint = 12 + 4 * train.select_best  # the best weights so far travel in each checkpoint
    return counts["trainable"] * (per_checkpoint * kept + 2 * 4) + DISK_MARGIN_BYTES


MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations at least this large get their own memory mapping, returned to the system when freed
(`return_freed_memory`)."""


def return_freed_memory() -> bool:
    """Make glibc's malloc map every allocation of `MMAP_THRESHOLD_BYTES` or more on its own and unmap it when
    freed. By default glibc raises that threshold (up to 32 MB) each time it frees a mapped block, so after the
    first step the activations of a micro-batch (1-4 MB tensors) come from the heap, whose freed holes between
    smaller blocks it keeps: the peak RSS grows above the memory in use. Measured on the long benchmark set
    (fp32 full fine-tuning, one run each): peak 4006 -> 3782 MB, 163.6 vs 162.9 tokens/s. `fit` sets it up for
    fp32 training only: under bf16 autocast the activations are half as large and the matmuls twice as fast, and
    mapping and unmapping them (page faults on every first touch) cost more than it saved (AVX512-BF16 Zen 4,
    full fine-tuning, long set, four alternating pairs: 183-242 tokens/s with glibc's default, 188-214 with the
    fixed threshold, peak 3,927-3,942 against 3,850-3,858 MB). Returns whether it applied (glibc on Linux;
    elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, MMAP_THRESHOLD_BYTES))  # -3: M_MMAP_THRESHOLD (malloc.h); a fixed value stays fixed


def fit(
    config: Config,
    model: Any,
    tokenizer: Any,
    splits: Any,
    step_log: StepLog,
    output_dir: str | None = None,
    resume_from: str | None = None,
) -> tuple[dict[str, float], dict | None, dict[str, Any]]:
    """Train `model` in place on the tokenized splits, checkpointing into `output_dir` (a scratch folder
    when None; each checkpoint sealed once complete) and resuming from the checkpoint `resume_from`; return
    losses and throughput, after FSDP training the full state dict gathered from the shards (else None), and
    the validation record (`validation_record`). With a validation split the model ends with the weights of
    its best evaluation when `train.select_best`."""
    set_seed(config.train.seed)
    if resolved_precision(config.train) == "fp32":
        return_freed_memory()
    with tempfile.TemporaryDirectory(prefix="slmtune-trainer-") as scratch:
        packed = padding_free(config, model, splits)
        led = validation_led(config, model, "val" in splits)
        try:
            collator = make_collator(config, tokenizer, packed)
            callbacks = [step_log, *([led] if led else []), SealCheckpoints()]  # best weights in before the seal
            trainer = build_trainer(
                config, model, tokenizer, splits, output_dir or scratch, callbacks, collator, packed, bool(resume_from)
            )
            trainer.remove_callback(PrinterCallback)  # raw log dicts; TrainingProgress shows the run instead
            trainer.add_callback(TrainingProgress(collator, paused=lambda: trainer.eval_seconds))
            check_world_size(trainer)
            if trainer.is_fsdp_enabled and trainer.accelerator.is_main_process:
                version = trainer.accelerator.state.fsdp_plugin.fsdp_version
                print(f"parameters sharded over {trainer.args.world_size} processes (FSDP{version})", flush=True)
            if led and led.select_best and trainer.is_fsdp_enabled:
                led.select_best = False
                print("note: with sharded (FSDP) training the last step's weights are published, not the best")
            if led and resume_from:
                led.restore(resume_from)
            result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            restore_attention(model)
        runtime = float(result.metrics["train_runtime"])
        validation = validation_record(trainer, led, trainer.args.num_train_epochs)
        metrics = {
            "train_loss": float(result.training_loss),
            "padding_free": float(packed),
            "bf16": float(use_bf16(config.train)),
            # the share of micro-batches whose layers recomputed (all or none unless `auto`)
            "gradient_checkpointing": trainer.checkpointed / max(trainer.micro_batches, 1),
            "processes": float(trainer.args.world_size),
            "sharded": float(trainer.is_fsdp_enabled),
            "steps": float(result.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
            "train_runtime_s": runtime,
            # trained tokens over the time spent training (the runtime less its validation passes)
            "tokens_per_second": collator.tokens / max(runtime - trainer.eval_seconds, 1e-9) if runtime else 0.0,
        }
        if "published_loss" in validation:
            metrics["val_loss"] = validation["published_loss"]
            metrics["published_step"] = float(validation["published_step"])
        # Sharded (FSDP) weights: every rank joins in gathering the full state dict that rank 0 saves.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    return metrics, state_dict, validation


def validation_record(trainer: Trainer, led: ValidationLed | None, planned_epochs: float) -> dict[str, Any]:
    """How validation led the run, for provenance and the report's verdict: the curves (`[step, loss]`, the
    base's validation loss at step 0), the step whose weights are published and its validation loss, whether
    training stopped early, and the epochs planned."""
    history = trainer.state.log_history
    record: dict[str, Any] = {
        "planned_epochs": float(planned_epochs),
        "last_step": trainer.state.global_step,
        "train_curve": [[e["step"], round(float(e["loss"]), 5)] for e in history if "loss" in e],
        "val_curve": [[e["step"], round(float(e["eval_loss"]), 5)] for e in history if "eval_loss" in e],
    }
    if led is None:
        return record | {"selected": False, "stopped_early": False}
    published = led.published_step(trainer.state.global_step)
    losses = dict(map(tuple, record["val_curve"]))
    record |= {
        "selected": led.has_best(),
        "stopped_early": led.stopped_early,
        "best_step": led.best_step,
        "best_loss": led.best_loss,
        "published_step": published,
        "published_loss": led.best_loss if published == led.best_step else losses.get(published),
    }
    return record


def save_adapter(model: Any, tokenizer: Any, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """peft's adapter files, with `target_modules` in a fixed order (peft keeps a set, whose order
    follows the hash seed) so that the same training gives the same bytes. Full fine-tuning saves the
    whole model and its tokenizer: a model folder that loads on its own. After FSDP training, `state_dict`
    is the one `fit` gathered from the shards."""
    if not hasattr(model, "peft_config"):
        model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        return
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(adapter_config.get(key), list):
            adapter_config[key] = sorted(set(adapter_config[key]))
    write_json(config_path, adapter_config)
