"""The augment stage: knowledge augmentation of the training split, by the rules and through a real local
OpenAI-compatible HTTP endpoint; generated rows name their source row and never match a validation or test prompt."""

import json
import random
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import TINY_OVERRIDES, make_project, run, stage_env
from slmtune.augmentation import Generator, augment_answer, augment_split
from slmtune.config import AugmentConfig
from slmtune.data import prompt_key

QUESTION = "How many days of bereavement leave are there?"
ANSWER = "You get 5 paid days of bereavement leave for the loss of an immediate family member."


def record(source="kb.csv:2", question=QUESTION, answer=ANSWER):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"source": source, "origin": "kb", "category": "", "messages": messages}


def test_rules_ask_each_question_in_new_ways_and_restate_its_answer():
    config = AugmentConfig(generator="rules", questions=6, statements=2, text=True)
    rows = augment_answer([record()], None, config, random.Random(0))
    pairs = [r for r in rows if "messages" in r]
    texts = [r["text"] for r in rows if "text" in r]
    questions = [r["messages"][0]["content"] for r in pairs]
    assert len(pairs) == 6 and len(set(questions)) == 6 and QUESTION not in questions
    assert all(r["augmented_from"] == "kb.csv:2" and r["generator"] == "rules" for r in rows)
    assert len({r["source"] for r in rows}) == len(rows) and all(r["source"].startswith("kb.csv:2#") for r in rows)
    # each new question gets the answer as the data gives it; the statements still state the fact; questions
    # built from the answer leave the fact out
    assert all(r["messages"][1]["content"] == ANSWER for r in pairs)
    assert len(texts) == 3 and ANSWER in texts and all("5 paid days" in t for t in texts)
    from_answer = [q for q in questions if "immediate family member" in q]
    assert from_answer and not any("5" in q for q in from_answer)
    # the same seed gives the same rows
    assert augment_answer([record()], None, config, random.Random(0)) == rows


def test_a_fact_asked_once_gets_as_many_new_questions_as_one_asked_three_times():
    config = AugmentConfig(generator="rules", questions=6, statements=2, text=True)
    once = [record("kb.csv:2")]
    thrice = [
        record("kb.csv:5", "What is the gym subsidy?", "Lumora pays a gym subsidy of 40 euros per month."),
        record("kb.csv:6", "Does Lumora pay for the gym?", "Lumora pays a gym subsidy of 40 euros per month."),
        record("kb.csv:7", "Is there a wellness allowance?", "Lumora pays a gym subsidy of 40 euros per month."),
    ]
    train, stats = augment_split({"train": once + thrice, "val": [], "test": []}, config, "unused", 42)
    generated = train[4:]
    questions = [r for r in generated if "messages" in r]
    by_source = {source: sum(r["augmented_from"] == source for r in questions) for source in ("kb.csv:5", "kb.csv:6")}
    assert sum(r["augmented_from"] == "kb.csv:2" for r in questions) == 6 == len(questions) - 6
    assert by_source == {"kb.csv:5": 2, "kb.csv:6": 2}  # 6 spread over the three wordings
    asked = [r["messages"][0]["content"] for r in questions]
    assert len(set(asked)) == len(asked)  # no two wordings of a fact generate the same question
    texts = [r["text"] for r in generated if "text" in r]
    assert len(texts) == 6 and len(set(texts)) == 6  # the answer and 2 restatements, once per answer
    assert stats["sources_augmented"] == 4


def test_no_generated_prompt_matches_a_validation_or_test_prompt():
    config = AugmentConfig(generator="rules", questions=50, statements=0, text=False)  # every candidate
    held_out = record("kb.csv:9", f"Quick question: {QUESTION}")
    splits = {"train": [record()], "val": [], "test": [held_out]}
    train, stats = augment_split(splits, config, "models/base", 42)
    assert stats["dropped_leaks"] == 1 and stats["generated"] == len(train) - 1 > 10
    assert prompt_key(held_out) not in {prompt_key(r) for r in train}
    off = augment_split(splits, AugmentConfig(generator="none"), "models/base", 42)
    assert off == ([record()], {"generator": "none", "original": 1, "generated": 0, "by_kind": {}})


def test_questions_from_the_answers_phrases_and_the_question_as_keywords_leave_the_facts_out():
    from slmtune.augmentation import keyword_query, rule_questions, topic_phrases

    assert topic_phrases(ANSWER, QUESTION) == ["bereavement leave", "loss", "immediate family member"]
    gold = "CareWell Gold has an annual deductible of 250 euros."
    assert topic_phrases(gold, "What is the deductible on the CareWell Gold plan?") == [
        "CareWell Gold",
        "annual deductible",
    ]
    software = "Request software through the ServiceDesk portal; requests are approved within 2 business days."
    # the sentence's capital goes, the key fact (ServiceDesk, a name the question lacks) is left out
    assert topic_phrases(software, "How do I get new software installed?")[:2] == ["request software", "portal"]
    assert keyword_query("If a close relative dies, how much paid time off can I take?") == (
        "close relative dies paid time off?"
    )
    asked = rule_questions(QUESTION, ANSWER)
    assert "Tell me about bereavement leave and loss." in asked and "Tell me about immediate family member." in asked
    assert "Tell me about loss." not in asked  # one word is rarely one answer's
    assert not any("5" in q for q in asked if "family" in q)


def test_a_generated_question_two_answers_would_claim_is_dropped():
    config = AugmentConfig(generator="rules", questions=50, statements=0, text=False)  # every candidate
    deductible = record(
        "kb.csv:2",
        "What is the deductible on the CareWell Gold plan?",
        "CareWell Gold has an annual deductible of 250 euros.",
    )
    premium = record(
        "kb.csv:3", "What does the CareWell Gold plan cost?", "For CareWell Gold, the premium is 40 euros a month."
    )
    train, stats = augment_split({"train": [deductible, premium], "val": [], "test": []}, config, "unused", 42)
    claims: dict[str, set[str]] = {}
    for row in train:
        claims.setdefault(prompt_key(row), set()).add(row["messages"][-1]["content"])
    # "Tell me about CareWell Gold." and the other four frames of it, from each of the two answers
    assert stats["dropped_ambiguous"] == 10
    assert all(len(answers) == 1 for answers in claims.values()) and len(train) == 2 + stats["generated"] > 20


class Rewriter(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat completions endpoint that rewords by rule, one good and two bad rewrites in turn
    (by the request's seed): a good one, a non-question / a wrong number, and an unchanged copy."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Rewriter.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        kind = body["seed"] % 3
        if "Question: " in prompt:
            text = prompt.split("Question: ", 1)[1]
            reply = [f"In other words, {text}", "I cannot help with that.", text][kind]
        else:
            text = prompt.split("Statement: ", 1)[1]
            wrong = re.sub(r"\d+", lambda m: str(int(m.group(0)) + 1), text)
            reply = [f"Put simply: {text}", wrong if wrong != text else "Nothing to add.", text.upper()][kind]
        answer = {
            "id": "rw",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def rewriter():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Rewriter)
    Rewriter.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_endpoint_augmentation_trains_the_tiny_model_and_fails_in_one_line_when_unreachable(
    tmp_path, tiny_model_dir, rewriter
):
    url = f"http://127.0.0.1:{rewriter.server_address[1]}/v1"
    overrides = [
        f"model.source={tiny_model_dir}",
        "model.gguf_file=null",
        *TINY_OVERRIDES,
        "augment.generator=endpoint",
        f"augment.endpoint={url}",
        "augment.endpoint_model=rewriter-1",
        "augment.api_key_env=REWRITER_KEY",
        "augment.questions=3",
        "augment.statements=3",
    ]
    project = make_project(tmp_path / "project", overrides)
    env = stage_env() | {"REWRITER_KEY": "secret-key"}
    result = subprocess.run(["dvc", "repro", "train"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'augment'" in result.stdout and "Running stage 'train'" in result.stdout

    assert Rewriter.requests and all(r["path"] == "/v1/chat/completions" for r in Rewriter.requests)
    assert {r["auth"] for r in Rewriter.requests} == {"Bearer secret-key"}
    assert {r["body"]["model"] for r in Rewriter.requests} == {"rewriter-1"}
    stats = json.loads((project / "reports/augment_stats.json").read_text())
    rows = [json.loads(line) for line in (project / "data/augmented/train.jsonl").read_text().splitlines()]
    prepared = (project / "data/prepared/train.jsonl").read_text().splitlines()
    generated = rows[len(prepared) :]
    assert stats["generator"] == "endpoint" and stats["generated"] == len(generated) > 0
    sources = {json.loads(line)["source"]: json.loads(line) for line in prepared}
    for row in generated:
        original = sources[row["augmented_from"]]
        assert row["generator"] == "endpoint"
        if "messages" in row:  # only the good rewrite of a question, with the original answer
            question = original["messages"][-2]["content"]
            assert row["messages"][-2]["content"] == f"In other words, {question}"
            assert row["messages"][-1]["content"] == original["messages"][-1]["content"]
        else:  # statements: the answer and its good restatement, never a changed number or the copy in capitals
            answer = original["messages"][-1]["content"]
            assert row["text"] in (answer, f"Put simply: {answer}")
    report = (project / "reports/data_report.md").read_text()
    assert f"Knowledge augmentation (endpoint): {stats['generated']} generated training rows" in report
    token_stats = json.loads((project / "reports/token_stats.json").read_text())
    pairs = sum("messages" in row for row in rows)  # text rows are chunked together, as raw text always is
    assert pairs < token_stats["splits"]["train"]["examples"] < len(rows)

    # the server gone: one line naming the endpoint, exit 1, the previous output untouched
    before = (project / "data/augmented/train.jsonl").read_bytes()
    rewriter.shutdown()
    rewriter.server_close()
    script = [sys.executable, "-P", "stages/augment.py"]
    failed = subprocess.run(script, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"error: augment.endpoint {url}: unreachable")
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert (project / "data/augmented/train.jsonl").read_bytes() == before


def test_a_remote_endpoint_is_refused_while_offline(tmp_path, tiny_model_dir):
    overrides = [f"model.source={tiny_model_dir}", "augment.generator=endpoint", "augment.endpoint=http://10.0.0.1/v1"]
    project = make_project(tmp_path / "project", overrides)
    run(["dvc", "repro", "prepare"], project)
    failed = subprocess.run(
        [sys.executable, "-P", "stages/augment.py"], cwd=project, env=stage_env(), capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert failed.stderr == (
        "error: augment.endpoint http://10.0.0.1/v1: not on this machine and the pipeline is offline "
        "(HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to use a remote server, or use augment.generator=rules.\n"
    )
    assert not (project / "data/augmented").exists()


def test_a_local_model_rewords_and_only_questions_that_keep_their_facts_stay(tiny_model_dir):
    """The tiny model's random words are neither questions nor statements of the facts: all are dropped; the
    generator runs the model's real loading and sampling."""
    config = AugmentConfig(generator="model", model=str(tiny_model_dir), questions=2, statements=2, max_new_tokens=8)
    splits = {"train": [record(), record("kb.csv:3", "What is the gym subsidy?", "It is 40 euros per month.")]}
    train, stats = augment_split(splits | {"val": [], "test": []}, config, "unused", 42)
    assert stats["generator"] == "model" and stats["generated"] == len(train) - 2
    # what remains are the original answers as text (statements: the answers themselves are always kept)
    assert all(row.get("text") in (ANSWER, "It is 40 euros per month.") for row in train[2:])
    missing = AugmentConfig(generator="model", model=str(tiny_model_dir.parent / "absent"))
    with pytest.raises(Exception, match="augment.model .*cannot load it"):
        augment_split(splits | {"val": [], "test": []}, missing, "unused", 42)


class Canned(Generator):
    """A generator whose rewrites are fixed: the filter, not the model, is under test."""

    name = "canned"

    def __init__(self, questions, statements):
        self.replies = {"Question": questions, "Statement": statements}

    def rewrite(self, prompt, n):
        return self.replies["Question" if "Question: " in prompt else "Statement"][:n]


def test_a_models_rewrites_are_kept_only_when_they_keep_the_facts():
    question = "Is the gym subsidy 40 euros at CareWell?"
    answer = "Lumora pays a gym subsidy of 40 euros per month through CareWell."
    generator = Canned(
        questions=[
            "Does CareWell give a 40 euro gym subsidy?",  # kept
            "Tell me about the gym subsidy.",  # not a question
            "Is the gym subsidy 50 euros at CareWell?",  # another number
            "Is the gym subsidy paid at all?",  # the number and the name gone
            "is the gym subsidy 40 euros at carewell?",  # the original, up to case
        ],
        statements=[
            "Through CareWell, Lumora gives 40 euros a month for the gym.",  # kept
            "Lumora pays a gym subsidy of 45 euros per month through CareWell.",  # wrong number
            "Lumora pays a gym subsidy.",  # facts gone
        ],
    )
    config = AugmentConfig(generator="endpoint", endpoint="http://127.0.0.1:1/v1", questions=5, statements=3)
    rows = augment_answer([record("kb.csv:4", question, answer)], generator, config, random.Random(0))
    questions = [r["messages"][0]["content"] for r in rows if "messages" in r]
    assert questions == ["Does CareWell give a 40 euro gym subsidy?"]
    assert sorted(r["text"] for r in rows if "text" in r) == sorted(
        [answer, "Through CareWell, Lumora gives 40 euros a month for the gym."]
    )
    assert {r["generator"] for r in rows} == {"canned"}


def test_word_order_variants_keep_names_and_skip_subjects_they_cannot_delimit():
    from slmtune.augmentation import word_order_variants

    reordered = ["Notice period: what is it?", "Tell me the notice period."]
    assert word_order_variants("What is the notice period?") == reordered
    assert word_order_variants("How many sick days do I get?") == ["Sick days do I get: how many?"]
    assert word_order_variants("Does Lumora match pension contributions?") == [
        "Is it true that Lumora does match pension contributions?"
    ]
    assert word_order_variants("Can I carry leave over?") == ["Is it true that I can carry leave over?"]
    assert word_order_variants("Does the dental plan cover braces?") == []  # where would the subject end?
