"""Progress callbacks: library code reports, the CLI decides how to show it (rich bars) or not.

    with progress.task("Evaluating", total=64) as advance:
        for window in windows:
            ...
            advance()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]: ...


class NullProgress:
    """Reports nothing; the default for library calls."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None
