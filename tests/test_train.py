"""The train stage: batches, adapters and determinism on a tiny Llama; every method, architecture and task
through `dvc repro`; training controls, resume after a kill, two-process DDP, the hub push check."""

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from conftest import (
    SLMTUNE,
    TINY_OVERRIDES,
    built_once,
    copy_project,
    make_project,
    run,
    sample_texts,
    splits_for,
    stage_env,
)
from slmtune import selection
from slmtune.config import Config, TrackingConfig, compose_params
from slmtune.errors import ConfigError
from slmtune.lineage import file_md5
from slmtune.modeling import load_model
from slmtune.prompting import IGNORE_INDEX
from slmtune.resume import SEAL_FILE
from slmtune.selection import ValidationLed
from slmtune.telemetry import MemoryMonitor, StepLog, TrainingProgress
from slmtune.tracking import mlflow_run
from slmtune.training import (
    build_trainer,
    check_world_size,
    fit,
    lora_model,
    make_collator,
    padding_free,
    prepare_model,
    restore_attention,
    save_adapter,
    split_batch,
    use_bf16,
    use_gradient_checkpointing,
)
from tiny_models import save_tiny_model


def tiny_config(**train):
    config = Config()
    config.train.max_steps, config.train.learning_rate, config.train.batch_size = 12, 1e-2, 4
    config.train.eval_steps, config.train.warmup_ratio = 6, 0.0
    config.train.precision = "fp32"  # exact comparisons; bf16 autocast has its own tests
    config.data.max_length = 256
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def test_batches_are_padded_to_their_longest_example_only(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    config = tiny_config(packing=False)
    splits = splits_for(records, tiny_tokenizer)
    model = lora_model(load_model(tiny_model_dir), config)
    trainer = build_trainer(config, model, tiny_tokenizer, splits, str(tmp_path), [])
    widths = []
    for batch in trainer.get_train_dataloader():
        lengths = batch["attention_mask"].sum(dim=1)
        widths.append(batch["input_ids"].shape[1])
        assert batch["input_ids"].shape[1] == int(lengths.max()) < config.data.max_length
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert len(widths) == 4


def test_lora_training_moves_every_adapter_weight_and_no_base_weight(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    config = tiny_config()
    model = lora_model(load_model(tiny_model_dir), config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    step_log = StepLog()
    splits = splits_for(records, tiny_tokenizer)
    with mlflow_run(tracking) as run:
        metrics, _, _ = fit(config, model, tiny_tokenizer, splits, step_log)
    # the validation loss reported is that of the final weights (read from the last step's evaluation)
    again = build_trainer(config, model, tiny_tokenizer, splits, str(tmp_path / "again"), []).evaluate()
    assert metrics["val_loss"] == pytest.approx(again["eval_loss"], rel=1e-6)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"
    assert metrics["steps"] == 12 and "val_loss" in metrics
    losses = [row["loss"] for row in step_log.rows]
    assert len(losses) == 12 and losses[-1] < losses[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss/train")
    assert [m.step for m in history] == list(range(1, 13))


def test_same_seed_gives_identical_adapter_weights(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    def train_once():
        torch.manual_seed(torch.seed())  # disturb the global RNG: only the configured seed may matter
        config = tiny_config(max_steps=4)
        model = lora_model(load_model(tiny_model_dir), config)
        tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
        with mlflow_run(tracking):
            fit(config, model, tiny_tokenizer, splits_for(records, tiny_tokenizer), StepLog())
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    first, second = train_once(), train_once()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, steps, hook=None, **train):
    """Train a fresh LoRA tiny Llama for `steps` optimizer steps (no dropout, no warm-up, one batch order);
    return its trainable weights."""
    config = tiny_config(max_steps=steps, group_by_length=False, **train)
    config.method.dropout = 0.0
    model = lora_model(load_model(tiny_model_dir), config)
    if hook:
        # a pre-hook inside the checkpointed forward (a recomputation stops early, before the MLP's forward ends)
        model.base_model.model.model.layers[0].mlp.register_forward_pre_hook(hook)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    with mlflow_run(tracking):
        fit(config, model, tiny_tokenizer, splits_for(records, tiny_tokenizer, n_val=0), StepLog())
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_gradient_accumulation_trains_like_the_larger_batch(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    accumulated = train_steps(
        tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, batch_size=2, gradient_accumulation_steps=2
    )
    larger = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, batch_size=4)
    smaller = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, batch_size=2)
    for name, weight in larger.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(smaller[name], weight, atol=1e-6) for name, weight in larger.items())


def test_neftune_noises_the_input_embeddings_of_training_steps_only(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    plain = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2)
    noised = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, neftune_noise_alpha=5.0)
    assert any(not torch.equal(plain[k], noised[k]) for k in plain), "train.neftune_noise_alpha changed nothing"
    # the noise is the Trainer's, on for its training steps and gone after: the published model is not noised
    config = tiny_config(neftune_noise_alpha=5.0)
    model = lora_model(load_model(tiny_model_dir), config)
    trainer = build_trainer(config, model, tiny_tokenizer, splits_for(records, tiny_tokenizer), str(tmp_path), [])
    assert trainer.args.neftune_noise_alpha == 5.0
    embeddings = model.get_input_embeddings()
    assert not embeddings._forward_hooks
    config.train.neftune_noise_alpha = 0.0
    with pytest.raises(ConfigError, match=r"params.yaml: train.neftune_noise_alpha must be above 0"):
        config.train.check("params.yaml")


def test_gradient_checkpointing_recomputes_each_layer_in_the_backward_pass(
    tiny_model_dir, tiny_tokenizer, records, tmp_path, monkeypatch
):
    from slmtune import training
    from slmtune.training import activation_bytes

    def counting(calls, tokens=None):
        def hook(module, args):
            if module.training:  # not the padding-free check's forwards (eval mode)
                calls.append(torch._C._current_graph_task_id() != -1)  # whether this forward runs inside a backward
                if tokens is not None and not calls[-1]:
                    tokens.append(args[0].shape[0] * args[0].shape[1])  # the micro-batch's token positions

        return hook

    plain, checkpointed, tokens = [], [], []
    weights = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 3, hook=counting(plain, tokens))
    recomputed = train_steps(
        tiny_model_dir, tiny_tokenizer, records, tmp_path, 3, hook=counting(checkpointed), gradient_checkpointing=True
    )
    assert plain == [False] * 3  # one forward of the first layer's MLP per step
    assert checkpointed == [False, True] * 3  # and one more in each backward pass, recomputing what was not kept
    assert all(torch.equal(recomputed[name], weight) for name, weight in weights.items())  # the same, bit for bit

    # auto: only a micro-batch over the budget recomputes (here: the budget fits the smallest of the three)
    assert len(set(tokens)) > 1, tokens
    per_token = activation_bytes(load_model(tiny_model_dir), 1, False)
    monkeypatch.setattr(training, "ACTIVATION_BUDGET_BYTES", per_token * min(tokens))
    auto = []
    mixed = train_steps(
        tiny_model_dir, tiny_tokenizer, records, tmp_path, 3, hook=counting(auto), gradient_checkpointing="auto"
    )
    expected = [[False, True] if n > min(tokens) else [False] for n in tokens]
    assert auto == [seen for step in expected for seen in step], (auto, tokens)
    assert all(torch.equal(mixed[name], weight) for name, weight in weights.items())


def test_epochs_set_the_length_when_max_steps_is_unset(tiny_model_dir, tiny_tokenizer, records, tmp_path):
    config = tiny_config(max_steps=-1, epochs=2, batch_size=4, gradient_accumulation_steps=2, eval_steps=100)
    model = lora_model(load_model(tiny_model_dir), config)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    with mlflow_run(tracking):
        metrics, _, _ = fit(config, model, tiny_tokenizer, splits_for(records, tiny_tokenizer), StepLog())
    assert metrics["steps"] == 2 * 16 / (4 * 2)  # two passes over 16 examples, 8 per optimizer step


def test_throughput_counts_the_trained_tokens_over_the_training_time_not_validation(
    tiny_model_dir, tiny_tokenizer, records, tmp_path
):
    """Validation batches go through the same collator and their passes run inside the Trainer's runtime: neither
    their tokens nor their time may count as training (they used to, and inflated tokens/s where validation is
    large against the steps, e.g. the benchmark's long set: 17,539 counted tokens for ~6,800 trained)."""
    from slmtune.training import make_collator

    config = tiny_config(max_steps=-1, epochs=2, batch_size=4, eval_steps=2)
    splits = splits_for(records, tiny_tokenizer, n_val=8)
    trained = 2 * sum(map(len, splits["train"]["input_ids"]))  # two epochs
    collator = make_collator(config, tiny_tokenizer, packed=False)
    trainer = build_trainer(
        config, load_model(tiny_model_dir), tiny_tokenizer, splits, str(tmp_path / "t"), [], collator
    )
    progress = TrainingProgress(collator, paused=lambda: trainer.eval_seconds)  # as `fit` adds it
    trainer.add_callback(progress)
    trainer.train()
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(evaluations) == 5  # step 0 and every 2 of 8 steps: five passes over the validation split
    assert collator.tokens == trained and trainer.eval_seconds > 0
    # the progress line's tokens/s: the same trained tokens over the time spent training
    elapsed = time.monotonic() - progress.start
    shown = float(re.search(r"([\d,]+) tok/s", progress.figures())[1].replace(",", ""))
    assert trainer.eval_seconds > 0.2 * elapsed  # enough validation time that counting it would show
    assert shown == pytest.approx(trained / (elapsed - trainer.eval_seconds), rel=0.1)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    with mlflow_run(tracking):
        metrics, _, _ = fit(config, load_model(tiny_model_dir), tiny_tokenizer, splits, StepLog())
    assert metrics["tokens_per_second"] > trained / metrics["train_runtime_s"]  # the validation time left out


def test_an_overfitting_run_publishes_its_best_validation_weights_not_the_last(
    tiny_model_dir, tiny_tokenizer, records, tmp_path
):
    """Full fine-tuning of the tiny model on 6 examples at a high learning rate: the validation loss falls, then
    rises as the model memorises them. The weights the run ends with, saved and loaded again, are those of the
    lowest validation loss, earlier than the last step and lower than the last step's."""
    config = tiny_config(max_steps=40, eval_steps=4, early_stopping_patience=0)
    splits = splits_for(records, tiny_tokenizer, n_train=6)
    model = load_model(tiny_model_dir)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    with mlflow_run(tracking):
        metrics, _, validation = fit(config, model, tiny_tokenizer, splits, StepLog())
    curve = dict(validation["val_curve"])
    assert sorted(curve) == list(range(0, 41, 4))  # the base's loss at step 0, then every 4 steps to the last
    best_step = min(curve, key=curve.get)
    assert validation["published_step"] == best_step < validation["last_step"] == 40
    assert curve[best_step] < curve[40] - 0.5  # it did overfit: the last step is far worse
    save_adapter(model, tiny_tokenizer, tmp_path / "published")
    published = load_model(tmp_path / "published")
    loss = build_trainer(config, published, tiny_tokenizer, splits, str(tmp_path / "eval"), []).evaluate()["eval_loss"]
    assert loss == pytest.approx(curve[best_step], abs=1e-4) == metrics["val_loss"]


@pytest.mark.parametrize("kept", ["in memory", "in a file"])
def test_the_best_weights_so_far_travel_in_each_checkpoint_and_early_stopping_counts_on(tmp_path, monkeypatch, kept):
    """A run resumed from a checkpoint knows the best validation loss so far, its step, its weights and the
    evaluations since: it stops and publishes as the uninterrupted run would. Large trained weights (full
    fine-tuning) are kept in a file, not a second copy in memory, with the same result."""
    if kept == "in a file":
        monkeypatch.setattr(selection, "KEEP_IN_MEMORY_BYTES", 0)
    model = torch.nn.Linear(3, 2)
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl()
    led = ValidationLed(model, select_best=True, patience=2)
    state.global_step = 4
    led.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    spill = tmp_path / selection.BEST_WEIGHTS
    assert (led.weights is None and spill.is_file()) == (kept == "in a file")
    best = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    state.global_step = 8
    led.on_evaluate(args, state, control, metrics={"eval_loss": 1.5})
    (tmp_path / "checkpoint-8").mkdir()
    led.on_save(args, state, control)
    state.global_step = 9  # a newer best, kept after the checkpoint was written: the checkpoint keeps step 4's
    led.on_evaluate(args, state, control, metrics={"eval_loss": 0.5})
    led.on_train_end(args, state, control)
    assert led.published_step(9) == 9 and not spill.exists()  # the file copy is scratch, gone at the end
    with torch.no_grad():
        model.weight.add_(1.0)
    resumed = ValidationLed(model, select_best=True, patience=2)
    resumed.restore(tmp_path / "checkpoint-8")
    assert (resumed.best_step, resumed.best_loss, resumed.since_best) == (4, 1.0, 1)
    assert (resumed.weights is None) == (kept == "in a file")
    state.global_step = 12
    resumed.on_evaluate(args, state, control, metrics={"eval_loss": 1.2})
    assert control.should_training_stop and resumed.stopped_early  # the second evaluation in a row without a drop
    resumed.on_train_end(args, state, control)
    assert all(torch.equal(p, best[name]) for name, p in model.named_parameters())
    assert resumed.published_step(12) == 4 and not spill.exists()
    assert (tmp_path / "checkpoint-8" / selection.BEST_WEIGHTS).is_file()


def test_packed_batches_score_each_example_as_if_it_were_alone(tiny_model_dir, tiny_tokenizer, records):
    """Padding-free batches: positions restart at each example and attention stays inside it, so each token's
    loss equals its loss in an ordinary padded batch (the model as the train stage prepares it)."""
    rows = [dict(r) for r in splits_for(records, tiny_tokenizer, n_train=4, n_val=0)["train"]]
    losses = {}
    for packing, attention in ((False, "sdpa"), (True, "sdpa"), (True, "sdpa_padding_free")):
        config = tiny_config(packing=packing)
        config.paths.base_model, config.method.dropout = str(tiny_model_dir), 0.0
        model = prepare_model(config, tiny_tokenizer, MemoryMonitor(False))
        if attention != "sdpa":
            assert padding_free(config, model)  # the per-example attention, checked on the model first
        assert model.get_base_model().config._attn_implementation == attention
        batch = make_collator(config, tiny_tokenizer)(rows)
        assert (batch["input_ids"].shape[0] == 1) == packing
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        each = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        losses[packing, attention] = each[labels != IGNORE_INDEX]
        restore_attention(model)
        assert model.get_base_model().config._attn_implementation == "sdpa"
    for key in ((True, "sdpa"), (True, "sdpa_padding_free")):
        torch.testing.assert_close(losses[key], losses[False, "sdpa"], rtol=1e-4, atol=1e-5)


def test_per_example_attention_runs_in_fp32_on_a_cpu_under_bf16_autocast():
    """The CPU's bf16 SDPA kernel is slower than its fp32 one, so under bf16 autocast the per-example attention
    computes its scores from fp32 inputs: the same output as fp32 attention, not bf16's rounding of it; for a
    padding-free row and for a single sequence alike."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from slmtune.attention import padding_free_attention

    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    query, key, value = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = padding_free_attention(module, query, key, value, None, position_ids=positions)
        single, _ = padding_free_attention(module, query, key, value, None, position_ids=torch.arange(12)[None])
        in_bf16, _ = sdpa_attention_forward(module, query, key, value, None)
    assert in_bf16.dtype == torch.bfloat16  # autocast alone would have computed it in bf16
    expected = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None)[0]
        for a, b in ((0, 7), (7, 12))
    ]
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, torch.cat(expected, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(single, sdpa_attention_forward(module, query, key, value, None)[0], rtol=1e-6, atol=1e-6)


def test_a_model_that_mixes_packed_examples_trains_on_padded_batches(tiny_tokenizer, monkeypatch):
    """OPT derives positions from the attention mask, so with SDPA's block mask a padding-free row lets examples
    see each other: the check before training says so and the batches are padded. The per-example attention
    keeps them apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmtune import training

    opt = AutoConfig.for_model(
        "opt",
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tiny_tokenizer),
        word_embed_proj_dim=32,
    )
    config = tiny_config()
    model = lora_model(AutoModelForCausalLM.from_config(opt), config)
    assert padding_free(config, model)
    restore_attention(model)
    monkeypatch.setattr(training, "use_padding_free_attention", lambda model, max_length: None)  # e.g. another kernel
    assert config.train.packing and not padding_free(config, model)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_lean_loss_is_the_models_own_loss_on_padded_and_padding_free_batches(tiny_model_dir, tiny_tokenizer, records):
    """The head only where labels are trained, fp32 softmax in chunks: the same mean loss and the same gradients
    as the model computing logits for every position."""
    from slmtune import losses as lean

    rows = [dict(r) for r in splits_for(records, tiny_tokenizer, n_train=6, n_val=0)["train"]]
    for packing in (False, True):
        config = tiny_config(packing=packing)
        config.paths.base_model, config.method.dropout = str(tiny_model_dir), 0.0
        model = prepare_model(config, tiny_tokenizer, MemoryMonitor(False))
        batch = make_collator(config, tiny_tokenizer)(rows)
        own = model(**batch).loss
        own.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        original = lean.CHUNK_POSITIONS
        lean.CHUNK_POSITIONS = 7  # several chunks, the last one short
        try:
            losses, keep = lean.trained_token_losses(model, dict(batch))
        finally:
            lean.CHUNK_POSITIONS = original
        assert int(keep.sum()) == len(losses) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        losses.mean().backward()
        torch.testing.assert_close(losses.mean(), own, rtol=1e-5, atol=1e-6)
        for name, grad in expected.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)


def test_a_batch_over_max_batch_tokens_runs_in_pieces_with_the_same_result(
    tiny_model_dir, tiny_tokenizer, records, tmp_path
):
    """Token-bounded batches: pieces of at most `max_batch_tokens` positions (whole examples), summed into the
    same optimizer step: the weights after training equal those of whole batches."""
    rows = [dict(r) for r in splits_for(records, tiny_tokenizer, n_train=8, n_val=0)["train"]]
    for packing in (False, True):
        batch = make_collator(tiny_config(packing=packing), tiny_tokenizer)(rows)
        pieces = split_batch(batch, 40)

        def examples(piece, packing=packing):
            return int((piece["position_ids"] == 0).sum()) if packing else piece["input_ids"].shape[0]

        assert len(pieces) > 2 and all(p["input_ids"].numel() <= 40 or examples(p) == 1 for p in pieces)
        assert sum(examples(p) for p in pieces) == 8
        assert sum(int((p["labels"] != IGNORE_INDEX).sum()) for p in pieces) == int(
            (batch["labels"] != IGNORE_INDEX).sum()
        )
    for packing in (False, True):
        whole = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, packing=packing, max_batch_tokens=0)
        split = train_steps(tiny_model_dir, tiny_tokenizer, records, tmp_path, 2, packing=packing, max_batch_tokens=40)
        for name, weight in whole.items():
            torch.testing.assert_close(split[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_precision_auto_is_bf16_where_the_hardware_computes_it_and_bf16_trains_on_a_cpu(
    tiny_model_dir, tiny_tokenizer, records, tmp_path, monkeypatch
):
    from slmtune import training

    config = tiny_config()
    config.train.precision = "auto"
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    measured = []
    for flags, speedup, expected in (
        ({"avx512f"}, 2.0, False),  # emulated bf16: not even measured
        ({"avx512f", "avx512_bf16"}, 2.0, True),
        ({"amx_bf16"}, 1.25, True),
        ({"avx512f", "avx512_bf16"}, 0.55, False),  # the instructions, yet slower than fp32 (measured on a Xeon VM)
        ({"avx512f", "avx512_bf16"}, 1.1, False),  # within the margin
    ):
        monkeypatch.setattr(training, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(training, "bf16_matmul_speedup", lambda s=speedup: measured.append(s) or s)
        training.bf16_native.cache_clear()
        assert use_bf16(config.train) is expected, (flags, speedup)
    assert measured == [2.0, 1.25, 0.55, 1.1]
    training.bf16_native.cache_clear()
    # bf16 autocast on a CPU (transformers alone refuses it: "Your setup doesn't support bf16/gpu")
    config.train.precision = "bf16"
    model = lora_model(load_model(tiny_model_dir), config)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_system_metrics=False)
    seen = []
    model.base_model.model.model.layers[0].mlp.up_proj.base_layer.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype) if module.training else None
    )
    with mlflow_run(tracking):
        metrics, _, _ = fit(config, model, tiny_tokenizer, splits_for(records, tiny_tokenizer), StepLog())
    assert metrics["bf16"] == 1.0 and seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights (and so optimizer states) stay fp32


def test_the_bf16_matmul_measurement_is_kept_per_machine(tmp_path, monkeypatch):
    """Measured once, then read back: a later run of the same machine decides the same precision."""
    from slmtune import training

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = training.bf16_matmul_speedup(size=64, repeats=2)
    store = tmp_path / "slmtune" / "bf16_speedup.json"
    (key, value), *others = json.loads(store.read_text()).items()
    assert not others and value == round(first, 3) and first > 0 and str(torch.get_num_threads()) in key.split("|")
    store.write_text(json.dumps({key: 9.5}))
    assert training.bf16_matmul_speedup(size=64, repeats=2) == 9.5
    assert training.bf16_matmul_speedup(size=32, repeats=2) != 9.5  # another measurement, another entry
    assert len(json.loads(store.read_text())) == 2


HEAP_PROBE = """
import gc, resource, sys, torch
from slmtune import training
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def heap_returns():
    warm = torch.ones(600_000)
    del warm  # a freed mapped block: glibc's default now keeps blocks this size in its heap
    big, pins = [], []
    for _ in range(40):  # 2.4 MB blocks with small ones between them, like activations and their bookkeeping
        big.append(torch.ones(600_000))
        pins.append(torch.ones(1000))
    before = rss()
    del big[::2]  # every other one: holes between blocks in use, as a freed micro-batch leaves
    gc.collect()
    return before - rss() > 0.8 * 20 * 2.4e6
if sys.argv[1] != "default":  # what fit has set up by its first batch, training in fp32 or under bf16 autocast
    training.padding_free = lambda *args: sys.exit(0 if heap_returns() else 3)
    config = training.Config()
    config.train.precision = sys.argv[1].split("-")[1]
    training.fit(config, None, None, {}, None)
sys.exit(0 if heap_returns() else 3)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_training_returns_freed_activation_memory_to_the_system():
    """fit training in fp32 sets glibc's malloc to map 1-4 MB blocks (a micro-batch's activations) on their own and
    unmap them when freed; by default glibc keeps them in its heap after the first step, and the peak RSS grows
    above the memory in use (measured: 4006 -> 3782 MB on the long benchmark set). The probe first shows the
    default keeping them. Under bf16 autocast fit leaves glibc's default, which trained 12-23% faster there."""
    codes = {}
    for mode in ("default", "fit-fp32", "fit-bf16"):
        proc = subprocess.run(["python", "-c", HEAP_PROBE, mode], capture_output=True, text=True, timeout=300)
        assert proc.returncode in (0, 3), proc.stderr[-2000:]
        codes[mode] = proc.returncode
    expected = {"default": 3, "fit-fp32": 0, "fit-bf16": 3}
    assert codes == expected, "freed 2.4 MB blocks: 0 returned to the system, 3 kept"


KERNEL_CACHE_PROBE = """
import ctypes
import slmtune  # noqa: F401  (sets the caches' sizes unless the environment already has)
import torch
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def in_use():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20
weight = torch.randn(576, 576, dtype=torch.bfloat16)
for rows in range(1, 5):
    torch.randn(rows, 576, dtype=torch.bfloat16) @ weight
before = in_use()
for rows in range(100, 400):  # a new token count per micro-batch, as padding-free batches have
    torch.randn(rows, 576, dtype=torch.bfloat16) @ weight
print(in_use() - before)
"""


def test_importing_slmtune_bounds_the_cpu_matmul_kernel_caches(monkeypatch):
    """oneDNN and PyTorch's ideep each keep up to 1,024 compiled bf16 matmul kernels, one per shape; with a new
    token count per micro-batch they grew the peak of bf16 training by hundreds of MB. slmtune sets both caches to
    16 (a user's own setting wins), and with bf16 matmuls in hardware, 300 shapes then keep a few MB, not ~180."""
    import importlib

    import slmtune
    from slmtune import training

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    importlib.reload(slmtune)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    importlib.reload(slmtune)
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
    if not training.cpu_flags() & {"avx512_bf16", "amx_bf16"} or not sys.platform.startswith("linux"):
        return  # bf16 emulated: too slow to probe, and not oneDNN's kernels
    grown = {}
    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    for size in ("1024", None):
        env = {k: v for k, v in os.environ.items() if k not in names}
        env.update(dict.fromkeys(names, size) if size else {})
        command = ["python", "-c", KERNEL_CACHE_PROBE]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        grown[size] = float(proc.stdout.split()[-1])
    assert grown["1024"] > 60 and grown[None] < 30, grown


def test_gradient_checkpointing_auto_turns_on_when_a_micro_batch_would_not_fit(tiny_model_dir):
    from slmtune import training
    from slmtune.training import ACTIVATION_BUDGET_BYTES, activation_bytes

    model = load_model(tiny_model_dir)
    config = tiny_config(gradient_checkpointing="auto")
    per_token = activation_bytes(model, 1, False, config.method.dropout)
    config.train.max_batch_tokens = config.data.max_length = ACTIVATION_BUDGET_BYTES // per_token // 2
    assert not use_gradient_checkpointing(config, model)
    # on a CPU a micro-batch over the token bound (one example longer than it) recomputes, though the budget would
    # hold twice as many positions: the peak does not grow with the longest example
    assert training.checkpoint_above(config, model) == config.train.max_batch_tokens
    config.data.max_length *= 4  # one example alone would keep twice the budget
    assert use_gradient_checkpointing(config, model)
    config.train.gradient_checkpointing = "false"
    assert not use_gradient_checkpointing(config, model)


def test_gradient_checkpointing_auto_on_a_gpu_follows_the_device_memory(tiny_model_dir, monkeypatch):
    """On a GPU the budget is half the device's free memory after the model's training state, not the CPU's 2 GB:
    a micro-batch the CPU budget would recompute keeps its activations on a large GPU, and recomputes on a full one."""
    from slmtune import training
    from slmtune.training import ACTIVATION_BUDGET_BYTES, activation_bytes

    model = load_model(tiny_model_dir)
    config = tiny_config(gradient_checkpointing="auto")
    config.method.adapter = "none"
    per_token = activation_bytes(model, 1, False, 0.0)
    config.train.max_batch_tokens = config.data.max_length = 2 * ACTIVATION_BUDGET_BYTES // per_token
    assert use_gradient_checkpointing(config, model)  # no GPU: over the CPU's budget
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 12 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    free = {"bytes": weights + state + 8 * ACTIVATION_BUDGET_BYTES}
    monkeypatch.setattr(training.torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))
    assert training.activation_budget(model) == 4 * ACTIVATION_BUDGET_BYTES
    assert not use_gradient_checkpointing(config, model)
    free["bytes"] = weights + state + ACTIVATION_BUDGET_BYTES  # a small GPU: its half is below the micro-batch
    assert use_gradient_checkpointing(config, model)
    free["bytes"] = weights  # not even the optimizer states fit: every micro-batch recomputes
    assert training.checkpoint_above(config, model) == 0


def test_a_padding_free_rows_example_bounds_are_read_once_per_forward_not_once_per_layer(
    tiny_model_dir, tiny_tokenizer, records
):
    """The per-example attention needs the row's example bounds on the host; reading them (`nonzero`) waits for a
    GPU, so it happens once per forward pass, whatever the number of layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func is torch.ops.aten.nonzero.default
            return func(*args, **(kwargs or {}))

    config = tiny_config()
    config.paths.base_model = str(tiny_model_dir)
    model = prepare_model(config, tiny_tokenizer, MemoryMonitor(False))
    assert padding_free(config, model)
    rows = [dict(r) for r in splits_for(records, tiny_tokenizer, n_train=4, n_val=0)["train"]]
    batch = make_collator(config, tiny_tokenizer)(rows)
    for _ in range(2):  # a new batch tensor each time: its bounds are read again
        with Reads():
            model(**{k: v.clone() for k, v in batch.items() if k != "labels"}, use_cache=False)
    restore_attention(model)
    assert model.config.num_hidden_layers == 2 and Reads.count == 2


def test_on_a_gpu_a_batch_its_memory_holds_runs_as_one_pass_and_padded_without_a_varlen_kernel(
    tiny_model_dir, tiny_tokenizer, monkeypatch, capsys
):
    """On a CPU a batch runs as passes of `train.max_batch_tokens` positions and padding-free through the per-example
    attention. On a GPU a pass may hold what half its free memory holds (never fewer than the setting), and without
    a varlen kernel (flash-attn) batches are padded: both cost a GPU kernel launches, not memory."""
    from slmtune import training

    config = tiny_config(gradient_checkpointing="auto")
    config.paths.base_model = str(tiny_model_dir)
    model = prepare_model(config, tiny_tokenizer, MemoryMonitor(False))
    assert training.micro_batch_tokens(config, model) == config.train.max_batch_tokens == 512
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    free = {"bytes": 8 * training.ACTIVATION_BUDGET_BYTES}
    monkeypatch.setattr(training.torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))
    holds = training.checkpoint_above(config, model)
    assert holds > 100_000 and training.micro_batch_tokens(config, model) == holds
    assert not use_gradient_checkpointing(config, model)
    free["bytes"] = 0  # a full GPU: the setting still bounds the passes, and every pass recomputes
    assert training.micro_batch_tokens(config, model) == 512 and use_gradient_checkpointing(config, model)
    config.train.max_batch_tokens = 0
    assert training.micro_batch_tokens(config, model) == 0  # no bound stays no bound
    assert not padding_free(config, model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert "batches are padded" in capsys.readouterr().out
    monkeypatch.undo()
    assert padding_free(config, model)
    restore_attention(model)


def test_world_size_guard_refuses_ranks_that_would_each_train_alone(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(args=SimpleNamespace(world_size=1))
    with pytest.raises(RuntimeError, match="2 processes were launched but the Trainer sees a world of 1"):
        check_world_size(alone)
    check_world_size(SimpleNamespace(args=SimpleNamespace(world_size=2)))


def test_adapter_is_a_standard_peft_adapter(tiny_trained, tiny_model_dir):
    from peft import PeftModel

    from slmtune.modeling import load_model

    tiny_project = tiny_trained.project
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), tiny_project / "models/adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    steps = (tiny_project / "reports/train_log.csv").read_text().splitlines()
    assert steps[0] == "step,loss,learning_rate" and len(steps) == 1 + 6


def test_train_stage_stops_before_training_when_tracking_is_down_or_the_disk_is_full(
    tiny_trained, tmp_path, monkeypatch
):
    import shutil
    import socket
    import sys

    import yaml

    from slmtune.config import load_config
    from slmtune.errors import DiskSpaceError
    from slmtune.pipeline.train import run_train

    project = copy_project(tiny_trained.project, tmp_path)
    adapter = (project / "models/adapter/adapter_model.safetensors").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed
    (project / "params.yaml").write_text(
        yaml.safe_dump({**params, "tracking": {**params["tracking"], "tracking_uri": down}})
    )
    result = subprocess.run(
        [sys.executable, "-P", "stages/train.py"], cwd=project, env=stage_env(), capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: tracking.tracking_uri {down}: the MLflow server")
    assert not (project / "checkpoints/train").exists()
    assert (project / "models/adapter/adapter_model.safetensors").read_bytes() == adapter

    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 50 << 20, 50 << 20)
    )
    with pytest.raises(DiskSpaceError, match=r"checkpoints/train: 0.05 GB free on its disk, training .* needs about"):
        run_train(load_config(), project / "models/adapter", project / "reports/train_log.csv")
    assert not (project / "checkpoints/train").exists()


def test_same_inputs_give_identical_adapter_bytes(tiny_trained, tmp_path):
    tiny_project = copy_project(tiny_trained.project, tmp_path)
    adapter = tiny_project / "models/adapter"
    files = ("adapter_model.safetensors", "adapter_config.json")
    first = {name: file_md5(adapter / name) for name in files} | {
        "log": file_md5(tiny_project / "reports/train_log.csv")
    }
    first_run = json.loads((adapter / "provenance.json").read_text())["mlflow"]["run_id"]
    run(["dvc", "repro", "--force", "--single-item", "train"], tiny_project)
    second = {name: file_md5(adapter / name) for name in files} | {
        "log": file_md5(tiny_project / "reports/train_log.csv")
    }
    assert second == first
    assert json.loads((adapter / "provenance.json").read_text())["mlflow"]["run_id"] != first_run


def tiny_overrides(model_dir: Path) -> list[str]:
    return [f"model.source={model_dir}", "model.gguf_file=null", *TINY_OVERRIDES]


@pytest.fixture(scope="session")
def tokenized(shared_tmp) -> tuple[Path, Path]:
    """A tiny-Llama (width 64, so that 4-bit kernels take it) project whose base/prepare/tokenize ran once (for
    all workers), and the model folder."""

    def build(root: Path) -> list[str]:
        model_dir = save_tiny_model(root / "tiny-llama-64", sample_texts(), "llama")
        project = make_project(root / "project", tiny_overrides(model_dir))
        run(["dvc", "repro", "tokenize"], project)
        return [str(project), str(model_dir)]

    project, model_dir = built_once(shared_tmp, "methods", build)
    return Path(project), Path(model_dir)


def repro(project: Path, overrides: list[str]) -> dict:
    """Recompose params.yaml with `overrides`, run `dvc repro`, return metrics + provenance."""
    compose_params(project, project / "params.yaml", overrides)
    result = run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    return {"stdout": result.stdout, "metrics": metrics, "provenance": provenance}


def adapter_tensors(project: Path) -> dict:
    with safe_open(str(project / "models/adapter/adapter_model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("method", ["lora", "qlora", "lora_8bit", "full", "dora", "rslora"])
def test_each_method_trains_end_to_end(tokenized, tmp_path, method):
    project = copy_project(tokenized[0], tmp_path)
    out = repro(project, [*tiny_overrides(tokenized[1]), f"method={method}"])
    assert "Running stage 'train'" in out["stdout"] and "Running stage 'tokenize'" not in out["stdout"]
    counts, metrics = out["provenance"]["parameters"], out["metrics"]
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert (
        out["provenance"]["metrics"]["memory/peak_rss_mb"] > 0 and out["provenance"]["metrics"]["tokens_per_second"] > 0
    )
    adapter = project / "models/adapter"
    assert type(model_card_model(project)).__name__ == (
        "LlamaForCausalLM" if method == "full" else "PeftModelForCausalLM"
    )
    if method in ("qlora", "full"):  # merging: QLoRA's adapter onto the dequantised base; a full model refuses
        merge = run([*SLMTUNE, "merge", "-o", str(tmp_path / "merged")], project, check=False)
        assert (merge.returncode, (tmp_path / "merged").exists()) == ((1, False) if method == "full" else (0, True))
        assert ("merge parity: PASS" in merge.stdout) == (method == "qlora"), merge.stdout + merge.stderr
    if method == "full":
        assert counts["trainable"] == counts["total"]
        assert (adapter / "model.safetensors").is_file() and not (adapter / "adapter_config.json").exists()
        assert "holds a fully fine-tuned model already" in merge.stderr and "slmtune export --model" in merge.stderr
        return
    assert 0 < counts["trainable"] < counts["total"] / 2
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == (method == "rslora")
    names = adapter_tensors(project)
    assert any("lora_A" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names) == (method == "dora")
    if method in ("lora", "qlora", "lora_8bit"):  # quantised weights count as parameters, not packed bytes
        base_params = _base_parameters(project)
        assert counts["total"] == base_params + counts["trainable"]


def model_card_model(project: Path):
    """Run the loading snippet of the adapter's model card in the project; return the model it loads."""
    card = (project / "models/adapter/README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(project)
    try:
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    return scope["model"]


def _base_parameters(project: Path) -> int:
    from slmtune.modeling import load_model

    return sum(p.numel() for p in load_model(project / "models/base").parameters())


def test_training_controls_target_modules_early_stopping_checkpointing_memory_monitor(tokenized, tmp_path):
    import mlflow

    project = copy_project(tokenized[0], tmp_path)
    out = repro(
        project,
        [
            *tiny_overrides(tokenized[1]),
            "method.target_modules=[q_proj,v_proj]",
            "method.r=4",
            "train.max_steps=30",
            "train.eval_steps=3",
            "train.save_steps=3",
            "train.early_stopping_patience=1",
            "train.early_stopping_threshold=10.0",
            "train.gradient_checkpointing=true",
            "train.gradient_accumulation_steps=2",
            "train.monitor_memory=true",
        ],
    )
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4
    # no evaluation can improve by 10 nats on the base's (step 0): stopped at the next one (step 3), not max_steps
    assert out["provenance"]["metrics"]["steps"] == 3
    assert out["provenance"]["validation"]["stopped_early"] is True
    assert out["provenance"]["config"]["train"]["gradient_checkpointing"] == "true"
    assert out["provenance"]["metrics"]["gradient_checkpointing"] == 1.0
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    logged = mlflow.get_run(out["provenance"]["mlflow"]["run_id"]).data.metrics
    assert {"memory/load/rss_mb", "memory/prepared/rss_mb", "memory/rss_mb", "memory/peak_rss_mb"} <= set(logged)


@pytest.mark.pipeline
@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "gpt2"])
def test_each_causal_architecture_runs_the_pipeline(tmp_path, arch):
    model_dir = save_tiny_model(tmp_path / f"tiny-{arch}", sample_texts(), arch)
    project = make_project(tmp_path / "project", tiny_overrides(model_dir))
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    provenance = json.loads((project / "models/adapter/provenance.json").read_text())
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    expected = {
        "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
        "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
        "gpt2": ["c_attn", "c_fc", "c_proj"],
    }
    assert sorted(config["target_modules"]) == expected[arch]
    assert json.loads((project / "models/base/config.json").read_text())["model_type"] == arch
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert provenance["parameters"]["trainable"] > 0


def test_continued_pretraining_on_raw_text(tokenized, tmp_path):
    project = copy_project(tokenized[0], tmp_path)
    out = repro(project, [*tiny_overrides(tokenized[1]), "data=handbook_text"])
    assert "Running stage 'tokenize'" in out["stdout"]
    stats = json.loads((project / "reports/token_stats.json").read_text())
    assert stats["splits"]["train"]["trained_share"] == 1.0  # every token of raw text carries the loss
    assert out["metrics"]["tuned"]["loss"] < out["metrics"]["base"]["loss"]


@pytest.mark.pipeline
def test_sequence_classification_with_lora_on_distilbert(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny-distilbert", sample_texts(), "distilbert")
    overrides = [
        *tiny_overrides(model_dir),
        "model.task=classification",
        "data=sentiment",
        "train.max_steps=40",
        "train.eval_steps=10",
        "train.learning_rate=3e-3",
        "train.batch_size=8",
        # what this test inspects is the last step's head: on this toy data the init may well be the best on
        # validation, and would then be published, untrained
        "train.select_best=false",
        "train.early_stopping_patience=0",
    ]
    project = make_project(tmp_path / "project", overrides)
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["labels"] == ["negative", "positive"]
    assert set(metrics["tuned"]) == {"accuracy", "f1", "loss"} and 0 <= metrics["tuned"]["f1"] <= 1
    # A random 2-layer encoder with a toy vocabulary learns little from 56 reviews in 40 steps (its loss stays
    # near ln 2); what must hold is that the head trained from the init that "base" is scored with.
    with open(project / "reports/train_log.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 40
    monkeypatch.chdir(project)
    from slmtune.config import load_config
    from slmtune.evaluation import base_model

    base_head = dict(base_model(load_config(), metrics["labels"], 1).classifier.named_parameters())
    trained = {k: v for k, v in adapter_tensors(project).items() if k.startswith("base_model.model.classifier.")}
    assert len(trained) == 2
    for name, tensor in trained.items():
        assert not tensor.allclose(base_head[name.rsplit(".", 1)[-1]]), name
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and {"classifier", "pre_classifier"} <= set(config["modules_to_save"])
    assert sorted(config["target_modules"]) == ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"]
    report = (project / "reports/before_after.md").read_text()
    assert "| Accuracy |" in report and "| Macro F1 |" in report and "(classification)" in report
    generations = [json.loads(line) for line in (project / "reports/generations.jsonl").open()]
    assert {g["reference"] for g in generations} <= {"negative", "positive"} and len(generations) == metrics[
        "test_examples"
    ]


def test_distilbert_parameter_count_matches_the_seed():
    """The seed's LoRA sentiment example: distilbert-base-uncased, r=4 on q_lin, head trained:
    `trainable params: 628,994 || all params: 67,584,004`. Same architecture, random weights."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from slmtune.config import Config, MethodConfig
    from slmtune.modeling import parameter_counts
    from slmtune.training import lora_model

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))  # distilbert-base-uncased's shape
    config = Config(method=MethodConfig(r=4, alpha=32, dropout=0.01, target_modules=["q_lin"]))
    config.model.task = "classification"
    counts = parameter_counts(lora_model(model, config))
    assert counts == {"trainable": 628_994, "total": 67_584_004}


def losses(project: Path) -> list[tuple[int, float]]:
    with open(project / "reports/train_log.csv", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def adapter_weights(project: Path) -> dict:
    return load_file(str(project / "models/adapter/adapter_model.safetensors"))


def kill_at_checkpoint(project: Path, step: int) -> str:
    """Start `dvc repro train`, SIGKILL it and every process under it (the stage; under `accelerate launch`
    the ranks, which torchrun starts in sessions of their own) once checkpoint-`step` is complete (sealed);
    return what it printed."""
    log = project.parent / f"train-until-{step}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            ["dvc", "repro", "train"],
            cwd=project,
            env=stage_env(),
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        sealed = project / "checkpoints/train" / f"checkpoint-{step}" / SEAL_FILE
        deadline = time.monotonic() + 300
        while not sealed.exists():
            assert process.poll() is None, f"training ended before checkpoint-{step}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint-{step} after 300 s"
            time.sleep(0.02)
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for each in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()
        process.wait()
    return log.read_text()


RESUME_BATCHES = {
    # 87 training examples (no augmentation) in batches of 8: 11 steps an epoch, so epoch 1 starts at step 12, epoch
    # 2 at 23
    "packed-token-bounded": ["train.packing=true", "train.max_batch_tokens=128"],
    "length-grouped": ["train.packing=false", "train.group_by_length=true"],
}


@pytest.mark.pipeline
@pytest.mark.parametrize("batches", RESUME_BATCHES.values(), ids=RESUME_BATCHES)
def test_training_killed_anywhere_resumes_to_the_uninterrupted_runs_log_and_bytes(tmp_path, tiny_model_dir, batches):
    """SIGKILL inside epoch 0 (step 6), one step after the first epoch boundary (12) and in epoch 2 (24), with
    LoRA dropout on; when the newest checkpoint is broken (a truncated file, or never sealed) the one before it
    is resumed. The loss log and the adapter bytes equal an uninterrupted run's."""
    overrides = [
        f"model.source={tiny_model_dir}",
        "model.gguf_file=null",
        *TINY_OVERRIDES,
        "train.batch_size=8",
        "train.max_steps=30",
        "train.save_steps=6",
        "train.eval_steps=12",
        "train.save_total_limit=2",
        "method.dropout=0.1",
        "augment.generator=none",  # the knowledge base as it is: epoch boundaries at steps 12 and 23
        *batches,
    ]
    whole = make_project(tmp_path / "whole", overrides)
    run(["dvc", "repro", "tokenize"], whole)
    killed = copy_project(whole, tmp_path / "killed")
    run(["dvc", "repro", "train"], whole)

    checkpoints = killed / "checkpoints/train"
    kill_at_checkpoint(killed, 6)
    assert not (killed / "models/adapter").exists()
    interrupted_run = json.loads((checkpoints / "slmtune-resume.json").read_text())["run_id"]
    assert f"checkpoint-6 (MLflow run {interrupted_run})" in kill_at_checkpoint(killed, 12)
    if "train.packing=true" in batches:
        optimizer = checkpoints / "checkpoint-12/optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:-100])
        broken = "checkpoint-12: optimizer.pt is truncated"
    else:  # as if killed while writing it
        (checkpoints / "checkpoint-12" / SEAL_FILE).unlink()
        broken = "checkpoint-12: incomplete"
    printed = kill_at_checkpoint(killed, 24)
    assert broken in printed and f"checkpoint-6 (MLflow run {interrupted_run})" in printed
    resumed = run(["dvc", "repro", "train"], killed)
    assert f"checkpoint-24 (MLflow run {interrupted_run})" in resumed.stdout + resumed.stderr
    assert not checkpoints.exists()  # removed once the adapter is written
    provenance = json.loads((killed / "models/adapter/provenance.json").read_text())
    assert provenance["resumed"] and provenance["mlflow"]["run_id"] == interrupted_run

    assert [s for s, _ in losses(whole)] == list(range(1, 31))
    assert losses(killed) == losses(whole)
    adapter = "models/adapter/adapter_model.safetensors"
    assert (killed / adapter).read_bytes() == (whole / adapter).read_bytes()


@pytest.mark.pipeline
def test_stale_checkpoints_of_another_config_are_not_resumed(tokenized, tmp_path):
    project = copy_project(tokenized[0], tmp_path)
    overrides = [*tiny_overrides(tokenized[1]), "train.max_steps=60", "train.save_steps=5", "train.eval_steps=5"]
    compose_params(project, project / "params.yaml", overrides)
    kill_at_checkpoint(project, 5)
    compose_params(project, project / "params.yaml", [*overrides, "train.learning_rate=5e-4"])
    result = run(["dvc", "repro", "train"], project)
    assert "resuming" not in result.stdout + result.stderr
    assert not json.loads((project / "models/adapter/provenance.json").read_text())["resumed"]


def test_checkpoints_trained_on_other_data_are_not_resumable(tmp_path):
    """The end-to-end test above changes a setting; a change of data (or base model) reaches the same check
    through the inputs' md5s in the fingerprint."""
    from slmtune.resume import mark_resumable, resumable_run, resume_fingerprint, seal_checkpoint

    inputs = {"tokenized": {"md5": "aa"}, "base_model": {"md5": "bb"}, "prepared": {"md5": "cc"}}
    fingerprint = resume_fingerprint(Config(), inputs)
    checkpoints = tmp_path / "checkpoints"
    for name in inputs:
        (checkpoints / "checkpoint-5").mkdir(parents=True)
        (checkpoints / "checkpoint-5/trainer_state.json").write_text("{}")
        seal_checkpoint(checkpoints / "checkpoint-5")
        mark_resumable(checkpoints, fingerprint, "run-1")
        assert resumable_run(checkpoints, fingerprint)["run_id"] == "run-1"
        other = resume_fingerprint(Config(), {**inputs, name: {"md5": "changed"}})
        assert resumable_run(checkpoints, other) is None and not checkpoints.exists(), name  # discarded


def validation_loss(project: Path, base: Path, adapter: bool = True) -> float:
    from datasets import load_from_disk
    from peft import PeftModel

    from slmtune.evaluation import response_loss
    from slmtune.modeling import load_model, load_tokenizer

    model = load_model(base)
    if adapter:
        model = PeftModel.from_pretrained(model, project / "models/adapter")
    val = load_from_disk(str(project / "data/tokenized"))["val"].select_columns(["input_ids", "labels"])
    return response_loss(model, load_tokenizer(base), val, 8)


WHOLE_SPLIT_BATCH = ["augment.generator=none", "data.every_answer_in_train=false"]
"""The 86 knowledge-base rows as they are: an even split that one batch holds."""


@pytest.mark.pipeline
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_model_dir):
    """DDP over gloo: 2 processes x n/2 examples vs 1 process x n. The global batch is the whole training split,
    so that both see the same examples at every step whatever order each sampler draws (no dropout)."""
    from datasets import load_from_disk

    from slmtune.config import compose_params

    common = [
        f"model.source={tiny_model_dir}",
        "model.gguf_file=null",
        *TINY_OVERRIDES,
        "train.max_steps=10",
        "train.learning_rate=1e-2",
        "method.dropout=0.0",
        "train.save_steps=0",
        "train.precision=fp32",  # bf16 roundings differ with the batch shapes of one and two processes
        "train.max_batch_tokens=64",  # each rank's batch runs in pieces, gradients synchronised after the last
        *WHOLE_SPLIT_BATCH,
    ]
    one = make_project(tmp_path / "one", common)
    run(["dvc", "repro", "tokenize"], one)
    n = len(load_from_disk(str(one / "data/tokenized"))["train"])
    assert n % 2 == 0
    compose_params(one, one / "params.yaml", [*common, f"train.batch_size={n}"])
    two = make_project(tmp_path / "two", [*common, f"train.batch_size={n // 2}", "train.num_processes=2"])
    run(["dvc", "repro", "train"], one)
    launched = run(["dvc", "repro", "train"], two)
    assert "accelerate.commands.launch --num_processes 2" in launched.stdout + launched.stderr
    assert [s for s, _ in losses(one)] == [s for s, _ in losses(two)] == list(range(1, 11))
    # The gradient is token-weighted across both processes (the Trainer gathers the label count), so the two
    # runs differ by float summation order only. Two processes each training alone on all the data (what
    # torchrun without ACCELERATE_USE_CPU gave) differ in the LoRA B weights by ~25% and in the logged loss
    # from step 1 (each step an epoch of two batches).
    for (_, a), (_, b) in zip(losses(one), losses(two)):
        assert b == pytest.approx(a, rel=1e-5)
    ours, theirs = adapter_weights(two), adapter_weights(one)
    for name in ours:
        # relative to the tensor, not per element: Adam's step on an element whose gradient is ~0 follows the sign
        # of float noise (measured on an Intel Xeon: 1 element of 1,024 off by 1.6e-5, the tensor by 6e-6)
        assert (ours[name] - theirs[name]).norm() <= 1e-4 * theirs[name].norm(), name
    final = [validation_loss(p, tiny_model_dir) for p in (one, two)]
    gained = validation_loss(one, tiny_model_dir, adapter=False) - final[0]
    assert gained > 0.05 and final[1] == pytest.approx(final[0], abs=1e-3 * gained)


FSDP2_ON_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
"""


@pytest.mark.pipeline
def test_fsdp2_on_two_cpu_processes_trains_like_one_and_resumes_from_its_sharded_checkpoint(tmp_path, tiny_model_dir):
    """`accelerate launch` with an FSDP2 config, two CPU processes over gloo with n/2 examples each, against one
    process with n: every parameter sharded (each checkpoint holds one shard per rank), killed once checkpoint-6
    exists and resumed from that sharded checkpoint, and still the one process's loss at every step; rank 0
    saves the adapter gathered from the shards. The global batch is the whole training split, as in the DDP
    test (a last, short batch of an epoch would be evened out across the ranks with repeated examples)."""
    from datasets import load_from_disk
    from peft import PeftModel

    config_file = tmp_path / "fsdp2.yaml"
    config_file.write_text(FSDP2_ON_CPU)
    common = [
        f"model.source={tiny_model_dir}",
        "model.gguf_file=null",
        *TINY_OVERRIDES,
        "train.max_steps=8",
        "train.save_steps=3",
        "train.eval_steps=4",
        "train.learning_rate=1e-2",
        "method.dropout=0.0",  # each rank draws its own dropout masks
        "train.precision=fp32",  # bf16 roundings differ with the batch shapes of one and two processes
        *WHOLE_SPLIT_BATCH,
    ]
    one = make_project(tmp_path / "one", common)
    run(["dvc", "repro", "tokenize"], one)
    n = len(load_from_disk(str(one / "data/tokenized"))["train"])
    assert n % 2 == 0
    compose_params(one, one / "params.yaml", [*common, f"train.batch_size={n}"])
    two = copy_project(one, tmp_path / "two")
    sharded = [f"train.batch_size={n // 2}", "train.num_processes=2", f"train.accelerate_config={config_file}"]
    compose_params(two, two / "params.yaml", [*common, *sharded])
    run(["dvc", "repro", "train"], one)

    printed = kill_at_checkpoint(two, 6)
    assert "parameters sharded over 2 processes (FSDP2)" in printed
    checkpoint = two / "checkpoints/train/checkpoint-6"
    for kind in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: a file per rank
        assert sorted(p.name for p in (checkpoint / kind).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "adapter_model.safetensors").exists()  # DDP would save the whole adapter
    resumed = run(["dvc", "repro", "train"], two)
    said = resumed.stdout + resumed.stderr
    assert said.count("resuming from the last checkpoint, checkpoints/train/checkpoint-6") == 1  # rank 0 alone

    assert [s for s, _ in losses(one)] == [s for s, _ in losses(two)] == list(range(1, 9))
    for (_, a), (_, b) in zip(losses(one), losses(two)):
        assert b == pytest.approx(a, rel=1e-5)
    ours, theirs = adapter_weights(two), adapter_weights(one)
    assert sorted(ours) == sorted(theirs)
    for name in ours:  # float summation order differs (gradients reduce-scattered); Adam scales tiny gradients up
        assert (ours[name] - theirs[name]).abs().max() <= 1e-3 * theirs[name].abs().max(), name
    metrics = json.loads((two / "models/adapter/provenance.json").read_text())["metrics"]
    assert metrics["sharded"] == 1.0 and metrics["processes"] == 2.0
    PeftModel.from_pretrained(load_model(tiny_model_dir), two / "models/adapter")  # a standard adapter


def test_an_accelerate_config_that_cannot_run_on_cpu_is_refused_before_launch(tmp_path, monkeypatch):
    from slmtune.launch import check_accelerate_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = Config()
    config.train.accelerate_config = str(tmp_path / "fsdp.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        check_accelerate_config(config)
    for change, refusal in (("fsdp_version: 2", "fsdp_version: 1"), ("num_machines", "use_cpu: true\nnum_machines")):
        (tmp_path / "fsdp.yaml").write_text(FSDP2_ON_CPU.replace(change, refusal))
        with pytest.raises(ConfigError, match="fsdp.yaml: (FSDP on CPU processes needs FSDP2|use_cpu: true)"):
            check_accelerate_config(config)
    (tmp_path / "fsdp.yaml").write_text(FSDP2_ON_CPU)
    check_accelerate_config(config)


@pytest.mark.pipeline
def test_push_to_hub_offline_fails_before_training(tokenized, tmp_path):
    project = copy_project(tokenized[0], tmp_path)
    overrides = [*tiny_overrides(tokenized[1]), "train.push_to_hub=true", "train.hub_model_id=someone/tiny-lora"]
    compose_params(project, project / "params.yaml", overrides)
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert (
        "error: params.yaml: train.push_to_hub=true but the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
        in result.stderr
    )
    assert "trainable params" not in result.stdout and not (project / "models/adapter").exists()
    missing_id = subprocess.run(
        [*SLMTUNE, "params", "train.push_to_hub=true", "--root", str(project)],
        capture_output=True,
        text=True,
        env=stage_env(),
    )
    assert missing_id.returncode == 1 and "train.push_to_hub=true needs train.hub_model_id" in missing_id.stderr
