"""The verdict: did fine-tuning make the model better or worse than the base on the held-out test split, on which
metrics, by how much, and, when worse, the likely cause read from the training curves and what to try. It opens
the before/after report, is an MLflow tag of the evaluation run and a metric `dvc exp show` lists (`verdict.*`), and
the quality gate can require it (`eval.gate_metric=verdict`)."""

from __future__ import annotations

from typing import Any

from .metrics import BY_TASK, Metric

HEADLINE = ("fact_accuracy", "loss", "accuracy", "f1", "rougeL", "contains", "exact_match", "bleu")
"""The metrics the verdict sentence names beside the deciding one (perplexity repeats the loss; ROUGE-1/2 and
token F1 move with ROUGE-L)."""
UNCHANGED = {"loss": 0.01, "score": 0.01, "unbounded": 0.01}
"""Smallest change that counts: 1% of the base's value for losses, 0.01 for scores."""
ROSE = 0.02
"""The validation loss rose (overfitting) when its last value is this much (relative) above its lowest."""


def _metric(task: str, name: str) -> Metric:
    return next(m for m in BY_TASK[task] if m.name == name)


def _change(metric: Metric, base: float, tuned: float) -> int:
    """+1 better, -1 worse, 0 unchanged (within `UNCHANGED`)."""
    margin = UNCHANGED[metric.kind] * (abs(base) if metric.kind == "loss" else 1.0)
    if abs(tuned - base) <= margin:
        return 0
    return 1 if (tuned < base) == (metric.direction == "min") else -1


def _figure(metric: Metric, base: float, tuned: float, counts: int | None = None) -> str:
    """`test loss 2.119 → 2.425 (+14%)`, `fact accuracy 0/17 → 12/17`, `ROUGE-L 0.163 → 0.184`."""
    label = "test loss" if metric.name == "loss" else metric.short
    if metric.name == "fact_accuracy" and counts:
        return f"fact accuracy {round(base * counts)}/{counts} → {round(tuned * counts)}/{counts}"
    if metric.kind == "loss":
        percent = 100 * (tuned - base) / base if base else 0.0
        return f"{label} {base:.3f} → {tuned:.3f} ({percent:+.{0 if abs(percent) >= 10 else 1}f}%)"
    return f"{label} {base:.3f} → {tuned:.3f}"


def _listed(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def diagnosis(validation: dict[str, Any] | None, result: str) -> tuple[str | None, str | None]:
    """The likely cause read from the curves of the train stage, and what to try (None, None when nothing
    stands out). `validation`: the train stage's record (`training.validation_record`)."""
    if not validation or not validation.get("val_curve"):
        return (
            "no validation split, so nothing shows where training turned",
            "set data.val_fraction (e.g. 0.1) so that the validation loss picks the weights and stops training",
        )
    curve = [(int(step), float(loss)) for step, loss in validation["val_curve"]]
    base = next((loss for step, loss in curve if step == 0), None)
    low_step, low = min(curve, key=lambda point: (point[1], point[0]))
    last_step, last = curve[-1]
    train = validation.get("train_curve") or []
    published = validation.get("published_step", last_step)
    selected = validation.get("selected", False)
    if base is not None and low_step == 0 and len(curve) > 1:
        return (
            f"no training step lowered the validation loss below the base's {base:.3f} (it reached {last:.3f} at "
            f"step {last_step})",
            "the data may already be what the base does well: lower train.learning_rate (e.g. a tenth), or train "
            "fewer weights (method=lora)",
        )
    if last > low * (1 + ROSE) and last_step > low_step:
        fell = f", while the training loss fell to {train[-1][1]:.3f}" if train else ""
        cause = (
            f"overfitting: the validation loss fell to {low:.3f} at step {low_step}, then rose from there to "
            f"{last:.3f} at step {last_step}{fell}"
        )
        if selected and published == low_step:
            if result == "worse":
                return cause, (
                    f"the published weights are already step {low_step}'s, the best on validation, yet worse on "
                    "test: the validation split may be too small or unlike the test split (raise data.val_fraction), "
                    "or lower train.learning_rate"
                )
            return cause, f"the published weights are step {low_step}'s, the lowest validation loss (train.select_best)"
        return cause, (
            "set train.select_best=true (publish the best-validation weights), train fewer epochs or lower "
            "train.learning_rate"
        )
    if len(train) >= 2 and train[-1][1] > 0.9 * train[0][1]:
        return (
            f"underfitting: the training loss barely fell ({train[0][1]:.3f} → {train[-1][1]:.3f})",
            "raise train.learning_rate or train.epochs",
        )
    if result == "worse":
        return (
            f"the validation loss improved ({curve[0][1]:.3f} → {low:.3f}) but the test split got worse",
            "the validation split may be too small or unlike the test split: raise data.val_fraction",
        )
    return None, None


def verdict(
    metrics: dict[str, Any], task: str, deciding: str = "loss", validation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Better, worse or unchanged against the base on the test split, decided by the `deciding` metric; the other
    headline metrics that moved each way; and the sentence saying so, with the cause and advice from the curves."""
    base, tuned = metrics["base"], metrics["tuned"]
    if deciding not in tuned:  # fact accuracy without key facts in the test answers
        deciding = "loss"
    counts = metrics.get("fact_examples")
    metric = _metric(task, deciding)
    change = _change(metric, base[deciding], tuned[deciding])
    result = {1: "better", -1: "worse", 0: "unchanged"}[change]
    others = [_metric(task, n) for n in HEADLINE if n in tuned and n in base and n != deciding]
    sides = {m.name: _change(m, base[m.name], tuned[m.name]) for m in others}
    moved = {
        side: [_figure(m, base[m.name], tuned[m.name], counts) for m in others if sides[m.name] == side]
        for side in (1, -1)
    }
    examples = metrics.get("test_examples")
    where = f"the held-out test split ({examples} examples)" if examples else "the held-out test split"
    headline = {
        "better": "Better than the base",
        "worse": "Worse than the base",
        "unchanged": "No better than the base",
    }
    sentence = f"{headline[result]} on {where}: {_figure(metric, base[deciding], tuned[deciding], counts)}"
    same, other = (1, -1) if result == "better" else (-1, 1)
    if moved[same]:
        sentence += f"; also {'better' if same == 1 else 'worse'} on {_listed(moved[same][:4])}"
    if moved[other]:
        sentence += f"; {'better' if other == 1 else 'worse'} only on {_listed(moved[other])}"
    sentence += "."
    cause, advice = diagnosis(validation, result)
    if result != "better" and cause:
        sentence += f" Likely cause: {cause}. Try: {advice}."
    elif cause and advice and validation and validation.get("selected"):
        sentence += f" The curves: {cause}; {advice}."
    return {
        "result": result,
        "better": float(result == "better"),
        "metric": deciding,
        "base": base[deciding],
        "tuned": tuned[deciding],
        "improved": [name for name, side in sides.items() if side == 1],
        "worsened": [name for name, side in sides.items() if side == -1],
        "sentence": sentence,
    }
