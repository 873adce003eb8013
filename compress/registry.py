"""Registries of methods and module formats, filled from entry points.

Methods (`compress.methods` group) map a step's `method:` name to its config class; formats
(`compress.formats` group) map a manifest's module format name to the class that rebuilds it.
The families declare theirs in pyproject.toml, so the runner never imports one by name and a
third-party package can add methods by declaring entry points of its own.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import entry_points

from torch import nn

from .errors import CompressError
from .interfaces import MethodConfig


@cache
def _load(group: str) -> dict[str, type]:
    return {ep.name: ep.load() for ep in entry_points(group=group)}


def methods() -> dict[str, type[MethodConfig]]:
    """All registered method configs by name, sorted."""
    return dict(sorted(_load("compress.methods").items()))


def formats() -> dict[str, type[nn.Module]]:
    return _load("compress.formats")


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def method_config(name: str) -> type[MethodConfig]:
    registered = methods()
    if name not in registered:
        raise CompressError(
            f"unknown method '{name}' (registered: {', '.join(registered) or 'none'}){suggest(name, list(registered))}"
        )
    return registered[name]


def format_class(name: str) -> type[nn.Module]:
    registered = formats()
    if name not in registered:
        raise CompressError(
            f"module format '{name}' is not known to this installation (known: {', '.join(sorted(registered))}); "
            "the checkpoint was written by a newer or extended version of compress"
        )
    return registered[name]
