"""The `slmtune` command and the stage wrapper: one family of user errors, each ending as one line and exit 1,
whichever command or stage raised it; anything else keeps its traceback."""

import inspect

import pytest

from conftest import REPO
from slmtune import cli, errors, inference
from slmtune.errors import DataError, TokenizationError, UserError
from slmtune.pipeline import stage_main


def test_every_error_class_is_a_user_error():
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, Exception)]
    assert len(classes) >= 9 and all(issubclass(cls, UserError) for cls in classes)


def test_a_user_error_in_chat_is_one_line_and_exit_1(monkeypatch, capsys):
    def broken_chat(*args, **kwargs):
        raise TokenizationError("the tokenizer's chat template failed to render: boom")

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(inference, "chat", broken_chat)
    assert cli.main(["chat", "--root", str(REPO)]) == 1
    err = capsys.readouterr().err
    assert err == "error: the tokenizer's chat template failed to render: boom\n"


def test_a_bug_is_not_swallowed_as_a_user_error(monkeypatch):
    def buggy_chat(*args, **kwargs):
        raise KeyError("model")

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(inference, "chat", buggy_chat)
    with pytest.raises(KeyError):
        cli.main(["chat", "--root", str(REPO)])


def test_the_stage_wrapper_turns_a_user_error_into_one_line_and_exit_1(monkeypatch, capsys):
    @stage_main
    def stage(config):
        raise DataError("data/raw/kb.csv:3: column 'output' is empty")

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stopped:
        stage()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: data/raw/kb.csv:3: column 'output' is empty\n"
