"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures between predictions and references, offline (an `evaluate` metric module)."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_TYPES = ("rouge1", "rouge2", "rougeL")
_DESCRIPTION = (
    "ROUGE-1 and ROUGE-2 (unigram and bigram overlap) and ROUGE-L (longest common subsequence) F-measures, "
    "with Porter stemming, from the rouge_score package; the mean over examples and each example's score."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: reference texts, one per prediction.
Returns:
    rouge1, rouge2, rougeL: mean F-measure over the examples.
    rouge1_per_example, rouge2_per_example, rougeL_per_example: the F-measure of each example.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, Chin-Yew. ROUGE: a package for automatic evaluation of summaries. 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(_TYPES), use_stemmer=True)
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        result = {}
        for name in _TYPES:
            each = [score[name].fmeasure for score in scores]
            result[name] = sum(each) / len(each) if each else 0.0
            result[f"{name}_per_example"] = each
        return result
