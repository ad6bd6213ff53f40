"""`slmtune data add`: a user's own file to a report in three commands (`data add`, `dvc repro`, open the
report), shapes recognised from columns and values, an unplaceable file refused before anything is written,
and the pipeline's progress watched in a pseudo-terminal on data shaped like public instruction data."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import random
import re
import select
import shutil
import struct
import sys
import termios
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import FIXTURES, REPO, SLMTUNE, kb_rows, make_project, run, sample_texts, stage_env
from slmtune.errors import DataError
from slmtune.formats import read_source, source_format
from slmtune.intake import detect_shape

FAST_CONF = {
    "train": {"max_steps": 6, "eval_steps": 3, "batch_size": 4},
    "eval": {"max_new_tokens": 8},
}


def shape_of(path: Path):
    return detect_shape(read_source(str(path), source_format(str(path), "auto"))[0], str(path))


def test_every_known_shape_is_recognised_with_its_column_mapping(tmp_path):
    parquet = tmp_path / "kb.parquet"
    pq.write_table(pa.Table.from_pylist(kb_rows()), parquet)
    expected = {
        FIXTURES / "instruction.csv": ("instruction", {}),
        FIXTURES / "dolly.jsonl": ("instruction", {"input": "context", "output": "response"}),
        FIXTURES / "prompt_response.jsonl": ("instruction", {"instruction": "prompt", "output": "response"}),
        parquet: ("instruction", {"instruction": "question", "input": "context", "output": "answer"}),
        FIXTURES / "chat_messages.jsonl": ("chat", {}),
        FIXTURES / "chat_sharegpt.json": ("chat", {"messages": "conversations"}),
        FIXTURES / "raw_text.txt": ("text", {}),
        REPO / "data/raw/product_reviews.csv": ("label", {"text": "review", "label": "sentiment"}),
    }
    with_facts = tmp_path / "qa_facts.csv"
    with_facts.write_text('Question,Answer,Key_Facts\n"Gold deductible?","It is 250 euros.","250 euros"\n')
    expected[with_facts] = ("instruction", {"instruction": "Question", "output": "Answer", "facts": "Key_Facts"})
    for path, (kind, columns) in expected.items():
        shape = shape_of(path)
        assert (shape.kind, shape.columns) == (kind, columns), path.name


def test_a_file_it_cannot_place_names_its_columns_and_the_known_shapes(tmp_path):
    odd = tmp_path / "odd.csv"
    odd.write_text("sku,price,colour\nA1,3.50,red\n")
    with pytest.raises(DataError) as caught:
        shape_of(odd)
    message = str(caught.value)
    assert "\n" not in message and "found: sku, price, colour" in message
    assert "instruction/input/output" in message and "conversations (ShareGPT" in message


def test_data_add_refuses_an_unplaceable_file_and_writes_nothing(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "project", [f"model.source={tiny_model_dir}", "model.gguf_file=null"])
    odd = tmp_path / "odd.csv"
    odd.write_text("sku,price\nA1,3.50\n")
    before = {p: p.read_bytes() for p in (project / "conf").rglob("*") if p.is_file()} | {
        project / "params.yaml": (project / "params.yaml").read_bytes()
    }
    result = run([*SLMTUNE, "data", "add", str(odd)], project, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "found: sku, price" in result.stderr
    after = {p: p.read_bytes() for p in (project / "conf").rglob("*") if p.is_file()} | {
        project / "params.yaml": (project / "params.yaml").read_bytes()
    }
    assert after == before and not (project / "data/raw/odd.csv").exists()


def public_like_rows(tokenizer, rows: int = 175, seed: int = 0) -> list[dict[str, str]]:
    """Instruction data shaped like public sets: mostly short answers, about one in four 300-1,400 tokens long
    (in `tokenizer`), some rows with an input, one duplicated row."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for text in sample_texts() for s in text.split(".") if len(s.split()) > 3]
    out = []
    for index in range(rows - 1):
        target = rng.randint(300, 1400) if rng.random() < 0.25 else rng.randint(10, 120)
        answer = []
        while len(tokenizer(" ".join(answer))["input_ids"]) < target:
            answer.append(rng.choice(sentences))
        while len(tokenizer(" ".join(answer))["input_ids"]) > target and len(answer) > 1:
            answer.pop()
        out.append(
            {
                "instruction": f"Task {index}: {rng.choice(sentences)}",
                "input": rng.choice(sentences) if rng.random() < 0.3 else "",
                "output": " ".join(answer),
            }
        )
    return out + [dict(out[3])]


def conf_project(root: Path, model_dir: Path) -> Path:
    """A project whose conf/ (not just params.yaml) names the tiny model and fast settings: `data add` composes
    params.yaml from conf/, as it would for a user."""
    project = make_project(root, [])
    smollm2 = OmegaConf.load(project / "conf/model/smollm2.yaml")
    OmegaConf.save(
        OmegaConf.merge(smollm2, {"source": str(model_dir), "gguf_file": None}), project / "conf/model/tiny.yaml"
    )
    config = (project / "conf/config.yaml").read_text().replace("  - model: smollm2", "  - model: tiny")
    (project / "conf/config.yaml").write_text(config.replace("log_system_metrics: true", "log_system_metrics: false"))
    for group, values in FAST_CONF.items():
        path = project / "conf" / group / "default.yaml"
        OmegaConf.save(OmegaConf.merge(OmegaConf.load(path), values), path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny model, fast settings"], project)
    return project


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """`args` attached to a pseudo-terminal, as a user's shell runs it: its exit code and everything it drew."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execvpe(args[0], args, stage_env())
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120, as a terminal window has
    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finished, status = os.waitpid(pid, os.WNOHANG)
    while not finished and time.monotonic() < deadline:  # the terminal closes a moment before the process exits
        time.sleep(0.1)
        finished, status = os.waitpid(pid, os.WNOHANG)
    if not finished:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        shown = seen.decode("utf-8", "replace")[-3000:]
        raise AssertionError(f"{' '.join(args)} did not finish in {timeout} s:\n{shown}")
    return os.waitstatus_to_exitcode(status), seen.decode("utf-8", "replace")


def test_own_instruction_file_of_mixed_lengths_to_a_report_in_three_commands(tmp_path, tiny_model_dir):
    """As a new user: a CSV outside the project with answers of up to 1,400 tokens, `slmtune data add`, `dvc repro`
    in a terminal (the training bar advances), the report. No config written by hand, no failure on length."""
    from slmtune.modeling import load_tokenizer

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "tiny-long")  # the tiny Llama with a 4k context
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    project = conf_project(tmp_path / "project", model_dir)
    rows = public_like_rows(load_tokenizer(model_dir))
    mine = tmp_path / "downloads" / "alpaca_like.csv"
    mine.parent.mkdir()
    with open(mine, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)

    added = run([*SLMTUNE, "data", "add", str(mine)], project)
    out = added.stdout
    assert "shape instruction/input/output (Alpaca)" in out and "next: dvc repro" in out
    assert "1 duplicate" in out and "tokens per example" in out
    assert re.search(r"max_length (\d+), the longest example, within the model's context of 4096", out)
    assert (project / "data/raw/alpaca_like.csv").read_bytes() == mine.read_bytes()
    preset = yaml.safe_load((project / "conf/data/alpaca_like.yaml").read_text())
    assert preset["sources"]["alpaca_like"]["path"] == "data/raw/alpaca_like.csv" and preset["on_invalid"] == "skip"
    assert "  - data: alpaca_like" in (project / "conf/config.yaml").read_text()
    assert run([*SLMTUNE, "params", "--check"], project).returncode == 0

    code, screen = run_in_terminal([str(Path(sys.executable).parent / "dvc"), "repro"], project)
    assert code == 0, screen[-3000:]
    steps = [int(n) for n in re.findall(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/6", screen)]
    assert steps and steps[-1] == 6 and len(set(steps)) >= 3, screen[-3000:]  # the bar advanced, step by step
    # count, elapsed < time left, rate, loss, tokens/s
    assert re.search(r"\d/6 \[[0-9:]+<[0-9:]+,\s+[0-9.]+step/s, loss [0-9.]+, [0-9,]+ tok/s\]", screen)
    assert "{'loss'" not in screen and "Warning" not in screen

    tokens = json.loads((project / "reports/token_stats.json").read_text())
    assert tokens["max_length"] >= 1000 and tokens["dropped"] == {}  # the long answers trained, none cut or dropped
    assert tokens["splits"]["train"]["truncated"] == 0
    assert "chosen from the data" in tokens["max_length_chosen"] or "from the data" in tokens["max_length_chosen"]
    report = (project / "reports/data_report.md").read_text()
    assert f"max length {tokens['max_length']} tokens (from the data" in report
    assert (project / "reports/before_after.md").is_file()
    data_stats = json.loads((project / "reports/data_stats.json").read_text())
    assert data_stats["dropped"] == {"duplicate": 1}
