"""Progress you can watch, and library noise kept out of the way.

In a terminal every long step draws a tqdm bar (count, rate, time left) on stderr; without one (DVC's log,
CI) it prints a plain line to stdout every `PLAIN_INTERVAL_S` seconds and one at the end, so a log has no
carriage-return bar soup and stderr keeps only errors. `quiet_libraries` silences the known library noise
at its source: specific warnings by message, MLflow's INFO lines, and (without a terminal) the libraries'
own bars.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

PLAIN_INTERVAL_S = 30.0
"""Seconds between plain progress lines when there is no terminal."""

KNOWN_WARNINGS = (
    # peft's PeftModel reads the deprecated property (transformers 5 renamed it); our own code uses the new names
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # TRL's trainers still pass and call the old names (gradient_checkpointing, gradient_checkpointing_enable/disable)
    (FutureWarning, r"`gradient_checkpointing(_enable|_disable)?` is deprecated"),
    # torch's DataLoader on a machine without an accelerator, when a library asks for pinned memory
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
)


def interactive() -> bool:
    """Whether progress goes to a terminal (stderr, where bars are drawn)."""
    return sys.stderr.isatty()


def quiet_libraries() -> None:
    """Silence known library noise; our own messages stay. Safe to call more than once."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not interactive():  # the libraries' bars would write carriage-return soup into a log
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        if "datasets" in sys.modules:
            from datasets.utils import logging as datasets_logging

            datasets_logging.disable_progress_bar()


def duration(seconds: float) -> str:
    """`1:02:03` / `2:03`."""
    seconds = int(max(seconds, 0) + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's interface, printed as plain lines: `desc: 12/40 (30%), 2.1 it/s, 0:13 left`."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = PLAIN_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"]
        parts.append(f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{duration((self.total - self.n) / rate)} left")
        else:
            parts.append(f"{duration(elapsed)} elapsed")
        return f"{self.desc}: {', '.join(parts)}" + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and not (self.total and self.n >= self.total):
            self.last = now
            print(self.line(), flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            print(self.line(), flush=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(total: int | None, desc: str, unit: str = "it", initial: int = 0) -> Any:
    """A progress bar: tqdm in a terminal, plain periodic lines otherwise. Use `update`, `set_postfix_str`,
    `write` (a message above the bar) and `close` (or `with`)."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr, disable=False
        )
    plain = PlainProgress(total, desc, unit)
    plain.n = initial
    return plain


def track(iterable: Iterable[Any], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[Any]:
    """Iterate with a progress bar (`bar`) that closes when the iteration ends."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(total, desc, unit) as progress:
        for item in iterable:
            yield item
            progress.update(1)
