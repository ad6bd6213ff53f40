"""A killed train stage resumes from its last checkpoint; two data-parallel processes train like one."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, make_project, run, stage_env


def losses(project: Path) -> list[tuple[int, float]]:
    with open(project / "reports/train_log.csv", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def adapter_weights(project: Path) -> dict:
    return load_file(str(project / "models/adapter/adapter_model.safetensors"))


def kill_at_first_checkpoint(project: Path, step: int) -> None:
    """Start `dvc repro train`, SIGKILL it (and its stage) once checkpoint-`step` is complete."""
    process = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=stage_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = project / "checkpoints/train" / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_training_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    overrides = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES,
                 "train.max_steps=60", "train.save_steps=5", "train.eval_steps=5", "train.save_total_limit=2"]  # fmt: skip
    whole = make_project(tmp_path / "whole", overrides)
    run(["dvc", "repro", "train"], whole)

    killed = make_project(tmp_path / "killed", overrides)
    run(["dvc", "repro", "tokenize"], killed)
    kill_at_first_checkpoint(killed, 5)
    assert not (killed / "models/adapter").exists()
    interrupted_run = json.loads((killed / "checkpoints/train/slmtune-resume.json").read_text())["run_id"]

    resumed = run(["dvc", "repro", "train"], killed)
    assert "resuming from the last checkpoint" in resumed.stdout + resumed.stderr
    assert not (killed / "checkpoints/train").exists()  # removed once the adapter is written
    provenance = json.loads((killed / "models/adapter/provenance.json").read_text())
    assert provenance["resumed"] and provenance["mlflow"]["run_id"] == interrupted_run

    assert [s for s, _ in losses(killed)] == [s for s, _ in losses(whole)] == list(range(1, 61))
    assert losses(killed)[-1][1] == pytest.approx(losses(whole)[-1][1], rel=1e-5)
    ours, theirs = adapter_weights(killed), adapter_weights(whole)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].allclose(theirs[name], atol=1e-6), name


def test_stale_checkpoints_of_another_config_are_not_resumed(tmp_path, tiny_model_dir):
    overrides = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES,
                 "train.max_steps=60", "train.save_steps=5", "train.eval_steps=5"]  # fmt: skip
    project = make_project(tmp_path / "project", overrides)
    run(["dvc", "repro", "tokenize"], project)
    kill_at_first_checkpoint(project, 5)
    from slmtune.config import compose_params

    compose_params(project, project / "params.yaml", [*overrides, "train.learning_rate=5e-4"])
    result = run(["dvc", "repro", "train"], project)
    assert "resuming" not in result.stdout + result.stderr
    assert not json.loads((project / "models/adapter/provenance.json").read_text())["resumed"]


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


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_model_dir):
    """DDP over gloo: 2 processes x n/2 examples vs 1 process x n. The global batch is the whole training split,
    so that both see the same examples at every step whatever order each sampler draws (no dropout)."""
    from datasets import load_from_disk

    from slmtune.config import compose_params

    common = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES, "train.max_steps=10",
              "train.learning_rate=1e-2", "method.dropout=0.0", "train.save_steps=0"]  # fmt: skip
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
        assert ours[name].allclose(theirs[name], rtol=1e-3, atol=1e-6), name
    final = [validation_loss(p, tiny_model_dir) for p in (one, two)]
    gained = validation_loss(one, tiny_model_dir, adapter=False) - final[0]
    assert gained > 0.05 and final[1] == pytest.approx(final[0], abs=1e-3 * gained)
