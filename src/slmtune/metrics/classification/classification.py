"""Accuracy and macro-averaged F1 of predicted class labels (an `evaluate` metric module)."""

import datasets
import evaluate

_DESCRIPTION = (
    "Accuracy (share of exact label matches) and macro F1 (the F1 of each class that occurs in the references "
    "or predictions, averaged with equal weight), for text classification."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class labels (text).
    references: true class labels, one per prediction.
Returns:
    accuracy: share of correct predictions.
    f1: macro-averaged F1 over the classes seen.
    f1_per_class: F1 of each class.
"""


def f1_of(label, predictions, references):
    true_positive = sum(1 for p, r in zip(predictions, references) if p == label and r == label)
    predicted = sum(1 for p in predictions if p == label)
    actual = sum(1 for r in references if r == label)
    if true_positive == 0:
        return 0.0
    precision = true_positive / predicted
    recall = true_positive / actual
    return 2 * precision * recall / (precision + recall)


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        classes = sorted(set(predictions) | set(references))
        per_class = {label: f1_of(label, predictions, references) for label in classes}
        correct = sum(1 for p, r in zip(predictions, references) if p == r)
        return {
            "accuracy": correct / len(references) if references else 0.0,
            "f1": sum(per_class.values()) / len(per_class) if per_class else 0.0,
            "f1_per_class": per_class,
        }
