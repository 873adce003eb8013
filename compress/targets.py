"""The one matcher that turns `targets` / `ignore` patterns into module names.

A pattern is one of:
- `re:<regex>`: the regex must match the whole dotted module name;
- a class name (`Linear`, `LlamaMLP`): modules of that class, or of a subclass so named;
- a module name, or its trailing dotted parts (`lm_head`, `down_proj`, `mlp.down_proj`).
A module is selected when it, or a container above it, matches a target and neither it nor a
container above it matches an ignore pattern; then only module types the method supports are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import CompressError


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(cls.__name__ == pattern for cls in type(module).__mro__):
        return True
    return name == pattern or name.endswith("." + pattern)


def check_patterns(patterns: list[str]) -> None:
    """Raise on a `re:` pattern that does not compile (before any model is loaded)."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise CompressError(f"invalid regex in pattern '{p}': {e}") from None


@dataclass(frozen=True)
class Selection:
    names: list[str]
    unmatched_targets: list[str]


def select(
    model: nn.Module, targets: list[str], ignore: list[str], supported: tuple[type[nn.Module], ...]
) -> Selection:
    """Names of the supported modules selected by targets minus ignore, in model order."""
    hit_targets: set[str] = set()
    selected_prefixes: list[str] = []  # containers (or modules) matched by a target
    ignored_prefixes: list[str] = []
    names: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        for p in targets:
            if matches(p, name, module):
                hit_targets.add(p)
                selected_prefixes.append(name)
        if any(matches(p, name, module) for p in ignore):
            ignored_prefixes.append(name)
        if not isinstance(module, supported):
            continue
        if _under(name, selected_prefixes) and not _under(name, ignored_prefixes):
            names.append(name)
    return Selection(names, [p for p in targets if p not in hit_targets])


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve(
    model: nn.Module, targets: list[str], ignore: list[str], supported: tuple[type[nn.Module], ...], where: str
) -> list[str]:
    """Like `select`, but a target pattern that matches nothing, or an empty result, is an error."""
    sel = select(model, targets, ignore, supported)
    kinds = ", ".join(c.__name__ for c in supported)
    if sel.unmatched_targets:
        raise CompressError(
            f"{where}: target {', '.join(repr(p) for p in sel.unmatched_targets)} matches no module of the model "
            f"(use a class name such as 'Linear', a module name such as 'down_proj', or 're:<regex>')"
        )
    if not sel.names:
        raise CompressError(
            f"{where}: targets {targets} minus ignore {ignore} leave no {kinds} module to compress; "
            "widen targets or shorten ignore"
        )
    return sel.names
