"""Fact accuracy: does an answer state the key facts of its reference?

The key facts of a test example are the data's own (`facts`: a list, or `;`-separated text), else those
extracted from the reference: numbers with their units (amounts, percentages, durations, dates), times,
e-mail addresses and web addresses, bare numbers (extensions, counts), and proper names that the question
does not already contain. An answer is right when it states every key fact; text is compared after
normalising case, thousands separators, number words ("five" -> 5), symbols (% -> percent, EUR -> euro) and
hyphens, so "5-day" states "5 days" but "450 euros" does not state "250 euros". No library checks facts this
way (ROUGE and BLEU reward the wording around a wrong number), hence this module.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def _words(text: str) -> list[str]:
    return text.split()


NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty"
        )
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90"}
WEEKDAYS = set(_words("monday tuesday wednesday thursday friday saturday sunday"))
MONTHS = _words(
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
)
UNITS = (
    {
        "percent": "percent",
        "euro": "euro",
        "euros": "euro",
        "eur": "euro",
        "dollar": "dollar",
        "dollars": "dollar",
        "usd": "dollar",
        "pound": "pound",
        "pounds": "pound",
        "gbp": "pound",
        "cent": "cent",
        "cents": "cent",
    }
    | {
        word + suffix: word
        for word in _words(
            "second minute hour day week month year decade night weekday character digit letter page word "
            "employee person people user device laptop item seat licence license session ticket level grade "
            "kilometre kilometer km mile kilogram kg gram gb mb tb meter metre"
        )
        for suffix in ("", "s")
    }
    | {month: month[:3] for month in MONTHS}
)
"""Words that make a number a quantity, mapped to one form (singular; months to three letters)."""
SYMBOLS = {"%": " percent", "€": " euro ", "$": " dollar ", "£": " pound "}
UNIT_GAP = 2
"""Words allowed between a number and its unit ("5 paid days" states "5 days")."""
NOT_IN_GAP = set(_words("a an the of per and or to in for every each times than by on at from"))
"""Words that end the search for a unit ("1.5 times the hours": 1.5 has none)."""
STOP_NAMES = {
    "i", "a", "an", "the", "you", "your", "we", "our", "it", "its", "they", "he", "she", "this", "that", "these",
    "there", "yes", "no", "if", "in", "on", "at", "for", "to", "of", "and", "or", "but", "only", "all", "each",
    "every", "please", "when", "what", "where", "who", "how", "why", "which", "do", "does", "can", "may", "must",
    "should", "is", "are", "be", "not", "after", "before", "during", "from", "with", "by", "as", "up", "use",
}  # fmt: skip
"""Sentence-opening words that are not names."""
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
URL = re.compile(r"https?://\S+[^\s.,;:!?)]|www\.\S+[^\s.,;:!?)]")
TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*(am|pm)\b|\b(\d{1,2}):(\d{2})\b", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?|[^\sa-z0-9]", re.IGNORECASE)


def normalise(text: str) -> str:
    """Lower case; thousands separators dropped (1,500 -> 1500); number words as digits; %, currency symbols and
    their codes as words after the number (EUR 40 -> 40 euro); hyphens and slashes as spaces."""
    text = re.sub(r"(?<=\d)[,\u202f\u00a0](?=\d{3}\b)", "", text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", text)
    text = re.sub(r"([€$£])\s*(\d+(?:\.\d+)?)", r"\2 \1", text)
    for symbol, word in SYMBOLS.items():
        text = text.replace(symbol, word)
    text = re.sub(r"\b(eur|usd|gbp)\s*(\d+(?:\.\d+)?)", r"\2 \1", text, flags=re.IGNORECASE)
    text = re.sub(r"(?<=\w)[-/–](?=\w)", " ", text.lower())
    text = re.sub(r"\b(per cent)\b", "percent", text)
    words = [NUMBER_WORDS.get(token, token) for token in re.findall(r"\S+", text)]
    return " ".join(words)


def _tokens(text: str) -> list[str]:
    """Normalised words, numbers and single punctuation marks."""
    return WORD.findall(normalise(text))


@dataclass(frozen=True)
class Fact:
    """One key fact: what a right answer must state, and what kind of thing it is."""

    text: str
    """As the reference (or the data's `facts`) writes it."""
    kind: str
    """quantity (a number with a unit), number, time, email, url, name or stated (from the data)."""
    number: str = ""
    """Quantity: the normalised number."""
    unit: str = ""
    """Quantity: the unit in its one form (day, euro, percent, mar...)."""


@dataclass
class Check:
    """The verdict on one answer."""

    facts: list[str]
    right: bool
    missing: list[str] = field(default_factory=list)
    """Key facts the answer does not state."""
    wrong: list[str] = field(default_factory=list)
    """For a missing quantity, what the answer states instead ("450 euros instead of 250 euros")."""

    def summary(self) -> str:
        if not self.facts:
            return "no key facts"
        if self.right:
            return "right: states " + ", ".join(self.facts)
        instead = [w.split(" instead of ")[-1] for w in self.wrong]
        parts = self.wrong + [f"missing {fact}" for fact in self.missing if fact not in instead]
        return "wrong: " + "; ".join(parts)


def _quantities(tokens: list[str]) -> list[tuple[str, str, int, int]]:
    """(number, unit, start, end) of each number followed by a unit within UNIT_GAP words, or preceded by a
    month ("March 31"); a number without one has unit ''."""
    found = []
    for i, token in enumerate(tokens):
        if not NUMBER.fullmatch(token):
            continue
        unit, end = "", i + 1
        for j in range(i + 1, min(i + 2 + UNIT_GAP, len(tokens))):
            if tokens[j] in UNITS:
                unit, end = UNITS[tokens[j]], j + 1
                break
            if not tokens[j].isalpha() or tokens[j] in NOT_IN_GAP:
                break
        if not unit and i and tokens[i - 1] in UNITS and UNITS[tokens[i - 1]] in {m[:3] for m in MONTHS}:
            unit = UNITS[tokens[i - 1]]
        found.append((token.rstrip("0").rstrip(".") if "." in token else token, unit, i, end))
    return found


def _names(text: str) -> list[str]:
    """Runs of capitalised words (CareWell Gold, IT Security, LumoraConnect); a sentence's first word counts only
    when it is not a common opener and looks like a name (inner capitals, all capitals, or a run of two)."""
    names = []
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        words = re.findall(r"[\w'’&]+|[^\w\s]", sentence)
        start, run = 0, []
        for index, word in enumerate([*words, "."]):
            if word.lower() in WEEKDAYS or (word[:1].isupper() and not (index == 0 and word.lower() in STOP_NAMES)):
                if not run:
                    start = index
                run.append(word)
                continue
            if run and not (start == 0 and len(run) == 1 and run[0][1:].islower() and run[0].lower() not in WEEKDAYS):
                names.append(" ".join(run))
            run = []
    return names


def extract_facts(reference: str, question: str = "", subject: frozenset[str] = frozenset()) -> list[Fact]:
    """The key facts of a reference answer: quantities, numbers, times, e-mail and web addresses, and names that
    neither the question nor `subject` (the data's own recurring names, see `subject_names`) already contain."""
    facts: list[Fact] = []
    rest = reference
    for pattern, kind in ((EMAIL, "email"), (URL, "url")):
        for match in pattern.findall(rest):
            facts.append(Fact(match.rstrip("."), kind))
        rest = pattern.sub(" ", rest)
    for match in TIME.finditer(rest):
        facts.append(Fact(match.group(0), "time"))
    rest = TIME.sub(" ", rest)
    tokens = _tokens(rest)
    # a bare number counts when the reference writes it in digits ("one-time" is not a fact)
    digits = re.sub(r"(?<=\d)(?:st|nd|rd|th)\b", "", re.sub(r"(?<=\d)[,\u202f\u00a0](?=\d{3}\b)", "", rest))
    question_words = set(_tokens(question))
    for number, unit, start, end in _quantities(tokens):
        if unit:
            facts.append(Fact(" ".join(tokens[start:end]), "quantity", number, unit))
        elif number not in question_words and re.search(rf"(?<![\w.]){re.escape(number)}(?![\w])", digits):
            facts.append(Fact(number, "number", number))
    for name in _names(rest):
        words = set(_tokens(name))
        if words & question_words or name.lower() in subject or any(name.lower() in f.text.lower() for f in facts):
            continue
        facts.append(Fact(name, "name"))
    unique: dict[str, Fact] = {}
    for fact in facts:
        unique.setdefault(fact.text.lower(), fact)
    return list(unique.values())


def stated_facts(value: Any) -> list[Fact] | None:
    """The data's own key facts (`facts`: a list, or `;`-separated), or None when the record has none."""
    if value is None or value == "" or value == []:
        return None
    items = value if isinstance(value, list) else str(value).split(";")
    facts = []
    for item in (str(item).strip() for item in items):
        if not item:
            continue
        quantities = [q for q in _quantities(_tokens(item)) if q[1]]
        if len(quantities) == 1 and len(_tokens(item)) <= 2 + UNIT_GAP:
            number, unit = quantities[0][:2]
            facts.append(Fact(item, "quantity", number, unit))
        else:
            facts.append(Fact(item, "stated"))
    return facts


def subject_names(references: list[str], share: float = 0.25) -> frozenset[str]:
    """Names in at least `share` of the references (e.g. the company of a knowledge base): the data's subject,
    not a key fact of any one answer."""
    counts = Counter(name.lower() for reference in references for name in set(_names(reference)))
    words = Counter(word for name, n in counts.items() for word in name.split() for _ in range(n))
    if len(references) < 4:
        return frozenset()
    limit = share * len(references)
    return frozenset(name for name, n in counts.items() if n >= limit or all(words[w] >= limit for w in name.split()))


def _states(answer: list[str], fact: Fact) -> bool:
    if fact.kind == "quantity":
        return any(n == fact.number and u == fact.unit for n, u, _, _ in _quantities(answer))
    wanted = _tokens(fact.text)
    if fact.kind == "number":
        return fact.number in answer
    return any(answer[i : i + len(wanted)] == wanted for i in range(len(answer) - len(wanted) + 1))


def check_answer(answer: str, facts: list[Fact]) -> Check:
    """Whether `answer` states every fact; the missing ones, and for a missing quantity what the answer says
    instead (a different number with the same unit)."""
    tokens = _tokens(answer)
    missing = [fact for fact in facts if not _states(tokens, fact)]
    wrong = []
    quantities = _quantities(tokens)
    for fact in missing:
        if fact.kind == "quantity":
            others = [" ".join(tokens[s:e]) for n, u, s, e in quantities if u == fact.unit and n != fact.number]
            if others:
                wrong.append(f"{others[0]} instead of {fact.text}")
    return Check([f.text for f in facts], not missing, [f.text for f in missing], wrong)


def key_facts(record: dict[str, Any], reference: str, question: str, subject: frozenset[str]) -> list[Fact]:
    """The record's own `facts` when it has them, else those extracted from its reference."""
    stated = stated_facts(record.get("facts"))
    return stated if stated is not None else extract_facts(reference, question, subject)


def fact_accuracy(checks: list[Check]) -> float:
    """Share of the answers with key facts that state all of them (nan when no example has any)."""
    scored = [check.right for check in checks if check.facts]
    return sum(scored) / len(scored) if scored else float("nan")
