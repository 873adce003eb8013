"""The kernels' weight layouts a compressed module derives from its stored buffers at load time
(`prepack`): dropped once stale, kept out of pickles.

A derived layout is a function of the buffers and the device: moving the module or loading new
buffers drops it, and so does a call after a buffer was replaced, changed in place or made to
require a gradient (trained; the module then derives what a call needs per call, until
prepacked again). Buffers made under `torch.inference_mode()` (a model loaded there) have no
version counter: only their replacement is seen, not in-place changes made inside inference mode
(outside it PyTorch refuses those). Pickling (torch.save of a whole model, copy.deepcopy) stores only the
buffers and derives again on unpickling. Pickling the layouts themselves failed: they hold views
of a buffer's storage under another dtype (e.g. int32 words viewing uint8 codes), which
torch.save refuses.
"""

from __future__ import annotations

from typing import Any

import torch


def _version(t: torch.Tensor) -> int | None:
    """t's version counter (bumped by every in-place change), None for an inference tensor, which
    keeps none."""
    return None if t.is_inference() else t._version


class DerivedLayouts:
    """Mixed into an nn.Module (before nn.Module in the bases) whose `_derive_layouts(dtype)` sets
    the attributes named in `DERIVED` from its buffers on their current device, for activations
    of `dtype` (None: the module's own choice)."""

    DERIVED: tuple[str, ...] = ()

    def _drop_prepacked(self) -> None:
        """No derived layouts (the module's state until prepack)."""
        for name in self.DERIVED:
            setattr(self, name, None)
        self._prepack_dtype: tuple[torch.dtype | None] | None = None  # (dtype,) once prepacked, else None
        # (its dict, name, tensor, version or None) of each buffer or Parameter the layouts came from
        self._derived_from: tuple[tuple[dict, str, torch.Tensor, int | None], ...] = ()

    def prepack(self, dtype: torch.dtype | None = None):
        """Derive the kernels' layout once, on the module's current device, for activations of
        `dtype` (again after the buffers move or change); returns the module."""
        with torch.no_grad():  # copies for the kernels, never part of a graph (even of a trained buffer)
            self._derive_layouts(dtype)
        self._prepack_dtype = (dtype,)
        self._derived_from = tuple((held, name, t, _version(t)) for held in (self._buffers, self._parameters)
                                   for name, t in held.items() if t is not None and name != "bias")  # added after
        return self

    def _check_layouts(self) -> None:
        """Before a call: drop the derived layouts if a buffer they derive from moved on since
        prepack: replaced (a new tensor, or made a Parameter), changed in place (its version
        counter moved: copy_, an optimizer's step) or made to require a gradient (trained: calls
        then compute from the buffers themselves, which the ops give gradients; a traced call
        checks all but versions, which dynamo cannot read). 0.5 us a call."""
        traced = torch.compiler.is_compiling()  # dynamo cannot read version counters
        for held, name, t, version in self._derived_from:
            if held.get(name) is not t or t.requires_grad or not traced and _version(t) != version:
                self._drop_prepacked()
                return

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the derived layouts would be stale
        self._drop_prepacked()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new buffers: likewise
        self._drop_prepacked()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        for name in self.DERIVED:
            state[name] = None
        state["_derived_from"] = ()  # prepack on unpickling records it again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_prepack_dtype" not in state:  # pickled by a version that kept the layouts: maybe another device's
            self._drop_prepacked()
        elif self._prepack_dtype is not None:  # the buffers are unpickled by now, on their device
            self.prepack(*self._prepack_dtype)
