"""Progress for people and for logs, in one place.

On a terminal a rich bar; when stdout is not a terminal (CI logs, ``> file``) a rich bar only draws
once at the end, so long loops print a plain line every ``every`` units instead (and the last).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


def is_tty() -> bool:
    return sys.stdout.isatty()


class PlainProgress:
    """One plain line every ``every`` units: unit/total, the caller's text (loss terms, img/s), ETA."""

    def __init__(self, label: str, total: int, every: int, start: int = 0, unit: str = "step") -> None:
        self.label, self.total, self.every, self.unit = label, total, max(1, every), unit
        self.t0, self.start = time.perf_counter(), start

    def update(self, done: int, text: str = "") -> None:
        if done % self.every and done != self.total:
            return
        n = done - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / n * (self.total - done) if n else float("nan")
        text = f" {text}" if text else ""
        print(f"{self.label}: {self.unit} {done}/{self.total}{text} | {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)


class LoopProgress:
    """Context manager for a counted loop: ``with LoopProgress(...) as p: ... p.advance()``."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, every: int = 10, unit: str = "batch",
                 transient: bool = True) -> None:
        self.label, self.total, self.done = label, total, 0
        self.plain = PlainProgress(label, total, every, unit=unit) if enabled and not is_tty() else None
        self._bar: Any = None
        if enabled and self.plain is None:
            from rich.progress import Progress

            self._bar = Progress(transient=transient)

    def __enter__(self) -> "LoopProgress":
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int = 1, text: str = "") -> None:
        self.done += n
        if self.plain is not None:
            self.plain.update(self.done, text)
        elif self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
