"""Corpus BLEU-4 with the brevity penalty, offline (an `evaluate` metric module).

Papineni et al. (2002): clipped n-gram precisions for n = 1..4 summed over the corpus, their geometric
mean times the brevity penalty. Text is lower-cased and split into words and single punctuation marks.
A sentence's own score (`bleu_per_example`) uses add-one smoothing of the n-gram counts for n > 1
(Lin and Och, 2004), since a short answer rarely shares a 4-gram."""

import math
import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Corpus BLEU-4 (clipped n-gram precision, geometric mean, brevity penalty) and smoothed sentence BLEU."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: one reference text per prediction.
    max_order: longest n-gram (default 4).
Returns:
    bleu: corpus BLEU in [0, 1].
    precisions: corpus n-gram precision for n = 1..max_order.
    brevity_penalty, length_ratio: of the corpus.
    bleu_per_example: smoothed sentence BLEU of each example.
"""
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text):
    return _TOKEN.findall(text.lower())


def ngram_counts(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def overlaps(prediction, reference, max_order):
    """Clipped matches and candidate n-gram totals per order for one pair."""
    matches, totals = [], []
    for n in range(1, max_order + 1):
        candidate, target = ngram_counts(prediction, n), ngram_counts(reference, n)
        matches.append(sum(min(count, target[gram]) for gram, count in candidate.items()))
        totals.append(max(len(prediction) - n + 1, 0))
    return matches, totals


def combine(matches, totals, prediction_length, reference_length, smooth):
    if prediction_length == 0:
        return 0.0, [0.0] * len(matches), 0.0
    precisions = []
    for n, (match, total) in enumerate(zip(matches, totals)):
        if smooth and n > 0:
            precisions.append((match + 1) / (total + 1))
        else:
            precisions.append(match / total if total else 0.0)
    if min(precisions) == 0:
        score = 0.0
    else:
        score = math.exp(sum(math.log(p) for p in precisions) / len(precisions))
    ratio = prediction_length / reference_length if reference_length else 1.0
    penalty = 1.0 if ratio > 1 else math.exp(1 - 1 / ratio) if ratio > 0 else 0.0
    return score * penalty, precisions, penalty


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Papineni et al. BLEU: a method for automatic evaluation of machine translation. ACL 2002.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, max_order=4):
        corpus_matches, corpus_totals = [0] * max_order, [0] * max_order
        prediction_length = reference_length = 0
        per_example = []
        for prediction, reference in zip(predictions, references):
            candidate, target = tokenize(prediction), tokenize(reference)
            matches, totals = overlaps(candidate, target, max_order)
            per_example.append(combine(matches, totals, len(candidate), len(target), smooth=True)[0])
            corpus_matches = [a + b for a, b in zip(corpus_matches, matches)]
            corpus_totals = [a + b for a, b in zip(corpus_totals, totals)]
            prediction_length += len(candidate)
            reference_length += len(target)
        bleu, precisions, penalty = combine(
            corpus_matches, corpus_totals, prediction_length, reference_length, smooth=False
        )
        return {
            "bleu": bleu,
            "precisions": precisions,
            "brevity_penalty": penalty,
            "length_ratio": prediction_length / reference_length if reference_length else 0.0,
            "bleu_per_example": per_example,
        }
