"""`LowRankLinear`: a Linear layer [out, in] replaced by two in sequence, down [rank, in] then
up [out, rank] (with the original bias), so it stores rank·(in + out) weights instead of in·out.

The factors are ordinary child modules (`down`, `up`), so a later pipeline step can compress
them like any other Linear (e.g. quantize them with GPTQ): the checkpoint then holds this
module's spec plus the children's formats, and `dequantized_weight` composes whatever the
children compute with. Unlike the other formats, the state therefore lives in the children's
parameters rather than in buffers of this module (the state dict is still the file format).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.sizes import dense_weight_bytes

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dense(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(dtype)
    return module.weight.to(dtype)


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: str = "float32",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside 1..{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank, self.dtype_name = in_features, out_features, rank, dtype
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=_DTYPES[dtype])
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=_DTYPES[dtype])

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> LowRankLinear:
        """up [out, rank], down [rank, in] (any float dtype, stored as `dtype`), bias [out] or None."""
        rank, in_features = down.shape
        m = cls(in_features, up.shape[0], rank, bias is not None, str(dtype).removeprefix("torch."),
                device=down.device)
        with torch.no_grad():
            m.down.weight.copy_(down)
            m.up.weight.copy_(up)
            if bias is not None:
                m.up.bias.copy_(bias)
        m.requires_grad_(False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    # --- CompressedModule ----------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] = up @ down this module computes with."""
        return (_dense(self.up, torch.float32) @ _dense(self.down, torch.float32)).to(dtype)

    def format_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None, "dtype": self.dtype_name}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str = "meta") -> LowRankLinear:
        try:
            return cls(**spec, device=device)
        except (TypeError, ValueError, KeyError) as e:
            raise CompressError(f"LowRankLinear: bad spec {spec}: {e}") from None

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes of both factors as they are stored now (dense, or compressed by a later step)."""
        return dense_weight_bytes(self.down) + dense_weight_bytes(self.up)

    def describe(self) -> str:
        kept = self.rank * (self.in_features + self.out_features) / self.num_weights()
        return f"rank {self.rank} ({kept:.1%} of weights)"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
