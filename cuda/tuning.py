"""Choose the fastest of several candidate launches per problem key, by measuring them once.

A candidate is any callable producing the result (a Triton kernel at one block configuration,
or a library path such as dequantize + cuBLAS), so "ours or a library's, whichever is faster"
is one decision. Choices are cached per process in a `Tuner` and can be listed (`choices`) so
benchmarks record what ran. With `agree` set, the last candidate is the reference: each other
candidate's result is checked against its result once, before timing, and one that disagrees
is never chosen (`rejected` lists it), so a kernel miscompiled on some GPU costs speed, never
wrong outputs. On the Triton interpreter (CPU tests) nothing is timed: the first
candidate runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class Unavailable(RuntimeError):
    """Raised by a candidate that cannot run a problem (a library refusing a shape): a tuner that
    lists it in `skip` never chooses that candidate, and the others still run."""


@dataclass(frozen=True)
class Candidate:
    name: str  # e.g. "gemv n32 k128 w4", "dequant+matmul"
    run: Callable[..., Any]  # called with the problem's arguments


@dataclass
class Tuner:
    """Per-key choice among candidates; `measure(fn) -> time` times one zero-argument call."""

    measure: Callable[[Callable[[], Any]], float]
    skip: tuple[type[BaseException], ...] = ()  # errors that rule a candidate out (e.g. out of shared memory)
    agree: Callable[[Any, Any], bool] | None = None  # (candidate's result, reference's) -> usable
    chosen: dict[Hashable, Candidate] = field(default_factory=dict)
    timings: dict[Hashable, dict[str, float]] = field(default_factory=dict)
    rejected: dict[Hashable, list[str]] = field(default_factory=dict)

    def run(self, key: Hashable, candidates: Callable[[], Sequence[Candidate]], *args: Any) -> Any:
        """The chosen candidate for `key` applied to `args`; `candidates` is only called (and
        every candidate measured) the first time a key is seen, so a tuned call costs one lookup."""
        chosen = self.chosen.get(key)
        if chosen is None:
            options = candidates()
            chosen = options[0] if interpreting() or len(options) == 1 else self._pick(key, options, args)
            self.chosen[key] = chosen
        return chosen.run(*args)

    def _pick(self, key: Hashable, candidates: Sequence[Candidate], args: tuple) -> Candidate:
        times = {}
        reference = candidates[-1].run(*args) if self.agree is not None else None
        for c in candidates:
            try:
                if reference is not None and c is not candidates[-1] and not self.agree(c.run(*args), reference):
                    log.warning("candidate %s for %s disagrees with %s: never chosen", c.name, key, candidates[-1].name)
                    self.rejected.setdefault(key, []).append(c.name)
                    continue
                times[c.name] = self.measure(lambda c=c: c.run(*args))
            except self.skip as e:  # a config this GPU cannot compile or launch is never chosen
                log.info("candidate %s for %s failed: %s", c.name, key, str(e).splitlines()[0] if str(e) else e)
        if not times:
            raise RuntimeError(f"no candidate kernel ran for {key}")
        self.timings[key] = times
        best = min(times, key=times.get)
        return next(c for c in candidates if c.name == best)

    def choices(self) -> dict[Hashable, str]:
        return {key: c.name for key, c in self.chosen.items()}
