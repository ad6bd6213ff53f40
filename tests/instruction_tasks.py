"""An instruction set shaped like public data (Alpaca, Dolly): varied tasks, mixed lengths, built here.

Public instruction sets mix many kinds of task: classify, extract, convert, compute, rewrite, summarise, answer,
write, plan. Their answers run from one word to several hundred tokens. This module writes such a set as
instruction / input / output JSONL, deterministically: real text from the project's own sample files (reviews,
open and closed questions, everyday requests, support conversations, dialogues to summarise, the handbook) in
tasks they were not written for, and generated tasks whose answers are exact (arithmetic, unit conversion,
sorting, extraction) or long (step-by-step plans, e-mails). With SmolLM2's chat template an example averages
roughly 110-150 tokens and the longest reach about 450.

    python tests/instruction_tasks.py OUT.jsonl [--rows 175] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

from datasets import load_from_disk

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"

GOALS = (
    "organise a two-day team offsite",
    "move the company website to a new hosting provider",
    "prepare for a job interview at a software company",
    "start a small vegetable garden on a balcony",
    "run a customer survey about a new product",
    "plan a family trip to the mountains",
    "reduce the office's electricity bill",
    "onboard a new engineer in their first month",
    "write and publish a short technical blog post",
    "replace an old accounting spreadsheet with a proper tool",
    "organise a charity run in the city park",
    "learn the basics of a new programming language in six weeks",
)
STEPS = (
    "Write down what success looks like for the effort to {goal}, in one or two sentences everyone can agree on.",
    "List the people who need to be involved and ask each of them what they need before the work starts.",
    "Set a budget, with a margin of about ten percent for the costs nobody thought of at first.",
    "Choose a date for the end of the work and mark two check-in dates before it.",
    "Break the work into tasks that take no more than a day each, and give every task one owner.",
    "Check which tools, rooms or accounts you will need and book or request them early.",
    "Tell everyone affected what will change, when it will change and whom to ask with questions.",
    "Prepare a short checklist for the day itself so that nothing depends on one person's memory.",
    "Try the riskiest part first on a small scale, so that a problem shows up while there is still time to fix it.",
    "Keep a shared document with decisions and open questions, and update it after every meeting.",
    "Review the progress at each check-in and move or cut tasks when the plan slips.",
    "Collect feedback from the people involved as soon as the work is done, while they still remember the details.",
    "Write a one-page summary of what worked, what did not and what you would do differently next time.",
    "Thank the people who helped, and share the results with everyone who was affected.",
)
WHY = (
    "This keeps the work focused when new ideas come up halfway through.",
    "Without it, people tend to discover the same problem twice, each on their own.",
    "It also gives you something concrete to show when someone asks how things are going.",
    "A small delay here is cheap; the same delay a week before the end is not.",
    "Most plans that fail do so because this step was skipped or done in a hurry.",
    "Ask one person to own it, otherwise everyone will assume that someone else has done it.",
)
NAMES = ("Maria", "David", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Lucas", "Priya", "Tom")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
ITEMS = (("notebook", 3), ("chair", 45), ("monitor", 160), ("keyboard", 25), ("desk lamp", 18), ("headset", 39))
WORDS = (
    "river", "window", "budget", "garden", "planet", "market", "silver", "ticket", "coffee", "bridge", "forest",
    "engine", "letter", "museum", "pencil", "rocket", "summer", "violin", "winter", "yellow", "anchor", "candle",
)  # fmt: skip


def _reviews() -> list[tuple[str, str]]:
    with open(RAW / "product_reviews.csv", encoding="utf-8") as handle:
        return [(row["review"], row["sentiment"]) for row in csv.DictReader(handle)]


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (RAW / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _handbook_paragraphs() -> list[str]:
    text = (RAW / "lumora_handbook.txt").read_text(encoding="utf-8")
    return [p.strip().replace("\n", " ") for p in text.split("\n\n") if len(p.split()) > 15]


def _dialogues() -> list[tuple[str, str]]:
    data = load_from_disk(str(RAW / "dialogue_summaries"))
    return [(row["dialogue"], row["summary"]) for split in data.values() for row in split]


def _plan(rng: random.Random) -> dict[str, str]:
    goal = rng.choice(GOALS)
    count = rng.choice((4, 5, 6, 8, 10, 12))
    chosen = sorted(rng.sample(range(len(STEPS)), min(count, len(STEPS))))
    detail = rng.random() < 0.5  # half the plans explain each step: the long tail
    lines = [f"{i}. {STEPS[k].format(goal=goal)}" for i, k in enumerate(chosen, 1)]
    steps = "\n".join(line + (f" {rng.choice(WHY)}" if detail else "") for line in lines)
    return {"instruction": f"Write a step-by-step plan to {goal}.", "input": "", "output": steps}


def _email(rng: random.Random) -> dict[str, str]:
    name, sender = rng.sample(NAMES, 2)
    first, second = rng.sample(DAYS, 2)
    hour = rng.choice((9, 10, 11, 14, 15, 16))
    return {
        "instruction": f"Write a short, polite e-mail to {name} asking to move our meeting from {first} to {second}.",
        "input": "",
        "output": (
            f"Subject: Moving our meeting to {second}\n\nHi {name},\n\nWould it be possible to move our meeting from "
            f"{first} to {second}? Something came up on {first} that I cannot move. {second} at {hour}:00 would work "
            f"well for me, but I am happy to fit around your calendar if another time suits you better.\n\nSorry for "
            f"the change, and thank you for your flexibility.\n\nBest regards,\n{sender}"
        ),
    }


def _arithmetic(rng: random.Random) -> dict[str, str]:
    item, price = rng.choice(ITEMS)
    count, shipping = rng.randint(2, 40), rng.choice((0, 5, 12, 20))
    cost = count * price
    extra = f" and pays {shipping} euros for shipping" if shipping else ""
    answer = f"The {item}s cost {count} × {price} = {cost} euros"
    answer += f"; with {shipping} euros of shipping the total is {cost + shipping} euros." if shipping else "."
    return {
        "instruction": f"A team buys {count} {item}s at {price} euros each{extra}. What is the total cost?",
        "input": "",
        "output": answer,
    }


def _conversion(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        c = rng.randint(-20, 40)
        f = c * 9 / 5 + 32
        return {
            "instruction": f"Convert {c} degrees Celsius to Fahrenheit.",
            "input": "",
            "output": f"{c} °C is {f:g} °F (multiply by 9/5, then add 32).",
        }
    if kind == 1:
        km = rng.randint(2, 500)
        return {
            "instruction": f"How many miles is {km} kilometres?",
            "input": "",
            "output": f"{km} kilometres is about {km * 0.621371:.1f} miles.",
        }
    kg = rng.randint(1, 120)
    return {
        "instruction": f"Convert {kg} kilograms to pounds.",
        "input": "",
        "output": f"{kg} kg is about {kg * 2.20462:.1f} pounds.",
    }


def _sorting(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(4, 9))
    return {
        "instruction": "Sort these words alphabetically and return them as a comma-separated list.",
        "input": ", ".join(words),
        "output": ", ".join(sorted(words)),
    }


def rows(count: int = 175, seed: int = 0) -> list[dict[str, str]]:
    """`count` instruction rows, the same for the same seed: a shuffled mix of every task kind."""
    rng = random.Random(seed)
    reviews, paragraphs, dialogues = _reviews(), _handbook_paragraphs(), _dialogues()
    real: list[dict[str, str]] = []
    for review, sentiment in reviews[:10]:
        real.append(
            {
                "instruction": "Classify the sentiment of this product review as positive or negative.",
                "input": review,
                "output": sentiment.capitalize() + ".",
            }
        )
    for row in _jsonl("dolly_sample.jsonl"):
        real.append({"instruction": row["instruction"], "input": row.get("context", ""), "output": row["response"]})
    for row in _jsonl("polite_assistant.jsonl")[:20]:
        question = re.sub(r"<\|\w+\|>\n?", "", row["prompt"]).strip()
        real.append({"instruction": question, "input": "", "output": row["response"]})
    for dialogue, summary in dialogues:
        task = "Summarise this conversation in one sentence."
        real.append({"instruction": task, "input": dialogue, "output": summary})
    for paragraph in paragraphs:
        numbers = re.findall(r"\d+(?:[.,]\d+)?", paragraph)
        if numbers:
            real.append(
                {
                    "instruction": "List every number that appears in this text, in order, separated by commas.",
                    "input": paragraph,
                    "output": ", ".join(numbers),
                }
            )
    for paragraph in paragraphs:
        sentences = [t.strip() for t in re.split(r"(?<=[.!?])\s+", paragraph) if t.strip()]
        real.append(
            {
                "instruction": "Rewrite this text as a bulleted list, one point per sentence.",
                "input": paragraph,
                "output": "\n".join(f"- {sentence}" for sentence in sentences),
            }
        )
    makers = (_plan, _plan, _plan, _plan, _email, _email, _arithmetic, _conversion, _sorting)
    mixed, seen = [], set()
    candidates = iter(real)
    while len(mixed) < count:  # the real rows first, then generated ones; no prompt twice
        row = next(candidates, None) or rng.choice(makers)(rng)
        key = " ".join(re.findall(r"\w+", (row["instruction"] + " " + row["input"]).lower()))
        if key not in seen:
            seen.add(key)
            mixed.append(row)
    rng.shuffle(mixed)
    return mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=175)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in rows(args.rows, args.seed):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
