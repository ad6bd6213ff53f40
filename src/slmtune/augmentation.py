"""Knowledge augmentation of the training split: more ways to ask each question and more ways to state each
answer, so that a fact seen in training is retrievable from new wording (a fact seen in one phrasing is
memorised, not learned: Allen-Zhu & Li, "Physics of Language Models 3.1"; Yang et al., "Synthetic continued
pretraining").

Generators:
- `rules` (offline, no model): question frames and word-order variants, questions built from the answer's own
  words, the answer restated as a plain statement, and (`augment.text`) the statements as raw text mixed in for
  continued pre-training.
- `model`: a local causal LM prompted to reword questions and answers.
- `endpoint`: any OpenAI-compatible server (llama.cpp, Ollama, vLLM...) through the `openai` client.

Whatever the generator, a generated question is kept only when it is a question, differs from every prompt of
its example, and keeps the question's own key facts; a restated answer only when it states every key fact of
the answer (`slmtune.facts`). Each generated row names its source row (`augmented_from`) and generator; rows that
match a validation or test prompt are dropped by the leak check.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any
from urllib.parse import urlparse

from .config import AugmentConfig
from .data import answer_key, find_leaks, normalise_text, prompt_key
from .errors import ConfigError, DataError
from .facts import check_answer, extract_facts
from .network import offline, url_is_local
from .progress import track

QUESTION_FRAMES = (
    "Quick question: {q}",
    "{q} Please answer briefly.",
    "Could you tell me this: {q}",
    "I would like to know something. {q}",
    "According to company policy, {ql}",
    "Can you help me? {q}",
    "{q} What does the policy say?",
    "Hi! {q} Thanks.",
    "Please explain: {ql}",
)
"""Frames around the original question ({q}; {ql} starts in lower case)."""
ANSWER_QUESTION_FRAMES = (
    "What is the rule about {topic}?",
    "Tell me about {topic}.",
    "What should I know about {topic}?",
    "What does the policy say about {topic}?",
    "Explain the policy on {topic}.",
)
"""Questions built from the answer's words with its key facts left out ({topic})."""
STATEMENT_FRAMES = (
    "According to the policy: {a}",
    "In short: {a}",
    "The answer: {a}",
    "Here is what the policy says. {a}",
)
"""Ways to state the answer ({a})."""
TOPIC_STOPWORDS = set(
    str.split(
        "a an the of to in on at for by with and or but is are was be been it its this that these those you your "
        "we our they their he she his her i my me can may must will would should could do does did have has had "
        "not no yes "
        "any every each all some up per than then there here what which who when where how why as from into over "
        "under after before during get gets got also only just plus through within about without between if much many "
        "take"
    )
)
PARAPHRASE_QUESTION = (
    "Rewrite the question below in different words, keeping its meaning and every name and number. "
    "Reply with the rewritten question only.\n\nQuestion: {text}"
)
PARAPHRASE_ANSWER = (
    "Rewrite the statement below in different words, keeping its meaning and every name, number and unit. "
    "Reply with the rewritten statement only.\n\nStatement: {text}"
)


def _lower_first(text: str) -> str:
    """The text to follow a frame's opening words: its first word in lower case when it is a common word."""
    first = text.split(" ", 1)[0]
    return text[:1].lower() + text[1:] if first.lower() in TOPIC_STOPWORDS else text


def _question_and_answer(record: dict[str, Any]) -> tuple[str, str] | None:
    """The single user turn (with its input) and the answer of a one-question record; None for others."""
    turns = [t for t in record.get("messages", []) if t["role"] != "system"]
    if len(turns) != 2 or turns[0]["role"] != "user":
        return None
    user = turns[0]
    question = user["content"] + (f"\n\n{user['input']}" if user.get("input") else "")
    return question, turns[1]["content"]


def word_order_variants(question: str) -> list[str]:
    """A few reorderings of common question shapes ("What is X?" -> "X: what is it?")."""
    q = question.strip().rstrip("?").strip()
    variants = []
    match = re.match(r"(?i)^(what|which|who) (is|are) (the )?(.+)$", q)
    if match:
        thing = match.group(4)
        variants += [
            f"{thing[:1].upper() + thing[1:]}: {match.group(1).lower()} {match.group(2)} it?",
            f"Tell me the {thing}.",
        ]
    match = re.match(r"(?i)^how (many|much|long|often) (.+)$", q)
    if match:
        variants += [f"{match.group(2)[:1].upper() + match.group(2)[1:]}: how {match.group(1).lower()}?"]
    # a yes/no question whose subject is one word, a pronoun or a name ("Does Lumora pay ..."); where a longer
    # subject ends cannot be told from the words alone ("Does the dental plan cover ..."), so those get none
    match = re.match(r"^(?i:(can|do|does|is|are|may|must)) ((?i:i|we|you|they|there)|[A-Z][\w-]*) (.+)$", q)
    if match:
        subject = match.group(2)
        subject = subject.lower() if subject.lower() in ("we", "you", "they", "there") else subject
        variants += [f"Is it true that {subject} {match.group(1).lower()} {match.group(3)}?"]
    return variants


def topic_phrases(answer: str, question: str) -> list[str]:
    """What the answer is about, as the runs of content words it is made of, its key facts left out ("You get 5 paid
    days of bereavement leave for the loss of an immediate family member" -> "bereavement leave", "loss",
    "immediate family member"): the cues a new wording of the question is likely to share with it."""
    text = answer
    for fact in extract_facts(answer, question):
        text = re.sub(re.escape(fact.text), " . ", text, flags=re.IGNORECASE)
    phrases, run = [], []
    for token in [*re.findall(r"[A-Za-z][\w'-]*|[^\w\s]", text), "."]:
        if token[0].isalpha() and token.lower() not in TOPIC_STOPWORDS:
            run.append(token)
            continue
        if run:
            phrases.append(" ".join(run))
        run = []
    found = []
    for phrase in phrases:
        first, _, rest = phrase.partition(" ")
        # the answer's first word is capitalised as a sentence's, unless it is a name: capitalised elsewhere too
        elsewhere = any(re.search(rf"(?<=\S )\b{re.escape(first)}\b", side) for side in (question, answer))
        first = first.lower() if answer.startswith(first) and not elsewhere else first
        phrase = f"{first} {rest}".strip()
        if phrase.lower() not in (p.lower() for p in found):
            found.append(phrase)
    return found


def keyword_query(question: str) -> str:
    """The question's content words only, as typed into a search box ("close relative dies paid time off?")."""
    words = [w for w in re.findall(r"[A-Za-z][\w'-]*|\d[\d.,%]*", question) if w.lower() not in TOPIC_STOPWORDS]
    return " ".join(words) + "?" if len(words) > 1 else ""


def rule_questions(question: str, answer: str) -> list[str]:
    """Question frames, word-order variants, the question as keywords, and questions about the answer's own
    phrases (one, or two together)."""
    single_line = "\n" not in question
    ql = _lower_first(question)
    found = [frame.format(q=question, ql=ql) for frame in QUESTION_FRAMES] if single_line else []
    if single_line:
        found += word_order_variants(question)
        found += [query] if (query := keyword_query(question)) else []
    phrases = topic_phrases(answer, question)
    # a phrase of one word ("portal") is rarely specific to one answer; two phrases together are
    topics = [p for p in phrases if " " in p][:3] + ([f"{phrases[0]} and {phrases[1]}"] if len(phrases) > 1 else [])
    found += [frame.format(topic=topic) for topic in topics for frame in ANSWER_QUESTION_FRAMES]
    return found


def rule_statements(answer: str) -> list[str]:
    """The answer in statement frames."""
    return [frame.format(a=answer) for frame in STATEMENT_FRAMES]


class Generator:
    """Rewrites text; `rewrite(prompt, n)` returns up to n candidate rewrites."""

    name = "none"

    def rewrite(self, prompt: str, n: int) -> list[str]:
        raise NotImplementedError


class ModelGenerator(Generator):
    """A local causal LM (a hub id or folder, loaded offline and safetensors-only) sampled with its chat template."""

    name = "model"

    def __init__(self, source: str, max_new_tokens: int, seed: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True).eval()
        except OSError as exc:
            raise ConfigError(
                f"augment.model '{source}': cannot load it ({str(exc).splitlines()[0]}); give a local model folder "
                "or a hub id that is in the cache."
            ) from None
        self.max_new_tokens = max_new_tokens
        torch.manual_seed(seed)

    def rewrite(self, prompt: str, n: int) -> list[str]:
        messages = [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, self.torch.Tensor) else ids["input_ids"]
        else:
            ids = self.tokenizer(prompt + "\n", return_tensors="pt").input_ids
        with self.torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=self.torch.ones_like(ids),
                do_sample=True,
                temperature=0.9,
                top_p=0.95,
                num_return_sequences=n,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]


class EndpointGenerator(Generator):
    """An OpenAI-compatible chat completions server; the key from the environment variable `augment.api_key_env`.
    A server beyond this machine is refused while HF_HUB_OFFLINE=1 (going online is an explicit choice)."""

    name = "endpoint"

    def __init__(self, config: AugmentConfig, seed: int) -> None:
        import openai

        url = config.endpoint
        if not url or not urlparse(url).scheme.startswith("http"):
            raise ConfigError(f"augment.endpoint must be an http(s) URL for generator=endpoint (got {url!r}).")
        if not url_is_local(url) and offline():
            raise ConfigError(
                f"augment.endpoint {url}: not on this machine and the pipeline is offline (HF_HUB_OFFLINE=1); "
                "set HF_HUB_OFFLINE=0 to use a remote server, or use augment.generator=rules."
            )
        self.openai = openai
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.client = openai.OpenAI(base_url=url, api_key=key or "none", timeout=config.timeout, max_retries=0)
        self.model = config.endpoint_model
        self.url = url
        self.key_env = config.api_key_env
        self.max_tokens = config.max_new_tokens
        self.seed = seed

    def rewrite(self, prompt: str, n: int) -> list[str]:
        found = []
        for index in range(n):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0.9,
                    max_tokens=self.max_tokens,
                    seed=self.seed + index,
                )
            except self.openai.APIConnectionError as exc:
                raise DataError(
                    f"augment.endpoint {self.url}: unreachable ({exc.__cause__ or exc}); start the server or use "
                    "augment.generator=rules."
                ) from None
            except self.openai.APIStatusError as exc:
                raise DataError(
                    f"augment.endpoint {self.url}: the server answered HTTP {exc.status_code} "
                    f"({str(exc.message)[:200]}); check augment.endpoint_model and the key in "
                    f"${self.key_env or '{augment.api_key_env}'}."
                ) from None
            found += [choice.message.content or "" for choice in response.choices]
        return [text.strip().strip('"').strip() for text in found]


def _keeps_facts(question: str, candidate: str) -> bool:
    """A reworded question must keep the numbers, names and addresses of the original."""
    return check_answer(candidate, extract_facts(question)).right


def generated_questions(generator: Generator | None, question: str, answer: str, n: int) -> list[str]:
    """Candidate rewordings of a question: the rules' variants, or a model's (kept when they are questions that
    keep the original's key facts)."""
    if generator is None:
        return rule_questions(question, answer)
    found = generator.rewrite(PARAPHRASE_QUESTION.format(text=question), n)
    return [
        q
        for q in (line.splitlines()[0].strip() if line else "" for line in found)
        if q.endswith("?") and _keeps_facts(question, q)
    ]


def generated_statements(generator: Generator | None, answer: str, n: int) -> list[str]:
    """Candidate restatements of an answer: the rules' frames, or a model's that state every key fact of it."""
    if generator is None:
        return rule_statements(answer)
    facts = extract_facts(answer)
    found = generator.rewrite(PARAPHRASE_ANSWER.format(text=answer), n)
    return [s for s in found if s and check_answer(s, facts).right]


def make_generator(config: AugmentConfig, base_model: str, seed: int) -> Generator | None:
    """The configured generator (None: the rules)."""
    if config.generator == "model":
        return ModelGenerator(config.model or base_model, config.max_new_tokens, seed)
    if config.generator == "endpoint":
        return EndpointGenerator(config, seed)
    return None


def _pick(candidates: list[str], n: int, seen: set[str], rng: random.Random) -> list[str]:
    """Up to n distinct candidates not yet seen (compared normalised), in a seeded order; the picked ones become
    seen."""
    order = list(dict.fromkeys(candidates))
    rng.shuffle(order)
    picked = []
    for text in order:
        key = normalise_text(text)
        if len(picked) < n and key and key not in seen:
            seen.add(key)
            picked.append(text)
    return picked


def augment_answer(
    records: list[dict[str, Any]], generator: Generator | None, config: AugmentConfig, rng: random.Random
) -> list[dict[str, Any]]:
    """The generated rows of one answer (a fact), given the training records that ask for it: `config.questions`
    new questions spread over its wordings (so that a fact the data asks once gets as many as one it asks three
    times), each paired with the answer as the data gives it (the form the model should answer in); and once per
    answer, with `config.text`, the answer and its restatements as plain statements."""
    pairs = [pair for pair in map(_question_and_answer, records) if pair is not None]
    if not pairs:
        return []
    name = generator.name if generator else "rules"
    seen_q = {normalise_text(question) for question, _ in pairs}
    rows = []
    for index, (record, (question, answer)) in enumerate(zip(records, pairs)):
        wanted = config.questions // len(pairs) + (index < config.questions % len(pairs))
        candidates = generated_questions(generator, question, answer, wanted) if wanted else []
        system = [t for t in record["messages"] if t["role"] == "system"]
        base = {"origin": record["origin"], "category": record.get("category", ""), "augmented_from": record["source"]}
        for number, q in enumerate(_pick(candidates, wanted, seen_q, rng), start=1):
            messages = [*system, {"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            rows.append(base | {"generator": name, "source": f"{record['source']}#q{number}", "messages": messages})
    if config.text:
        record, (_, answer) = records[0], pairs[0]
        seen_a = {normalise_text(answer)}
        statements = _pick(generated_statements(generator, answer, config.statements), config.statements, seen_a, rng)
        base = {"origin": record["origin"], "category": record.get("category", ""), "augmented_from": record["source"]}
        for number, statement in enumerate([answer, *statements], start=1):
            rows.append(base | {"generator": name, "source": f"{record['source']}#t{number}", "text": statement})
    return rows


def drop_ambiguous(generated: list[dict[str, Any]], train: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Generated questions that two different answers would claim ("Tell me about CareWell Gold." from the Gold
    plan's deductible and from its premium) teach the model to guess: they are dropped, with their count."""
    answers: dict[str, set[str]] = {}
    for record in [*train, *generated]:
        if _question_and_answer(record) is not None:
            answers.setdefault(prompt_key(record), set()).add(answer_key(record))
    kept = [r for r in generated if "messages" not in r or len(answers.get(prompt_key(r), ())) < 2]
    return kept, len(generated) - len(kept)


def augment_split(
    splits: dict[str, list[dict[str, Any]]], config: AugmentConfig, base_model: str, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training split followed by its generated rows (leaks into validation or test dropped), with stats."""
    train = splits["train"]
    stats: dict[str, Any] = {"generator": config.generator, "original": len(train), "generated": 0, "by_kind": {}}
    if config.generator == "none":
        return train, stats
    generator = make_generator(config, base_model, seed)
    rng = random.Random(seed)
    by_answer: dict[str, list[dict[str, Any]]] = {}
    for record in train:
        if _question_and_answer(record) is not None:
            by_answer.setdefault(answer_key(record), []).append(record)
    generated = []
    for records in track(list(by_answer.values()), desc=f"augment ({config.generator})", unit="answer"):
        generated += augment_answer(records, generator, config, rng)
    generated, ambiguous = drop_ambiguous(generated, train)
    kept, leaks = find_leaks({"train": generated, "val": splits.get("val", []), "test": splits.get("test", [])})
    stats["generated"] = len(kept)
    stats["dropped_leaks"] = len(leaks)
    stats["dropped_ambiguous"] = ambiguous
    stats["by_kind"] = {
        "questions": sum("messages" in r for r in kept),
        "statements_as_text": sum("text" in r for r in kept),
    }
    stats["sources_augmented"] = len({r["augmented_from"] for r in kept})
    return train + kept, stats
