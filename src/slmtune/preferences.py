"""Preference data and preference scores: pairs (prompt, chosen, rejected) and unpaired KTO rows read and validated
like every source, split by prompt into training and held-out rows, rendered in the SFT template, and the held-out
pairs scored by a model (log-likelihoods, preference accuracy, reward margin against a reference)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .config import AlignConfig, DataConfig
from .data import Issues, normalise_text, read_records
from .errors import DataError
from .formats import Problem
from .prompting import IGNORE_INDEX, build_example, conversation_pieces


@dataclass
class PreferenceData:
    """The training and held-out rows of `align.sources` and what reading them found."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    stats: dict[str, Any]


def prompt_key(record: dict[str, Any]) -> str:
    """The normalised prompt (every turn before the answer): rows that share it stay in one split."""
    return normalise_text(" ".join(f"{t['role']}: {t['content']} {t.get('input', '')}" for t in record["messages"]))


def _row_key(record: dict[str, Any]) -> str:
    answers = (record["chosen"], record["rejected"]) if "chosen" in record else (record["completion"],)
    return prompt_key(record) + " || " + " || ".join(normalise_text(a) for a in answers)


def read_preferences(align: AlignConfig, on_invalid: str, seed: int) -> PreferenceData:
    """Read every preference source (`on_invalid` as for the SFT data: fail on the first bad row, or skip and count),
    drop repeated rows, and hold out `align.test_fraction` of the prompts (seeded)."""
    issues = Issues(on_invalid)
    records: list[dict[str, Any]] = []
    sources = {}
    for name, source in align.sources.items():
        found, problems, rows_read = read_records(name, source, section="align")
        issues.add(problems)
        records += found
        sources[name] = {"path": source.path, "kind": source.kind, "rows_read": rows_read}
    seen: set[str] = set()
    unique, repeated = [], []
    for record in records:
        key = _row_key(record)
        if key in seen:
            repeated.append(
                Problem(record["source"], "duplicate", f"{record['source']}: the same row appears earlier.")
            )
            continue
        seen.add(key)
        unique.append(record)
    issues.add(repeated)
    prompts = sorted({prompt_key(r) for r in unique})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(len(prompts) * align.test_fraction))]) if len(prompts) > 1 else set()
    train = [r for r in unique if prompt_key(r) not in held]
    test = [r for r in unique if prompt_key(r) in held]
    if not train:
        raise DataError(
            f"align.sources: no training rows ({len(unique)} valid rows in all); add preference data or lower "
            "align.test_fraction."
        )
    stats = {
        "sources": sources,
        "rows": {"train": len(train), "test": len(test)},
        "kinds": dict(Counter("pair" if "chosen" in r else "unpaired" for r in unique)),
        **issues.stats(),
    }
    return PreferenceData(train, test, stats)


def conversation(record: dict[str, Any], answer: str) -> dict[str, Any]:
    """The record as an SFT conversation whose last turn is `answer`."""
    return {"source": record["source"], "messages": [*record["messages"], {"role": "assistant", "content": answer}]}


def render(record: dict[str, Any], answer: str, data: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """Prompt and answer text exactly as the SFT template renders them: the prompt is every piece before the answer
    (generation prompt included), the answer ends at the end-of-turn token when the template writes one (TRL appends
    EOS to an answer that does not end with it, as SFT does)."""
    pieces = conversation_pieces(conversation(record, answer), data, tokenizer)
    prompt = "".join(text for text, _ in pieces[:-1])
    text = pieces[-1][0]
    eos = tokenizer.eos_token
    if eos and eos in text:
        text = text[: text.index(eos) + len(eos)]
    return prompt, text


def trl_rows(records: list[dict[str, Any]], data: DataConfig, tokenizer: Any, objective: str) -> list[dict[str, Any]]:
    """Rows in TRL's standard (non-conversational) format, prompts rendered by our template: pairs for DPO and ORPO,
    `prompt`/`completion`/`label` for KTO (each pair gives a desirable and an undesirable row, as TRL's
    `unpair_preference_dataset` does)."""
    rows = []
    for record in records:
        if objective != "kto":
            prompt, chosen = render(record, record["chosen"], data, tokenizer)
            rows.append(
                {"prompt": prompt, "chosen": chosen, "rejected": render(record, record["rejected"], data, tokenizer)[1]}
            )
        elif "chosen" in record:
            for answer, label in ((record["chosen"], True), (record["rejected"], False)):
                prompt, completion = render(record, answer, data, tokenizer)
                rows.append({"prompt": prompt, "completion": completion, "label": label})
        else:
            prompt, completion = render(record, record["completion"], data, tokenizer)
            rows.append({"prompt": prompt, "completion": completion, "label": record["label"]})
    return rows


def pairs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out rows that can be scored as pairs: pairs, and unpaired rows of one prompt with a desirable and an
    undesirable completion (the first of each)."""
    pairs = [r for r in records if "chosen" in r]
    by_prompt: dict[str, dict[bool, dict[str, Any]]] = {}
    for record in records:
        if "completion" in record:
            by_prompt.setdefault(prompt_key(record), {}).setdefault(record["label"], record)
    for found in by_prompt.values():
        if True in found and False in found:
            pairs.append(found[True] | {"chosen": found[True]["completion"], "rejected": found[False]["completion"]})
    return pairs


@torch.no_grad()
def answer_logps(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], answers: list[str], data: DataConfig, batch_size: int = 8
) -> list[tuple[float, int]]:
    """Sum of the log-probabilities of each answer's tokens (as SFT trains them: the answer and its end-of-turn) given
    its prompt, and the number of those tokens."""
    examples = [build_example(conversation(r, a), data, tokenizer) for r, a in zip(records, answers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk])
        labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in chunk])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (logps * trained).sum(dim=1)
        results += [(float(s), int(n)) for s, n in zip(sums, trained.sum(dim=1))]
    return results


def pair_logps(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], data: DataConfig) -> dict[str, list]:
    """Chosen and rejected answer log-likelihoods (sums and token counts) of every pair."""
    chosen = answer_logps(model, tokenizer, pairs, [p["chosen"] for p in pairs], data)
    rejected = answer_logps(model, tokenizer, pairs, [p["rejected"] for p in pairs], data)
    return {"chosen": chosen, "rejected": rejected}


def preference_scores(logps: dict[str, list], reference: dict[str, list], beta: float) -> dict[str, float]:
    """Scores of one model on the held-out pairs, against `reference` (the base's log-likelihoods).

    - `preference_accuracy`: share of pairs whose DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) is
      higher for the chosen answer than for the rejected one (a tie counts half: the base, its own reference, scores
      0.5 by definition); `reward_margin`: the mean of that difference.
    - `likelihood_accuracy`: share of pairs whose chosen answer has the higher mean log-probability per token
      (reference-free, the length-normalised reward of SimPO and ORPO): what the model prefers on its own.
    - `chosen_logp`, `rejected_logp`: mean summed log-likelihood of the chosen and rejected answers."""
    chosen, rejected = logps["chosen"], logps["rejected"]
    n = len(chosen)
    margins = [
        beta * ((c - rc) - (r - rr))
        for (c, _), (r, _), (rc, _), (rr, _) in zip(chosen, rejected, reference["chosen"], reference["rejected"])
    ]
    return {
        "preference_accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "likelihood_accuracy": sum(c / max(cn, 1) > r / max(rn, 1) for (c, cn), (r, rn) in zip(chosen, rejected)) / n,
        "chosen_logp": sum(c for c, _ in chosen) / n,
        "rejected_logp": sum(r for r, _ in rejected) / n,
    }
