"""Calibration Hessians H = 2/N X^T X per module input, as GPTQ and SparseGPT consume them.

Modules fed the very same input tensor (q/k/v from one norm, gate/up) share one Hessian,
accumulated once: 4 instead of 7 per Llama layer. A Hessian is freed as soon as the last module
reading it has taken it.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError

from .gptq_math import accumulate_hessian


class SharedHessians:
    def __init__(self, method: str) -> None:
        self.method = method
        self.hessians: dict[str, tuple[torch.Tensor, int]] = {}  # key -> (H [in, in] fp32, tokens seen)
        self.key_of: dict[str, str] = {}  # module name -> key of the Hessian it reads
        self._last: tuple[torch.Tensor, str] | None = None  # the input observed last, and its key

    def observe(self, name: str, x: torch.Tensor) -> None:
        """x: the module's input [..., in] for one batch of calibration samples."""
        if self._last is not None and x is self._last[0]:
            key = self._last[1]
        else:
            key = name
            h, count = self.hessians.get(key, (None, 0))
            self.hessians[key] = accumulate_hessian(h, count, x.detach())
            self._last = (x, key)
        if self.key_of.setdefault(name, key) != key:
            raise RuntimeError(f"{self.method}: {name} shared its input with {self.key_of[name]} on one sample "
                               "but not another")

    def take(self, name: str) -> torch.Tensor:
        """The Hessian [in, in] of module `name` (freed once no other module reads it)."""
        self._last = None
        if name not in self.key_of:
            raise CompressError(f"{self.method}: {name} saw no calibration inputs (is it used in the forward pass?)")
        key = self.key_of.pop(name)
        h, _ = self.hessians[key]
        if key not in self.key_of.values():
            del self.hessians[key]
        return h
