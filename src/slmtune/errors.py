"""The user-error family: problems a person can fix, each worded as one line that names the file, row or
key and the fix. The stage wrapper and the CLI catch `UserError` (and only it): anything else is a bug and
keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(ValueError):
    """A problem with the user's input or setup, worded for the person who has to fix it."""


class ConfigError(UserError):
    """A configuration problem (conf/, params.yaml, a command's options)."""


class DataError(UserError):
    """A data file or row that cannot be read or used."""


class TokenizationError(UserError):
    """A record or template that cannot be turned into a trainable sequence."""


class ModelSourceError(UserError):
    """The configured model cannot be found or loaded."""


class MissingFileError(UserError, FileNotFoundError):
    """A file an earlier stage or command should have written is not there."""


class QualityGateError(UserError):
    """The tuned model is worse than the base by more than `eval.gate_max_drop` on `eval.gate_metric`."""


class ExperimentError(UserError):
    """A sweep or reproduction that cannot go on."""


class TrackingStoreError(UserError):
    """The MLflow tracking store cannot be reached or written."""


class DiskSpaceError(UserError):
    """Not enough free disk space for what a stage is about to write."""


class ExportError(UserError):
    """A model that cannot be merged or exported as asked."""


def exit_code_of(body: Callable[[], Any]) -> int:
    """Run `body`; a user error becomes `error: <one line>` on stderr and exit code 1."""
    try:
        result = body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
