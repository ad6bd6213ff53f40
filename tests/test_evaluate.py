"""The evaluate stage: the metrics against independent implementations and known cases, response loss,
batched generation, every metric per category, merge parity, the quality gate, and its MLflow runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DATA, REPO, SLMTUNE, TINY_OVERRIDES, copy_project, run, splits_for, stage_env
from slmtune.config import compose_params
from slmtune.evaluation import response_loss, response_losses
from slmtune.facts import check_answer, stated_facts
from slmtune.inference import generate_answers
from slmtune.modeling import load_model
from slmtune.prompting import generation_prompt


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(REPO / "src/slmtune/metrics" / name))


def test_bleu_matches_nltk_corpus_bleu_and_is_one_for_identical_text():
    from nltk.translate.bleu_score import corpus_bleu

    from slmtune.metrics.bleu.bleu import tokenize

    predictions = [
        "the cat sat on the mat today",
        "a dog barked loudly at the night sky",
        "all staff get 27 days of leave",
    ]
    references = ["the cat sat on the mat", "the dog barked at the night sky", "staff get 27 days of paid leave"]
    ours = load_metric("bleu").compute(predictions=predictions, references=references)
    theirs = corpus_bleu([[tokenize(r)] for r in references], [tokenize(p) for p in predictions])
    assert ours["bleu"] == pytest.approx(theirs, rel=1e-9) and 0 < ours["bleu"] < 1
    same = load_metric("bleu").compute(predictions=references, references=references)
    assert same["bleu"] == pytest.approx(1.0) and same["bleu_per_example"] == pytest.approx([1.0] * 3)


def test_bleu_brevity_penalty_of_short_answers_matches_nltk_and_the_formula():
    """Predictions shorter than their references: the brevity penalty exp(1 - r/c) is below 1 and counts."""
    from nltk.translate.bleu_score import corpus_bleu

    from slmtune.metrics.bleu.bleu import tokenize

    predictions = ["the cat sat on the mat", "staff get 27 days of leave"]
    references = ["the cat sat on the red mat in the hall", "all staff get 27 days of paid annual leave"]
    ours = load_metric("bleu").compute(predictions=predictions, references=references)
    theirs = corpus_bleu([[tokenize(r)] for r in references], [tokenize(p) for p in predictions])
    c, r = 12, 19  # words in the predictions and in the references
    assert ours["length_ratio"] == pytest.approx(c / r)
    assert ours["brevity_penalty"] == pytest.approx(math.exp(1 - r / c))
    assert ours["bleu"] == pytest.approx(theirs, rel=1e-9) and ours["bleu"] < 0.5


def test_rouge_exact_match_and_token_f1_on_known_cases():
    rouge = load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat sat down"])
    assert rouge["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)  # P 3/3, R 3/4
    assert rouge["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # P 2/2, R 2/3
    match = load_metric("answer_match").compute(
        predictions=["The Cat!", "Paris is big", ""], references=["cat", "big Paris city", "x"]
    )
    assert match["exact_match_per_example"] == [1.0, 0.0, 0.0]
    assert match["token_f1_per_example"] == pytest.approx([1.0, 2 * (2 / 3) * (2 / 3) / (4 / 3), 0.0])


def test_rouge_l_is_the_longest_common_subsequence_and_words_are_stemmed():
    rouge = load_metric("rouge").compute(
        predictions=["the cat was found under the bed", "cats running quickly"],
        references=["the cat was under the bed", "cat runs quickly"],
    )
    # LCS "the cat was under the bed": P 6/7, R 6/6; bigram overlap 4 of 6 and 4 of 5
    assert rouge["rougeL_per_example"][0] == pytest.approx(2 * (6 / 7) / (6 / 7 + 1))
    assert rouge["rouge2_per_example"][0] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    # Porter stemming: cats -> cat, running and runs -> run
    assert rouge["rouge1_per_example"][1] == pytest.approx(1.0)
    assert rouge["rougeL"] == pytest.approx((2 * (6 / 7) / (6 / 7 + 1) + 1.0) / 2)


def test_contains_match_normalises_case_and_punctuation_only():
    result = load_metric("contains_match").compute(
        predictions=["Staff get 27 Days, paid.", "They get 27-day leave", "twenty seven days", "27 days"],
        references=["27 days", "27 days", "27 days", "Staff get 27 days of leave"],
    )
    assert result["contains_per_example"] == [1, 0, 0, 0] and result["contains"] == 0.25


def test_classification_accuracy_and_macro_f1_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    references = ["billing", "billing", "bug", "refund", "bug", "billing", "spam"]
    predictions = ["billing", "bug", "bug", "bug", "refund", "billing", "billing"]
    ours = load_metric("classification").compute(predictions=predictions, references=references)
    # billing: P 2/3 R 2/3; bug: P 1/3 R 1/2 -> 0.4; refund: P 0; spam: never predicted -> 0
    assert ours["f1"] == pytest.approx((2 / 3 + 0.4 + 0.0 + 0.0) / 4)
    assert ours["f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    assert ours["accuracy"] == pytest.approx(accuracy_score(references, predictions)) == pytest.approx(3 / 7)


def test_response_loss_matches_the_models_own_loss(tiny_model_dir, tiny_tokenizer, records):
    model = load_model(tiny_model_dir)
    example = splits_for(records, tiny_tokenizer, n_train=1, n_val=0)["train"]
    ours = response_loss(model, tiny_tokenizer, example, batch_size=1)
    row = example[0]
    theirs = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_response_loss_ignores_padding_and_batching(tiny_model_dir, tiny_tokenizer, records):
    """Each row's summed loss and token count (per-example and per-category figures) whatever its batch."""
    model = load_model(tiny_model_dir)
    data = splits_for(records, tiny_tokenizer, n_train=6, n_val=0)["train"]
    alone, batched = (response_losses(model, tiny_tokenizer, data, size) for size in (1, 4))
    assert [n for _, n in alone] == [n for _, n in batched] == [sum(x != -100 for x in r["labels"][1:]) for r in data]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone], rel=1e-5)
    assert response_loss(model, tiny_tokenizer, data, 1) == pytest.approx(
        response_loss(model, tiny_tokenizer, data, 4), rel=1e-5
    )


def test_batched_generation_equals_one_by_one(tiny_model_dir, tiny_tokenizer, records):
    model = load_model(tiny_model_dir)
    prompts = [generation_prompt(r, DATA, tiny_tokenizer, 6)[1] for r in records[:5]]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise left padding"
    batched = generate_answers(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=5)
    single = [generate_answers(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_evaluation_has_every_metric_per_category_and_the_merge_parity(trained):
    metrics = json.loads((trained / "reports/metrics.json").read_text())
    expected = {"loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "contains"}
    assert set(metrics["base"]) == set(metrics["tuned"]) == expected | {"fact_accuracy"}
    assert metrics["generation"] == {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": 8,
        "batch_size": 32,
        "seed": 42,
        "stop": "eos",
    }
    categories = metrics["by_category"]
    prepared = [json.loads(line) for line in (trained / "data/prepared/test.jsonl").read_text().splitlines()]
    assert sum(entry["examples"] for entry in categories.values()) == metrics["test_examples"] == len(prepared)
    assert set(categories) == {r["category"] for r in prepared}
    generations = [json.loads(line) for line in (trained / "reports/generations.jsonl").read_text().splitlines()]
    for name, entry in categories.items():  # each category's mean is the mean of its rows
        rows = [g for g in generations if g["category"] == name]
        assert entry["tuned"]["rougeL"] == pytest.approx(sum(g["tuned_rougeL"] for g in rows) / len(rows))
    # fact accuracy: the share of answers with key facts that state them all, each answer's check recorded
    checked = [g for g in generations if g["facts"]]
    assert len(checked) == metrics["fact_examples"] > 0
    for model in ("base", "tuned"):
        assert metrics[model]["fact_accuracy"] == sum(g[f"{model}_facts"]["right"] for g in checked) / len(checked)
        for g in checked:
            check = check_answer(g[model], stated_facts(g["facts"]))
            assert g[f"{model}_facts"]["right"] == check.right and g[f"{model}_facts"]["missing"] == check.missing
    assert metrics["validation"]["fact_examples"] > 0 and 0 <= metrics["validation"]["fact_accuracy"] <= 1
    parity = metrics["merge_parity"]
    assert parity["ok"] and parity["loss_difference"] <= 1e-4 and parity["identical_answers"] == parity["answers"]
    assert parity["adapter_loss"] == pytest.approx(metrics["tuned"]["loss"], abs=1e-4)
    # in MLflow the categories are one table, not a one-bar chart per category, model and metric
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    logged = client.get_run(metrics["mlflow_run_id"])
    assert not [name for name in logged.data.metrics if name.count("/") > 2]
    table = json.loads(Path(client.download_artifacts(metrics["mlflow_run_id"], "test/by_category.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {(r["category"], r["model"]) for r in rows} == {(c, m) for c in categories for m in ("base", "tuned")}
    first = next(r for r in rows if r["model"] == "tuned")
    assert first["loss"] == pytest.approx(categories[first["category"]]["tuned"]["loss"])


def test_quality_gate_fails_the_evaluate_stage_and_writes_nothing(trained, tmp_path, tiny_model_dir):
    project = copy_project(trained, tmp_path)
    base = [f"model.source={tiny_model_dir}", "model.gguf_file=null", *TINY_OVERRIDES, "data=dolly"]
    before = {name: (project / "reports" / name).read_bytes() for name in ("metrics.json", "generations.jsonl")}
    # Full fine-tuning at a learning rate of 1 wrecks the model: its test loss rises far above the base's (the
    # best-validation weights would be the base's own: publishing the last step's is what makes it worse).
    wreck = [*base, "method=full", "train.learning_rate=1.0", "train.select_best=false"]
    compose_params(project, project / "params.yaml", [*wreck, "eval.gate_metric=loss"])
    run(["dvc", "repro", "train"], project)
    # The stage itself, not `dvc repro` (which deletes a stage's outputs before running it): the previous
    # metrics and answers must survive a failed gate byte for byte.
    failed = run([sys.executable, "-P", "stages/evaluate.py"], project, check=False)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quality gate failed: tuned loss" in errors[0] and "eval.gate_max_drop=0.0" in errors[0]
    assert {name: (project / "reports" / name).read_bytes() for name in before} == before
    assert not list((project / "reports").glob(".*.tmp"))
    # The gate on the verdict fails the same way, with the verdict's sentence.
    compose_params(project, project / "params.yaml", [*wreck, "eval.gate_metric=verdict"])
    failed = run([sys.executable, "-P", "stages/evaluate.py"], project, check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and len(errors) == 1
    assert "quality gate failed: Worse than the base on the held-out test split" in errors[0]
    assert {name: (project / "reports" / name).read_bytes() for name in before} == before
    # Without a gate the run completes, and the report's first line says it made the model worse, and why.
    compose_params(project, project / "params.yaml", wreck)
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    first = (project / "reports/before_after.md").read_text().splitlines()[0]
    assert first == f"**Verdict:** {metrics['verdict']['sentence']}"
    assert first.startswith("**Verdict:** Worse than the base on the held-out test split") and "Likely cause: " in first
    assert metrics["verdict"]["result"] == "worse" and metrics["verdict"]["better"] == 0.0
    tags = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["slmtune.verdict"] == "worse" and tags["slmtune.verdict_text"] == metrics["verdict"]["sentence"]
    # The trained adapter of the fixture lowers the loss a little: the gate passes and the report says so.
    compose_params(
        project,
        project / "params.yaml",
        [*base, "train.max_steps=12", "train.learning_rate=2e-3", "eval.gate_metric=loss"],
    )
    result = run(["dvc", "repro"], project)
    assert "Running stage 'train'" not in result.stdout  # restored from the cache
    gate = json.loads((project / "reports/metrics.json").read_text())["quality_gate"]
    assert gate["passed"] and gate["drop"] < 0 and gate["max_drop"] == 0.0
    assert "Quality gate on loss: **PASS**" in (project / "reports/before_after.md").read_text()


def test_check_gate_directions():
    from slmtune.config import Config
    from slmtune.errors import QualityGateError
    from slmtune.evaluation import check_gate

    config = Config()
    config.eval.gate_metric, config.eval.gate_max_drop = "rougeL", 0.05
    assert check_gate(config, {"base": {"rougeL": 0.30}, "tuned": {"rougeL": 0.26}})["passed"]  # drop 0.04
    with pytest.raises(QualityGateError, match="tuned rougeL 0.2400 is 0.0600 lower than the base's 0.3000"):
        check_gate(config, {"base": {"rougeL": 0.30}, "tuned": {"rougeL": 0.24}})
    config.eval.gate_metric = "perplexity"
    assert check_gate(config, {"base": {"perplexity": 9.0}, "tuned": {"perplexity": 3.0}})["drop"] == -6.0
    with pytest.raises(QualityGateError, match="higher than the base's"):
        check_gate(config, {"base": {"perplexity": 9.0}, "tuned": {"perplexity": float("nan")}})
    config.eval.gate_metric, config.eval.gate_max_drop = "fact_accuracy", 0.0
    assert check_gate(config, {"base": {"fact_accuracy": 0.0}, "tuned": {"fact_accuracy": 0.8}})["passed"]
    with pytest.raises(QualityGateError, match="tuned fact_accuracy 0.4000 is 0.1000 lower than the base's 0.5000"):
        check_gate(config, {"base": {"fact_accuracy": 0.5}, "tuned": {"fact_accuracy": 0.4}})
    with pytest.raises(QualityGateError, match="fact_accuracy has no value: no test answer has key facts"):
        check_gate(config, {"base": {"loss": 1.0}, "tuned": {"loss": 0.5}})


def test_check_gate_on_the_verdict():
    from slmtune.config import Config
    from slmtune.errors import QualityGateError
    from slmtune.evaluation import check_gate

    config = Config()
    config.eval.gate_metric = "verdict"
    worse = {"result": "worse", "sentence": "Worse than the base on the held-out test split: test loss 1 → 2."}
    with pytest.raises(
        QualityGateError,
        match=r"quality gate failed: Worse than the base .* Nothing written \(eval.gate_metric=verdict\)",
    ):
        check_gate(config, {"verdict": worse})
    for result in ("better", "unchanged"):
        assert check_gate(config, {"verdict": {"result": result, "sentence": ""}})["passed"]


CURVES = {  # the train stage's validation record: the base's loss at step 0, every evaluation, the training loss
    "val_curve": [[0, 2.1], [10, 1.9], [20, 2.0], [30, 2.3], [40, 2.48]],
    "train_curve": [[1, 2.0], [20, 1.1], [40, 0.5]],
    "selected": False,
    "published_step": 40,
}
PUBLIC = {  # the run: worse on loss, perplexity and contains, better on ROUGE-L
    "base": {"loss": 2.119, "perplexity": 8.3, "contains": 0.077, "rougeL": 0.163, "bleu": 0.02, "exact_match": 0.0},
    "tuned": {"loss": 2.425, "perplexity": 11.3, "contains": 0.038, "rougeL": 0.184, "bleu": 0.02, "exact_match": 0.0},
    "test_examples": 26,
}


def test_the_verdict_says_worse_names_the_metrics_and_reads_overfitting_from_the_curves():
    from slmtune.verdict import verdict

    found = verdict(PUBLIC, "causal_lm", "loss", CURVES)
    assert found["result"] == "worse" and found["better"] == 0.0
    assert found["worsened"] == ["contains"] and found["improved"] == ["rougeL"]
    sentence = found["sentence"]
    assert sentence.startswith(
        "Worse than the base on the held-out test split (26 examples): test loss 2.119 → 2.425 (+14%); also worse "
        "on contains 0.077 → 0.038; better only on ROUGE-L 0.163 → 0.184. Likely cause: overfitting: the validation "
        "loss fell to 1.900 at step 10, then rose from there to 2.480 at step 40, while the training loss fell to "
        "0.500. Try: set train.select_best=true"
    )
    # the best-validation weights were published and are still worse: the advice changes
    selected = verdict(PUBLIC, "causal_lm", "loss", CURVES | {"selected": True, "published_step": 10})
    assert "the published weights are already step 10's, the best on validation, yet worse" in selected["sentence"]
    # no step beat the base's validation loss
    flat = CURVES | {"val_curve": [[0, 1.8], [10, 1.9], [20, 2.2]]}
    assert (
        "no training step lowered the validation loss below the base's 1.800"
        in verdict(PUBLIC, "causal_lm", "loss", flat)["sentence"]
    )
    # nothing to read without a validation split
    assert "set data.val_fraction" in verdict(PUBLIC, "causal_lm", "loss", None)["sentence"]
    # the deciding metric can be another: on ROUGE-L this run is better
    assert verdict(PUBLIC, "causal_lm", "rougeL", CURVES)["sentence"].startswith(
        "Better than the base on the held-out test split (26 examples): ROUGE-L 0.163 → 0.184; worse only on "
        "test loss 2.119 → 2.425 (+14%) and contains 0.077 → 0.038."
    )


def test_the_verdict_counts_facts_and_calls_a_change_under_one_percent_unchanged():
    from slmtune.verdict import verdict

    metrics = {
        "base": {"loss": 3.264, "fact_accuracy": 0.0, "rougeL": 0.131},
        "tuned": {"loss": 0.165, "fact_accuracy": 12 / 17, "rougeL": 0.751},
        "test_examples": 17,
        "fact_examples": 17,
    }
    found = verdict(metrics, "causal_lm")
    assert found["result"] == "better" and found["better"] == 1.0
    assert found["sentence"] == (
        "Better than the base on the held-out test split (17 examples): test loss 3.264 → 0.165 (-95%); also better "
        "on fact accuracy 0/17 → 12/17 and ROUGE-L 0.131 → 0.751."
    )
    same = {"base": {"loss": 2.0, "rougeL": 0.3}, "tuned": {"loss": 1.99, "rougeL": 0.305}}
    assert verdict(same, "causal_lm")["result"] == "unchanged"
    assert verdict(same, "causal_lm")["sentence"].startswith("No better than the base on the held-out test split:")
    # deciding on fact accuracy where no answer has key facts falls back to the loss
    assert verdict(same, "causal_lm", "fact_accuracy")["metric"] == "loss"


def test_gate_metric_must_exist_for_the_task(tmp_path):
    result = subprocess.run(
        [*SLMTUNE, "params", "eval.gate_metric=accuracy", "--root", str(REPO)],
        capture_output=True,
        text=True,
        env=stage_env(),
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    allowed = "fact_accuracy, loss, perplexity, bleu, rouge1, rouge2, rougeL"
    assert f"eval.gate_metric must be one of {allowed}" in result.stderr


def test_changing_only_evaluation_settings_logs_a_run_of_its_own(tiny_trained, tmp_path):
    """Evaluation settings are params of evaluate alone: changing one reruns evaluate (and report), not train."""
    tiny_project = copy_project(tiny_trained.project, tmp_path)
    provenance = json.loads((tiny_project / "models/adapter/provenance.json").read_text())
    first = json.loads((tiny_project / "reports/metrics.json").read_text())
    assert first["mlflow_run_id"] == provenance["mlflow"]["run_id"]

    params = tiny_project / "params.yaml"
    params.write_text(params.read_text().replace("max_new_tokens: 8", "max_new_tokens: 4"))
    result = run(["dvc", "repro"], tiny_project)
    assert "Running stage 'train'" not in result.stdout and "Running stage 'evaluate'" in result.stdout
    assert "Running stage 'report'" in result.stdout and "Running stage 'tokenize'" not in result.stdout
    second = json.loads((tiny_project / "reports/metrics.json").read_text())
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    client = MlflowClient()
    evaluation = client.get_run(second["mlflow_run_id"])
    assert evaluation.data.tags["slmtune.adapter_run_id"] == provenance["mlflow"]["run_id"]
    assert evaluation.data.params["eval.max_new_tokens"] == "4"
    assert len(client.get_metric_history(provenance["mlflow"]["run_id"], "test/tuned/loss")) == 1
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id, "reports")} >= {
        "reports/before_after.md",
        "reports/metrics.json",
    }
