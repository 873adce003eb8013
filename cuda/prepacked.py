"""The kernels' weight layouts a compressed module derives from its stored buffers at load time
(`prepack`): dropped where the module knows they go stale, kept out of pickles.

A derived layout is a function of the buffers and the device: moving the module, loading new
buffers or training one (TRAINABLE, made to require a gradient) drops it (the module then
derives what a call needs per call, until prepacked again; a buffer changed in place, e.g. by
copy_, needs prepack called again), and pickling (torch.save of a whole model, copy.deepcopy)
stores only the buffers and derives again on unpickling. Pickling the layouts themselves failed:
they hold views of a buffer's storage under another dtype (e.g. int32 words viewing uint8
codes), which torch.save refuses.
"""

from __future__ import annotations

from typing import Any

import torch


class DerivedLayouts:
    """Mixed into an nn.Module (before nn.Module in the bases) whose `_derive_layouts(dtype)` sets
    the attributes named in `DERIVED` from its buffers on their current device, for activations
    of `dtype` (None: the module's own choice)."""

    DERIVED: tuple[str, ...] = ()
    TRAINABLE: tuple[str, ...] = ()  # float buffers a user may train (requires_grad_): the ops give them gradients

    def _init_derived(self) -> None:
        for name in self.DERIVED:
            setattr(self, name, None)
        self._prepack_dtype: tuple[torch.dtype | None] | None = None  # (dtype,) once prepacked, else None

    def prepack(self, dtype: torch.dtype | None = None):
        """Derive the kernels' layout once, on the module's current device, for activations of
        `dtype` (call again after moving the module or changing its buffers); returns the module."""
        with torch.no_grad():  # copies for the kernels, never part of a graph (even of a trained buffer)
            self._derive_layouts(dtype)
        self._prepack_dtype = (dtype,)
        return self

    def _trains_weights(self) -> bool:
        """Whether a TRAINABLE buffer requires a gradient (a user trains it): then calls compute
        from the buffers themselves, and the derived layouts, copies made before, are dropped
        (prepack again once trained)."""
        for name in self.TRAINABLE:  # a buffer, or a Parameter made of it (dicts: 0.3 us, getattr 1.7)
            t = self._buffers.get(name)
            t = self._parameters.get(name) if t is None else t
            if t is not None and t.requires_grad:
                if self._prepack_dtype is not None:
                    self._drop_prepacked()
                return True
        return False

    def _drop_prepacked(self) -> None:
        self._init_derived()

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
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_prepack_dtype" not in state:  # pickled by a version that kept the layouts: maybe another device's
            self._init_derived()
        elif self._prepack_dtype is not None:  # the buffers are unpickled by now, on their device
            self.prepack(*self._prepack_dtype)
