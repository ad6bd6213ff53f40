"""Base vs tuned on the test split: loss, perplexity, greedy answers, ROUGE-L and contains-match; for
classification, accuracy, macro F1 and loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_to_dict
from .lineage import read_provenance
from .outputs import read_jsonl, write_json, write_jsonl
from .prompting import IGNORE_INDEX, generation_prompt, padding_collator
from .tracking import evaluation_run

METRICS_DIR = Path(__file__).parent / "metrics"
TEXT_METRICS = ("rouge_l", "contains_match")


@torch.no_grad()
def response_loss(model: Any, tokenizer: Any, dataset: Any, batch_size: int) -> float:
    """Mean cross-entropy over the trained (response) tokens of a tokenized split."""
    collator = padding_collator(tokenizer)
    model.eval()
    total, count = 0.0, 0
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding; decoding stops at EOS."""
    model.eval()
    pad = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return answers


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """ROUGE-L and contains-match through the project's local `evaluate` modules (no hub access)."""
    import evaluate

    results: dict[str, Any] = {}
    for name in TEXT_METRICS:
        results.update(evaluate.load(str(METRICS_DIR / name)).compute(predictions=predictions, references=references))
    return results


def score_model(model: Any, tokenizer: Any, config: Config, test_tokens: Any, prompt_ids: list[list[int]], references: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Loss, perplexity and text metrics of one model; returns (summary, per-example lists and answers)."""
    loss = response_loss(model, tokenizer, test_tokens, config.eval.batch_size)
    answers = generate_answers(model, tokenizer, prompt_ids, config.eval.max_new_tokens, config.eval.batch_size)
    scores = text_metrics(answers, references)
    summary = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rougeL": scores["rougeL"], "contains": scores["contains"]}
    details = {"answers": answers, "rougeL": scores["rougeL_per_example"], "contains": scores["contains_per_example"]}
    return summary, details


def question_text(record: dict[str, Any]) -> str:
    """A short label for a test record: its last user turn (raw text: its opening words)."""
    if "text" in record:
        return " ".join(record["text"].split()[:12]) + " …"
    user = [t for t in record["messages"] if t["role"] == "user"][-1]
    return user["content"] + (f" — {user['input']}" if user.get("input") else "")


def is_adapter(path: str | Path) -> bool:
    """A peft adapter folder (else a full fine-tuned model folder)."""
    return (Path(path) / "adapter_config.json").is_file()


def base_model(config: Config, labels: list[str] | None, pad_token_id: int) -> Any:
    """The base model as training started from it: quantised like the method loads it; a classifier's new
    head initialised from the training seed (so that "base" scores the head training began with)."""
    from transformers import set_seed

    from .modeling import load_model

    set_seed(config.train.seed)
    return load_model(config.paths.base_model, config.model.dtype, config.method, labels, pad_token_id)


def score_base_and_tuned(config: Config, labels: list[str] | None, pad_token_id: int, score: Any) -> tuple[Any, Any]:
    """`score(model)` for the tuned model, then for the base: one model with the adapter switched off,
    or (full fine-tuning) the saved model and the base loaded in turn."""
    from peft import PeftModel

    from .modeling import load_model

    adapter = config.paths.adapter
    if is_adapter(adapter):
        model = PeftModel.from_pretrained(base_model(config, labels, pad_token_id), adapter)
        tuned = score(model)
        with model.disable_adapter():
            return score(model), tuned
    tuned = score(load_model(adapter, config.model.dtype, None, labels, pad_token_id))
    return score(base_model(config, labels, pad_token_id)), tuned


def evaluate_base_and_tuned(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score the base model and base + adapter (or the fully fine-tuned model) on the test split."""
    from datasets import load_from_disk

    from .modeling import load_tokenizer

    if config.model.task == "classification":
        return evaluate_classifier(config)
    tokenizer = load_tokenizer(config.paths.base_model)
    test_tokens = load_from_disk(config.paths.tokenized)["test"]
    kept = set(test_tokens["source"])
    records = [r for r in read_jsonl(Path(config.paths.prepared) / "test.jsonl") if "text" in r or r["source"] in kept]
    prompts, prompt_ids, references = [], [], []
    for record in records:
        text, ids, reference = generation_prompt(record, config.data, tokenizer, config.eval.max_new_tokens)
        prompts.append(text)
        prompt_ids.append(ids)
        references.append(reference)
    test_tokens = test_tokens.select_columns(["input_ids", "labels"])

    (base, base_details), (tuned, tuned_details) = score_base_and_tuned(
        config, None, tokenizer.pad_token_id, lambda model: score_model(model, tokenizer, config, test_tokens, prompt_ids, references)
    )
    metrics = {"base": base, "tuned": tuned, "test_examples": len(records)}
    generations = [
        {
            "source": record["source"],
            "prompt": prompt,
            "question": question_text(record),
            "category": record.get("category", ""),
            "reference": reference,
            "base": base_details["answers"][i],
            "tuned": tuned_details["answers"][i],
            "base_rougeL": base_details["rougeL"][i],
            "tuned_rougeL": tuned_details["rougeL"][i],
            "base_contains": base_details["contains"][i],
            "tuned_contains": tuned_details["contains"][i],
        }
        for i, (record, prompt, reference) in enumerate(zip(records, prompts, references))
    ]
    return metrics, generations


@torch.no_grad()
def classify(model: Any, tokenizer: Any, dataset: Any, batch_size: int) -> tuple[list[int], float]:
    """Predicted class index per example and the mean cross-entropy against the true classes."""
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer, padding="longest")
    model.eval()
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    predictions, total = [], 0.0
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        predictions += logits.argmax(-1).tolist()
    return predictions, total / max(len(rows), 1)


def evaluate_classifier(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy, macro F1 and loss of the base classifier (its untrained head) and the tuned one on the test split."""
    import json

    import evaluate
    from datasets import load_from_disk

    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(config.paths.base_model)
    labels = json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))["labels"]
    test = load_from_disk(config.paths.tokenized)["test"]
    by_source = {r["source"]: r for r in read_jsonl(Path(config.paths.prepared) / "test.jsonl")}
    records = [by_source[source] for source in test["source"]]
    references = [labels[i] for i in test["labels"]]
    metric = evaluate.load(str(METRICS_DIR / "classification"))

    def score(model: Any) -> tuple[dict[str, float], list[str]]:
        indices, loss = classify(model, tokenizer, test, config.eval.batch_size)
        predicted = [labels[i] for i in indices]
        result = metric.compute(predictions=predicted, references=references)
        return {"accuracy": result["accuracy"], "f1": result["f1"], "loss": loss}, predicted

    (base, base_predicted), (tuned, tuned_predicted) = score_base_and_tuned(config, labels, tokenizer.pad_token_id, score)
    metrics = {"base": base, "tuned": tuned, "test_examples": len(records), "labels": labels}
    generations = [
        {
            "source": record["source"],
            "prompt": record["text"],
            "question": question_text(record),
            "category": record.get("category", ""),
            "reference": reference,
            "base": base_predicted[i],
            "tuned": tuned_predicted[i],
            "base_correct": int(base_predicted[i] == reference),
            "tuned_correct": int(tuned_predicted[i] == reference),
        }
        for i, (record, reference) in enumerate(zip(records, references))
    ]
    return metrics, generations


def run_evaluation(config: Config, metrics_path: Path, generations_path: Path) -> dict[str, Any]:
    """The evaluate stage: score both models, log them to this execution's MLflow run, write metrics
    (with that run's id, so that `dvc exp show` links each experiment to its run) and generations."""
    import mlflow

    metrics, generations = evaluate_base_and_tuned(config)
    adapter_run_id = read_provenance(config.paths.adapter)["mlflow"]["run_id"]
    with evaluation_run(config.tracking, adapter_run_id, config_to_dict(config)) as run:
        for model_name in ("base", "tuned"):
            mlflow.log_metrics({f"test/{model_name}/{k}": v for k, v in metrics[model_name].items() if isinstance(v, (int, float))})
        metrics["mlflow_run_id"] = run.info.run_id
        write_json(metrics_path, metrics)
        write_jsonl(generations_path, generations)
        mlflow.log_artifact(str(metrics_path), "reports")
        mlflow.log_artifact(str(generations_path), "reports")
    return metrics
