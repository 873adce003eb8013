"""`QuantEmbedding`: input embeddings that read a quantized output head's codes (tied weights).

A model whose head is tied to its input embeddings (smollm2-135m: one 49152 x 576 matrix, a
fifth of its weights) holds that matrix once. Quantizing the head used to untie them, the
embeddings keeping the float matrix: a second copy on disk and in memory (113 MB beside the
head's 28 MB in 8 bits). Here the embeddings stay tied to the head: row t of the embeddings is
row t of the head's weight, dequantized as the head computes with it.

The module holds no tensors: it reads the head's (QuantLinear: qweight, scales, qzeros) through
a reference that is not a submodule, so a checkpoint stores them once, under the head, and
moving the model (`.to(device)`, which converts each module's buffers on its own) cannot leave
two copies. Loading links it to the head again (`link`, by the head's name in its spec). Its
`num_weights` and `storage_bytes` are 0: they are the head's, counted there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import QuantLinear
from .packing import unpack_codes
from .quantize import QuantGrid, dequantize


class QuantEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tied_to: str, dtype: str = "float32",
                 device: torch.device | str | None = None) -> None:  # device: from_spec's; nothing to place
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tied_to, self.output_dtype = tied_to, _float_dtype(dtype)
        self._head: tuple[QuantLinear, ...] = ()  # a tuple: not registered as a submodule

    @classmethod
    def reading(cls, head: QuantLinear, head_name: str, dtype: torch.dtype) -> QuantEmbedding:
        """Embeddings reading `head` (module `head_name` of the model), returning `dtype` (that of
        the float embeddings they replace)."""
        m = cls(head.out_features, head.in_features, head_name, str(dtype).removeprefix("torch."))
        m._head = (head,)
        return m

    def link(self, model: nn.Module) -> None:
        """Read the head of `model` this module is tied to (checkpoint.load, once modules are in)."""
        head = model.get_submodule(self.tied_to)
        if not isinstance(head, QuantLinear) or (head.out_features, head.in_features) != (self.num_embeddings,
                                                                                           self.embedding_dim):
            raise ValueError(f"embeddings tied to {self.tied_to} need a QuantLinear of {self.num_embeddings} x "
                             f"{self.embedding_dim}, not {type(head).__name__}")
        self._head = (head,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self._head:
            raise RuntimeError(f"embeddings tied to {self.tied_to} are not linked to it; load the checkpoint with "
                               "compress.load (or call link(model))")
        (head,) = self._head
        rows = ids.reshape(-1).to(head.qweight.device)  # [T] token ids
        codes = unpack_codes(head.qweight[rows], head.bits, self.embedding_dim)  # uint8 [T, dim]
        zeros = None
        if head.qzeros is not None:  # zero points [n_groups, vocab] (unpacked once where the head prepacked them)
            zeros = head.grid_zeros()[:, rows].T.float()  # [T, n_groups]
        grid = QuantGrid(head.bits, head.group_size, head.scales[rows].float(), zeros)
        out = dequantize(codes, grid, self.output_dtype)  # [T, dim]
        return out.view(*ids.shape, self.embedding_dim).to(ids.device)

    def set_output_dtype(self, dtype: torch.dtype) -> None:
        """Return `dtype` from now on (loading.cast_dense: the model's dense tensors were cast)."""
        self.output_dtype = dtype

    def _apply(self, fn, recurse=True):  # model.to(dtype) / .half(): the rows follow, as a float weight would
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return super()._apply(fn, recurse)

    # --- CompressedModule ----------------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "tied_to": self.tied_to,
                "dtype": str(self.output_dtype).removeprefix("torch.")}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> QuantEmbedding:
        return cls(**spec, device=device)

    def num_weights(self) -> int:
        return 0  # the head's, counted there

    def storage_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        return f"{self.tied_to}'s codes (tied)"

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.describe()}"


def _float_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"embeddings return a float dtype, not '{name}'")
    return dtype
