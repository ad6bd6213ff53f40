"""Using the fine-tuned model: chat in a pseudo-terminal, batch generation, merge with parity, GGUF export
with a round trip, push_to_hub failing early offline; the evaluation metrics, per-category table, quality
gate and report plots. All on a tiny Llama trained by the real `dvc repro`."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SLMTUNE, TINY_OVERRIDES, Terminal, make_project, run, stage_env
from slmtune.config import compose_params

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny-Llama project on the Dolly preset (which has categories), through every stage once."""
    project = make_project(tmp_path_factory.mktemp("use") / "project",
                           [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES, "data=dolly",
                            "train.max_steps=12", "train.learning_rate=2e-3"])  # fmt: skip
    run(["dvc", "repro"], project)
    return project


def copy(project: Path, tmp_path: Path) -> Path:
    return shutil.copytree(project, tmp_path / "project", symlinks=True)


# --- metrics -------------------------------------------------------------------------------------------


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(REPO / "src/slmtune/metrics" / name))


def test_bleu_matches_nltk_corpus_bleu_and_is_one_for_identical_text():
    from nltk.translate.bleu_score import corpus_bleu

    from slmtune.metrics.bleu.bleu import tokenize

    predictions = ["the cat sat on the mat today", "a dog barked loudly at the night sky", "all staff get 27 days of leave"]
    references = ["the cat sat on the mat", "the dog barked at the night sky", "staff get 27 days of paid leave"]
    ours = load_metric("bleu").compute(predictions=predictions, references=references)
    theirs = corpus_bleu([[tokenize(r)] for r in references], [tokenize(p) for p in predictions])
    assert ours["bleu"] == pytest.approx(theirs, rel=1e-9) and 0 < ours["bleu"] < 1
    same = load_metric("bleu").compute(predictions=references, references=references)
    assert same["bleu"] == pytest.approx(1.0) and same["bleu_per_example"] == pytest.approx([1.0] * 3)


def test_rouge_exact_match_and_token_f1_on_known_cases():
    rouge = load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat sat down"])
    assert rouge["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)  # P 3/3, R 3/4
    assert rouge["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # P 2/2, R 2/3
    match = load_metric("answer_match").compute(predictions=["The Cat!", "Paris is big", ""], references=["cat", "big Paris city", "x"])
    assert match["exact_match_per_example"] == [1.0, 0.0, 0.0]
    assert match["token_f1_per_example"] == pytest.approx([1.0, 2 * (2 / 3) * (2 / 3) / (4 / 3), 0.0])


# --- evaluation, gate and report ----------------------------------------------------------------------


def test_evaluation_has_every_metric_per_category_and_the_merge_parity(trained):
    metrics = json.loads((trained / "reports/metrics.json").read_text())
    expected = {"loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "contains"}
    assert set(metrics["base"]) == set(metrics["tuned"]) == expected
    assert metrics["generation"] == {"do_sample": False, "num_beams": 1, "max_new_tokens": 8, "batch_size": 8, "seed": 42, "stop": "eos"}
    categories = metrics["by_category"]
    prepared = [json.loads(line) for line in (trained / "data/prepared/test.jsonl").read_text().splitlines()]
    assert sum(entry["examples"] for entry in categories.values()) == metrics["test_examples"] == len(prepared)
    assert set(categories) == {r["category"] for r in prepared}
    generations = [json.loads(line) for line in (trained / "reports/generations.jsonl").read_text().splitlines()]
    for name, entry in categories.items():  # each category's mean is the mean of its rows
        rows = [g for g in generations if g["category"] == name]
        assert entry["tuned"]["rougeL"] == pytest.approx(sum(g["tuned_rougeL"] for g in rows) / len(rows))
    parity = metrics["merge_parity"]
    assert parity["ok"] and parity["loss_difference"] <= 1e-4 and parity["identical_answers"] == parity["answers"]
    assert parity["adapter_loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-4)


def test_report_shows_plots_full_metric_table_categories_and_checks(trained):
    report = (trained / "reports/before_after.md").read_text()
    for figure in ("loss_curve.png", "metrics_bars.png"):
        data = (trained / "reports" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({figure})" in report
    for label in ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Exact match", "Token F1", "Perplexity"):
        assert f"| {label}" in report
    assert "## By category" in report and "Merge parity: **PASS**" in report and "Quality gate: off" in report
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{trained}/mlflow.db")
    run_id = json.loads((trained / "reports/metrics.json").read_text())["mlflow_run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reports")}
    assert {"reports/loss_curve.png", "reports/metrics_bars.png", "reports/before_after.md"} <= logged


def test_quality_gate_fails_the_evaluate_stage_and_writes_nothing(trained, tmp_path, tiny_model_dir):
    project = copy(trained, tmp_path)
    base = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES, "data=dolly"]
    before = (project / "reports/metrics.json").read_bytes()
    # Full fine-tuning at a learning rate of 1 wrecks the model: its test loss rises far above the base's.
    compose_params(project, project / "params.yaml", [*base, "method=full", "train.learning_rate=1.0", "eval.gate_metric=loss"])
    failed = run(["dvc", "repro", "evaluate"], project, check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quality gate failed: tuned loss" in errors[0] and "eval.gate_max_drop=0.0" in errors[0]
    # DVC removes a stage's old outputs before running it; the stage itself leaves no new or partial file
    metrics_file = project / "reports/metrics.json"
    assert not metrics_file.exists() or metrics_file.read_bytes() == before
    assert not list((project / "reports").glob(".*.tmp"))
    # The trained adapter of the fixture lowers the loss a little: the gate passes and the report says so.
    compose_params(project, project / "params.yaml", [*base, "train.max_steps=12", "train.learning_rate=2e-3", "eval.gate_metric=loss"])
    result = run(["dvc", "repro"], project)
    assert "Running stage 'train'" not in result.stdout  # restored from the cache
    gate = json.loads((project / "reports/metrics.json").read_text())["quality_gate"]
    assert gate["passed"] and gate["drop"] < 0 and gate["max_drop"] == 0.0
    assert "Quality gate on loss: **PASS**" in (project / "reports/before_after.md").read_text()


def test_check_gate_directions():
    from slmtune.config import Config
    from slmtune.evaluation import QualityGateError, check_gate

    config = Config()
    config.eval.gate_metric, config.eval.gate_max_drop = "rougeL", 0.05
    assert check_gate(config, {"base": {"rougeL": 0.30}, "tuned": {"rougeL": 0.26}})["passed"]  # drop 0.04
    with pytest.raises(QualityGateError, match="tuned rougeL 0.2400 is 0.0600 lower than the base's 0.3000"):
        check_gate(config, {"base": {"rougeL": 0.30}, "tuned": {"rougeL": 0.24}})
    config.eval.gate_metric = "perplexity"
    assert check_gate(config, {"base": {"perplexity": 9.0}, "tuned": {"perplexity": 3.0}})["drop"] == -6.0
    with pytest.raises(QualityGateError, match="higher than the base's"):
        check_gate(config, {"base": {"perplexity": 9.0}, "tuned": {"perplexity": float("nan")}})


def test_gate_metric_must_exist_for_the_task(tmp_path):
    result = subprocess.run([*SLMTUNE, "params", "eval.gate_metric=accuracy", "--root", str(REPO)], capture_output=True,
                            text=True, env=stage_env())  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "eval.gate_metric must be one of loss, perplexity, bleu, rouge1, rouge2, rougeL" in result.stderr


# --- chat and generate --------------------------------------------------------------------------------


@pytest.mark.parametrize("leave", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_chat_in_a_terminal_answers_keeps_history_and_leaves_cleanly(trained, leave):
    terminal = Terminal(trained, "--max-new-tokens", "6")
    terminal.read_until("you> ")
    terminal.type("What is the capital of France?\r")
    first = terminal.read_until("you> ")
    assert "model> " in first
    terminal.type("And of Spain?\r")
    assert "model> " in terminal.read_until("you> ")
    terminal.type(leave)
    assert terminal.exit_status() == 0
    assert "bye" in terminal.seen and "Traceback" not in terminal.seen


def test_chat_prompt_carries_the_history_in_the_training_template(trained):
    from slmtune.config import load_config
    from slmtune.inference import prompt_ids
    from slmtune.modeling import load_tokenizer

    config = load_config(trained / "params.yaml")
    tokenizer = load_tokenizer(trained / "models/base")
    history = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
               {"role": "user", "content": "second question"}]  # fmt: skip
    text = tokenizer.decode(prompt_ids(history, config.data, tokenizer))
    expected = tokenizer.apply_chat_template([*history], add_generation_prompt=True, tokenize=False)
    assert text == expected and text.index("first answer") < text.index("second question")


def test_generate_answers_a_prompt_file_in_batches(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is Dolly?\n\nName a colour.\nHow many legs has a cat?\n")
    batched, single = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    run([*SLMTUNE, "generate", str(prompts), "-o", str(batched), "--batch-size", "3", "--max-new-tokens", "6"], trained)
    run([*SLMTUNE, "generate", str(prompts), "-o", str(single), "--batch-size", "1", "--max-new-tokens", "6"], trained)
    rows = [json.loads(line) for line in batched.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is Dolly?", "Name a colour.", "How many legs has a cat?"]
    assert rows == [json.loads(line) for line in single.read_text().splitlines()]  # batching changes nothing


def test_generate_rejects_a_bad_prompt_line_and_writes_nothing(trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    result = run([*SLMTUNE, "generate", str(prompts), "-o", str(tmp_path / "out.jsonl")], trained, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {prompts}:2: no 'prompt' (or 'instruction') text; give each line one."
    assert not (tmp_path / "out.jsonl").exists()


# --- merge and export ---------------------------------------------------------------------------------


def test_merge_saves_a_standalone_model_with_parity(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    result = run([*SLMTUNE, "merge", "-o", str(output)], trained)
    assert "merge parity: PASS" in result.stdout
    parity = json.loads((output / "parity.json").read_text())
    assert parity["ok"] and parity["loss_difference"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no peft
    assert type(model).__name__ == "LlamaForCausalLM" and (output / "tokenizer.json").is_file()
    assert json.loads((output / "provenance.json").read_text())["mlflow"]["run_id"]


def test_merge_by_mlflow_run_id_and_refuses_a_missing_adapter(trained, tmp_path):
    run_id = json.loads((trained / "models/adapter/provenance.json").read_text())["mlflow"]["run_id"]
    result = run([*SLMTUNE, "merge", "--adapter", run_id, "-o", str(tmp_path / "m")], trained)
    assert "merge parity: PASS" in result.stdout
    missing = run([*SLMTUNE, "merge", "--adapter", "0123456789abcdef", "-o", str(tmp_path / "n")], trained, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: 0123456789abcdef: not a folder, and no MLflow run")
    assert not (tmp_path / "n").exists()


def test_gguf_export_round_trips_through_transformers(trained, tmp_path):
    from gguf import GGUFReader

    merged = tmp_path / "merged"
    run([*SLMTUNE, "merge", "-o", str(merged)], trained)
    output = tmp_path / "gguf"
    result = run([*SLMTUNE, "export", "--model", str(merged), "-o", str(output)], trained)
    files = json.loads((output / "export.json").read_text())["files"]
    assert [f["file"] for f in files] == ["model-f16.gguf", "model-q8_0.gguf"]
    f16, q8 = files
    assert f16["ok"] and f16["relative_difference"] < 0.01 and f16["tokenizer_identical"]
    assert q8["ok"] and q8["bytes"] < f16["bytes"]
    reader = GGUFReader(output / "model-q8_0.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert result.stdout.count(": PASS") == 2


def test_export_needs_a_merged_model(trained, tmp_path):
    result = run([*SLMTUNE, "export", "--model", str(tmp_path / "nothing")], trained, check=False)
    assert result.returncode == 1 and "Run `slmtune merge` first" in result.stderr


# --- push_to_hub -------------------------------------------------------------------------------------


def test_push_to_hub_offline_fails_before_training(tmp_path, tiny_model_dir):
    overrides = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES, "train.push_to_hub=true",
                 "train.hub_model_id=someone/tiny-lora"]  # fmt: skip
    project = make_project(tmp_path / "p", overrides)
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: train.push_to_hub=true but the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)" in result.stderr
    assert "trainable params" not in result.stdout and not (project / "models/adapter").exists()
    missing_id = subprocess.run([*SLMTUNE, "params", "train.push_to_hub=true", "--root", str(project)],
                                capture_output=True, text=True, env=stage_env())  # fmt: skip
    assert missing_id.returncode == 1 and "train.push_to_hub=true needs train.hub_model_id" in missing_id.stderr
