"""Benchmark data that looks like users' instruction data: deterministic, built here, no download.

Public instruction sets (Alpaca, Dolly, OpenHermes...) have short instructions and answers whose length spreads
over two orders of magnitude: most are a paragraph, a long tail runs to several hundred tokens. This module writes
such a set (instruction / input / output JSONL) from a fixed vocabulary and a seeded generator: answer lengths are
log-normal (median ~55 words) and clipped to 400 words, a fifth of the tasks carry an input passage, so that with
SmolLM2's chat template an example averages ~140 tokens and the longest reach ~500.

    python benchmarks/instruction_data.py OUT.jsonl [--rows 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the a of to and in is that for it as with was on be by this are or from at which an have not they but has can "
    "all their were one more when there will also been would into its other some time these two may first then do "
    "any like new such most only over used could after made many before where should system data model user team "
    "service customer order account report process value number result change policy request support product price "
    "market energy water plant city river history science method question answer example reason problem project "
    "design network server file record table field query budget contract invoice payment delivery schedule meeting "
    "review release version update feature test training language word sentence text summary letter email message "
    "note list step rule limit level small large early late simple common important different possible available "
    "public private local general specific recent main major similar certain clear easy hard quick slow strong weak "
    "high low write explain describe compare list give find show make keep move turn start stop open close build "
    "check choose follow include provide require allow create remove increase reduce improve measure because "
    "although while since unless until whether however therefore instead otherwise meanwhile people company country "
    "world school family group area case point fact part place week year day"
).split()
VERBS = "Explain Describe Summarise Compare List Outline Write Give Suggest Classify Rewrite Translate".split()  # noqa: SIM905


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def paragraph(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 22))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        instruction = f"{rng.choice(VERBS)} {paragraph(rng, rng.randint(6, 24))[:-1].lower()}?"
        has_input = rng.random() < 0.2
        answer_words = min(400, max(3, round(math.exp(rng.gauss(math.log(55), 0.82)))))
        result.append(
            {
                "instruction": instruction,
                "input": paragraph(rng, rng.randint(20, 70)) if has_input else "",
                "output": paragraph(rng, answer_words),
            }
        )
    return result


def write_instruction_set(path: Path, count: int = 400, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(count, seed)), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_instruction_set(args.output, args.rows, args.seed)


if __name__ == "__main__":
    main()
