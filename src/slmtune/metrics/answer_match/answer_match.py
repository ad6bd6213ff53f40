"""Exact match and token F1 of answers against references, SQuAD-style (an `evaluate` metric module).

Both compare normalised text: lower case, punctuation and the articles a/an/the removed, single spaces."""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = (
    "Exact match (normalised prediction equals normalised reference) and token F1 (harmonic mean of the "
    "precision and recall of the shared normalised words), as in the SQuAD evaluation script."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: reference texts, one per prediction.
Returns:
    exact_match, token_f1: means over the examples.
    exact_match_per_example, token_f1_per_example: each example's score.
"""
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction, reference):
    predicted, target = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not target:
        return float(predicted == target)
    shared = sum((Counter(predicted) & Counter(target)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(target)
    return 2 * precision * recall / (precision + recall)


class AnswerMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al. SQuAD: 100,000+ questions for machine comprehension of text. EMNLP 2016.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        exact = [float(normalise(p) == normalise(r)) for p, r in zip(predictions, references)]
        f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
        return {
            "exact_match": sum(exact) / len(exact) if exact else 0.0,
            "token_f1": sum(f1) / len(f1) if f1 else 0.0,
            "exact_match_per_example": exact,
            "token_f1_per_example": f1,
        }
