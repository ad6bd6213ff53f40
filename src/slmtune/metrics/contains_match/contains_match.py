"""Share of predictions that contain their reference, after normalisation (an `evaluate` metric module)."""

import re
import string

import datasets
import evaluate

_DESCRIPTION = (
    "Contains-the-reference match: 1 when the normalised reference (lower case, no punctuation, "
    "single spaces) occurs inside the normalised prediction, else 0."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: reference texts, one per prediction.
Returns:
    contains: share of examples whose prediction contains the reference.
    contains_per_example: 1 or 0 per example.
"""
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def normalise(text):
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class ContainsMatch(evaluate.Metric):
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
        hits = [int(normalise(ref) in normalise(pred)) for pred, ref in zip(predictions, references)]
        return {"contains": sum(hits) / len(hits) if hits else 0.0, "contains_per_example": hits}
