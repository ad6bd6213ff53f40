"""Base vs tuned on the test split: loss, perplexity, greedy answers scored with fact accuracy (every key fact of
the reference stated), BLEU, ROUGE-1/2/L, exact match, token F1 and contains-match, per category where the data
has categories; the merged adapter's parity;
the optional quality gate. Classification: accuracy, macro F1 and loss."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import evaluate
import torch
from datasets import load_from_disk
from peft import PeftModel
from transformers import DataCollatorWithPadding, set_seed

from .config import Config
from .errors import QualityGateError
from .facts import Check, Fact, check_answer, fact_accuracy, key_facts, subject_names
from .inference import generate_answers
from .lineage import final_adapter
from .losses import supports_trained_positions, trained_token_losses
from .metrics import MODULES_DIR, PER_EXAMPLE, TEXT_MODULES, lower_is_better
from .modeling import is_adapter, load_model, load_tokenizer
from .outputs import read_jsonl
from .progress import track
from .prompting import IGNORE_INDEX, generation_prompt, padding_collator

PARITY_TOLERANCE = 1e-4
"""Largest test-loss difference between the merged model and base + adapter."""


@torch.no_grad()
def response_losses(
    model: Any, tokenizer: Any, dataset: Any, batch_size: int, desc: str = "test loss"
) -> list[tuple[float, int]]:
    """Summed cross-entropy and count of the trained (response) tokens of each row of a tokenized split, the head
    run only where labels are trained (`losses`) on models that allow it, in fp32."""
    collator = padding_collator(tokenizer)
    model.eval()
    lean = supports_trained_positions(model)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    sums: list[tuple[float, int]] = []
    for start in track(range(0, len(rows), batch_size), desc=f"{desc}: {len(rows)} examples", unit="batch"):
        batch = collator(rows[start : start + batch_size])
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        if lean:
            losses, keep = trained_token_losses(model, inputs)
            row_sums = torch.zeros(len(keep)).index_add_(0, keep.nonzero()[:, 0], losses)
            sums += [(float(total), int(n)) for total, n in zip(row_sums, keep.sum(1))]
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums += [(float(row.sum()), int(n)) for row, n in zip(losses, (labels != IGNORE_INDEX).sum(1))]
    return sums


def mean_loss(sums: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)


def response_loss(model: Any, tokenizer: Any, dataset: Any, batch_size: int) -> float:
    """Mean cross-entropy over the trained (response) tokens of a tokenized split."""
    return mean_loss(response_losses(model, tokenizer, dataset, batch_size))


def generation_settings(config: Config) -> dict[str, Any]:
    """How the test answers are produced, recorded with the metrics."""
    return {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": config.eval.max_new_tokens,
        "batch_size": config.eval.batch_size,
        "seed": config.train.seed,
        "stop": "eos",
    }


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """BLEU, ROUGE-1/2/L, exact match, token F1 and contains-match through the project's local `evaluate`
    modules (no hub access)."""
    results: dict[str, Any] = {}
    for name in TEXT_MODULES:
        results.update(evaluate.load(str(MODULES_DIR / name)).compute(predictions=predictions, references=references))
    return results


def score_model(
    model: Any,
    tokenizer: Any,
    config: Config,
    test_tokens: Any,
    prompt_ids: list[list[int]],
    references: list[str],
    facts: list[list[Fact]],
    name: str = "model",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Loss, perplexity, fact accuracy and text metrics of one model (`name` labels its progress); returns (summary,
    per-example scores, fact checks, answers and losses)."""
    losses = response_losses(model, tokenizer, test_tokens, config.eval.batch_size, f"{name} test loss")
    loss = mean_loss(losses)
    set_seed(config.train.seed)
    eval_ = config.eval
    answers = generate_answers(model, tokenizer, prompt_ids, eval_.max_new_tokens, eval_.batch_size, f"{name} generate")
    scores = text_metrics(answers, references)
    checks = [check_answer(answer, example_facts) for answer, example_facts in zip(answers, facts)]
    summary = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))} | {name: scores[name] for name in PER_EXAMPLE}
    if any(check.facts for check in checks):
        summary = {"fact_accuracy": fact_accuracy(checks)} | summary
    details = {"answers": answers, "losses": losses, "checks": checks}
    details |= {name: scores[f"{name}_per_example"] for name in PER_EXAMPLE}
    return summary, details


def question_text(record: dict[str, Any]) -> str:
    """A short label for a test record: its last user turn (raw text: its opening words)."""
    if "text" in record:
        return " ".join(record["text"].split()[:12]) + " …"
    user = [t for t in record["messages"] if t["role"] == "user"][-1]
    return user["content"] + (f" — {user['input']}" if user.get("input") else "")


def validation_facts(model: Any, tokenizer: Any, config: Config) -> dict[str, Any]:
    """Fact accuracy of the tuned model's greedy answers on the validation split: what sweeps rank by (choosing a
    recipe by the test split would tune it to the test questions). Empty when no validation answer has key facts."""
    path = Path(config.paths.prepared) / "val.jsonl"
    records = [r for r in read_jsonl(path) if "messages" in r] if path.is_file() else []
    prompts = [generation_prompt(r, config.data, tokenizer, config.eval.max_new_tokens) for r in records]
    facts = test_facts(records, [reference for _, _, reference in prompts])
    keep = [i for i, example in enumerate(facts) if example]
    if not keep:
        return {}
    eval_ = config.eval
    set_seed(config.train.seed)
    ids = [prompts[i][1] for i in keep]
    answers = generate_answers(model, tokenizer, ids, eval_.max_new_tokens, eval_.batch_size, "tuned validation")
    checks = [check_answer(answer, facts[i]) for answer, i in zip(answers, keep)]
    return {"fact_accuracy": fact_accuracy(checks), "fact_examples": len(checks)}


def base_model(config: Config, labels: list[str] | None, pad_token_id: int) -> Any:
    """The base model as training started from it: quantised like the method loads it; a classifier's new
    head initialised from the training seed (so that "base" scores the head training began with)."""
    set_seed(config.train.seed)
    return load_model(config.paths.base_model, config.model.dtype, config.method, labels, pad_token_id)


def score_base_and_tuned(
    config: Config, labels: list[str] | None, pad_token_id: int, score: Any, merged: bool = False
) -> tuple[Any, Any, Any]:
    """`score(model, name)` for the tuned model, then for the base: one model with the adapter switched off,
    or (full fine-tuning) the saved model and the base loaded in turn. With `merged`, an adapter is then
    merged into the base weights and scored a third time (else None): the merge parity."""
    adapter = str(final_adapter(config.paths))
    if is_adapter(adapter):
        model = PeftModel.from_pretrained(base_model(config, labels, pad_token_id), adapter)
        tuned = score(model, "tuned")
        with model.disable_adapter():
            base = score(model, "base")
        return base, tuned, score(model.merge_and_unload(), "merged") if merged else None
    tuned = score(load_model(adapter, config.model.dtype, None, labels, pad_token_id), "tuned")
    return score(base_model(config, labels, pad_token_id), "base"), tuned, None


def user_text(record: dict[str, Any]) -> str:
    """Every user turn of a record (what a key fact must not merely repeat)."""
    turns = [t for t in record.get("messages", []) if t["role"] == "user"]
    return " ".join(t["content"] + " " + t.get("input", "") for t in turns)


def test_facts(records: list[dict[str, Any]], references: list[str]) -> list[list[Fact]]:
    """The key facts of each test example: its own `facts`, else extracted from its reference (raw text: none)."""
    subject = subject_names(references)
    return [
        [] if "text" in record else key_facts(record, reference, user_text(record), subject)
        for record, reference in zip(records, references)
    ]


def test_prompts(config: Config, tokenizer: Any) -> tuple[list[dict[str, Any]], list[str], list[list[int]], list[str]]:
    """The test records that kept a tokenized row, with each one's prompt text, prompt ids and reference."""
    kept = set(load_from_disk(config.paths.tokenized)["test"]["source"])
    records = [r for r in read_jsonl(Path(config.paths.prepared) / "test.jsonl") if "text" in r or r["source"] in kept]
    prompts, prompt_ids, references = [], [], []
    for record in records:
        text, ids, reference = generation_prompt(record, config.data, tokenizer, config.eval.max_new_tokens)
        prompts.append(text)
        prompt_ids.append(ids)
        references.append(reference)
    return records, prompts, prompt_ids, references


def parity(
    adapter: tuple[dict[str, float], dict[str, Any]], merged: tuple[dict[str, float], dict[str, Any]]
) -> dict[str, Any]:
    """Merged model vs base + adapter: test loss difference and identical greedy answers."""
    same = sum(a == b for a, b in zip(adapter[1]["answers"], merged[1]["answers"]))
    difference = abs(merged[0]["loss"] - adapter[0]["loss"])
    return {
        "adapter_loss": adapter[0]["loss"],
        "merged_loss": merged[0]["loss"],
        "loss_difference": difference,
        "tolerance": PARITY_TOLERANCE,
        "identical_answers": same,
        "answers": len(adapter[1]["answers"]),
        "ok": difference <= PARITY_TOLERANCE and same == len(adapter[1]["answers"]),
    }


def by_category(
    records: list[dict[str, Any]], token_sources: list[str], details: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per category (where the test records have one): example count and, for base and tuned, the loss
    over the category's response tokens and the mean of each per-example text metric."""
    categories = [record.get("category") or "" for record in records]
    if not any(categories):
        return {}
    category_of = {record["source"]: category for record, category in zip(records, categories)}
    table: dict[str, Any] = {}
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category]
        token_rows = [i for i, source in enumerate(token_sources) if category_of.get(source) == category]
        entry: dict[str, Any] = {"examples": len(rows)}
        for model, detail in details.items():
            loss = mean_loss([detail["losses"][i] for i in token_rows]) if token_rows else float("nan")
            entry[model] = {"loss": loss} | {
                name: sum(detail[name][i] for i in rows) / len(rows) for name in PER_EXAMPLE
            }
            checked = [detail["checks"][i] for i in rows if detail["checks"][i].facts]
            if checked:
                entry[model]["fact_accuracy"] = fact_accuracy(checked)
        table[category or "(none)"] = entry
    return table


def check_gate(config: Config, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The quality gate's verdict (None when `eval.gate_metric` is unset); raises when it fails."""
    name = config.eval.gate_metric
    if not name:
        return None
    if name == "verdict":
        found = metrics["verdict"]
        if found["result"] == "worse":
            raise QualityGateError(
                f"quality gate failed: {found['sentence']} Nothing written (eval.gate_metric=verdict)."
            )
        return {"metric": "verdict", "result": found["result"], "passed": True}
    if name not in metrics["tuned"]:
        raise QualityGateError(
            f"quality gate: eval.gate_metric={name} has no value: no test answer has key facts (numbers, dates, "
            "names...) and no `facts` column gives them; nothing written. Add a facts column or gate on another metric."
        )
    base, tuned = metrics["base"][name], metrics["tuned"][name]
    drop = tuned - base if lower_is_better(name) else base - tuned
    verdict = {
        "metric": name,
        "base": base,
        "tuned": tuned,
        "drop": drop,
        "max_drop": config.eval.gate_max_drop,
        "passed": drop <= config.eval.gate_max_drop,
    }
    if not verdict["passed"]:
        direction = "higher" if lower_is_better(name) else "lower"
        raise QualityGateError(
            f"quality gate failed: tuned {name} {tuned:.4f} is {drop:.4f} {direction} than the base's "
            f"{base:.4f}, more than eval.gate_max_drop={config.eval.gate_max_drop}; nothing written. "
            "Fix the training, or raise eval.gate_max_drop / unset eval.gate_metric."
        )
    return verdict


def evaluate_base_and_tuned(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score the base model, base + adapter (or the fully fine-tuned model) and the merged adapter on the test split."""
    if config.model.task == "classification":
        return evaluate_classifier(config)
    tokenizer = load_tokenizer(config.paths.base_model)
    records, prompts, prompt_ids, references = test_prompts(config, tokenizer)
    facts = test_facts(records, references)
    test_tokens = load_from_disk(config.paths.tokenized)["test"]
    token_sources = list(test_tokens["source"])
    test_tokens = test_tokens.select_columns(["input_ids", "labels"])

    validation: dict[str, Any] = {}

    def score(model: Any, name: str) -> tuple[dict[str, float], dict[str, Any]]:
        if name == "tuned":
            validation.update(validation_facts(model, tokenizer, config))
        return score_model(model, tokenizer, config, test_tokens, prompt_ids, references, facts, name)

    base, tuned, merged = score_base_and_tuned(
        config, None, tokenizer.pad_token_id, score, merged=config.eval.merge_parity
    )
    metrics: dict[str, Any] = {
        "base": base[0],
        "tuned": tuned[0],
        "test_examples": len(records),
        "fact_examples": sum(bool(example) for example in facts),
        "generation": generation_settings(config),
    }
    if validation:
        metrics["validation"] = validation
    categories = by_category(records, token_sources, {"base": base[1], "tuned": tuned[1]})
    if categories:
        metrics["by_category"] = categories
    if merged is not None:
        metrics["merge_parity"] = parity(tuned, merged)
    generations = [
        {
            "source": record["source"],
            "prompt": prompt,
            "question": question_text(record),
            "category": record.get("category", ""),
            "reference": reference,
            "base": base[1]["answers"][i],
            "tuned": tuned[1]["answers"][i],
            "facts": [fact.text for fact in facts[i]],
            "base_facts": _check_dict(base[1]["checks"][i]),
            "tuned_facts": _check_dict(tuned[1]["checks"][i]),
        }
        | {
            f"{model}_{name}": detail[1][name][i]
            for model, detail in (("base", base), ("tuned", tuned))
            for name in PER_EXAMPLE
        }
        for i, (record, prompt, reference) in enumerate(zip(records, prompts, references))
    ]
    return metrics, generations


def _check_dict(check: Check) -> dict[str, Any]:
    return {"right": check.right, "missing": check.missing, "wrong": check.wrong} if check.facts else {}


@torch.no_grad()
def classify(model: Any, tokenizer: Any, dataset: Any, batch_size: int) -> tuple[list[int], float]:
    """Predicted class index per example and the mean cross-entropy against the true classes."""
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
    tokenizer = load_tokenizer(config.paths.base_model)
    labels = json.loads(Path(config.paths.token_stats).read_text(encoding="utf-8"))["labels"]
    test = load_from_disk(config.paths.tokenized)["test"]
    by_source = {r["source"]: r for r in read_jsonl(Path(config.paths.prepared) / "test.jsonl")}
    records = [by_source[source] for source in test["source"]]
    references = [labels[i] for i in test["labels"]]
    metric = evaluate.load(str(MODULES_DIR / "classification"))

    def score(model: Any, name: str) -> tuple[dict[str, float], list[str]]:
        indices, loss = classify(model, tokenizer, test, config.eval.batch_size)
        predicted = [labels[i] for i in indices]
        result = metric.compute(predictions=predicted, references=references)
        return {"accuracy": result["accuracy"], "f1": result["f1"], "loss": loss}, predicted

    (base, base_predicted), (tuned, tuned_predicted), _ = score_base_and_tuned(
        config, labels, tokenizer.pad_token_id, score
    )
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


def test_loss(model: Any, tokenizer: Any, config: Config) -> float:
    """Mean loss over the response tokens of the tokenized test split."""
    tokens = load_from_disk(config.paths.tokenized)["test"].select_columns(["input_ids", "labels"])
    return response_loss(model, tokenizer, tokens, config.eval.batch_size)


def test_loss_and_answers(model: Any, tokenizer: Any, config: Config) -> tuple[float, list[str]]:
    """Test-split loss (response tokens) and greedy answers to the test prompts: what a merge or an export
    must keep unchanged."""
    prompt_ids = test_prompts(config, tokenizer)[2]
    answers = generate_answers(model, tokenizer, prompt_ids, config.eval.max_new_tokens, config.eval.batch_size)
    return test_loss(model, tokenizer, config), answers
