"""Shared entry for the DVC stage scripts: load params.yaml, run, turn user errors into one line."""

from __future__ import annotations

import sys
from typing import Callable

from .config import Config, ConfigError, load_config
from .formats import DataError
from .modeling import ModelSourceError
from .prompting import TokenizationError

USER_ERRORS = (ConfigError, DataError, ModelSourceError, TokenizationError, FileNotFoundError)


def stage_main(main: Callable[[Config], None]) -> Callable[[], None]:
    """Wrap a stage body: `error: <one line>` on stderr and exit 1 for problems a user can fix."""

    def run() -> None:
        try:
            main(load_config())
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return run
