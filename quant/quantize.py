"""Pure tensor math of uniform integer weight quantization (round-to-nearest and its grid).

Shapes: a weight is [out, in]; it is split along `in` into groups of `group_size` columns
(the last group may be shorter); each (row, group) pair has one scale and, when asymmetric,
one integer zero point. Codes are unsigned integers in [0, 2**bits).

    dequantized = (code - zero) * scale

Symmetric grids use the fixed zero point 2**(bits-1) and scale = 2*absmax / (2**bits - 1) (the GPTQ
convention): all 2**bits levels are used, at the cost of clipping the largest positive weight by at
most half a step. (absmax / (2**(bits-1) - 1) would waste a level: 3 of 4 levels at 2 bits.) Asymmetric grids span
[min(w, 0), max(w, 0)] so that zero stays representable (as in GPTQ and AWQ formats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantGrid:
    """Per-(row, group) quantization parameters.

    scales: [out, n_groups] float; zeros: [out, n_groups] integer-valued float (None if symmetric).
    """

    bits: int
    group_size: int
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]; a short last group is padded by repeating its
    first column, which changes neither its min, its max nor its absmax."""
    out, n = weight.shape
    pad = (-n) % group_size
    if pad:
        last_start = n - (n % group_size)
        filler = weight[:, last_start : last_start + 1].expand(out, pad)
        weight = torch.cat([weight, filler], dim=1)
    return weight.view(out, -1, group_size)


def compute_grid(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantGrid:
    """Min/max grid of each (row, group) of `weight` [out, in], computed in fp32."""
    g = grouped(weight.float(), group_size)  # [out, G, gs]
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        scales = 2 * absmax / (2**bits - 1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return QuantGrid(bits, group_size, scales, None)
    lo = g.amin(dim=-1).clamp(max=0)
    hi = g.amax(dim=-1).clamp(min=0)
    scales = (hi - lo) / (2**bits - 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp(0, 2**bits - 1)
    return QuantGrid(bits, group_size, scales, zeros)


def cast_grid(grid: QuantGrid, scale_dtype: torch.dtype) -> QuantGrid:
    """Round scales to their storage dtype *before* codes are chosen, so that the stored
    checkpoint dequantizes to exactly what the codes were optimised against."""
    info = torch.finfo(scale_dtype)
    scales = grid.scales.clamp(info.tiny, info.max).to(scale_dtype).float()  # never 0 or inf once stored
    return QuantGrid(grid.bits, grid.group_size, scales, grid.zeros)


def _zero_points(grid: QuantGrid) -> torch.Tensor | float:
    return 2 ** (grid.bits - 1) if grid.zeros is None else grid.zeros.unsqueeze(-1)


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | float, bits: int) -> torch.Tensor:
    """The one rounding rule every method shares: codes (as float) of values `w` on a grid, all
    broadcast together (e.g. w [out, G, gs] with scales [out, G, 1], or one column w [out])."""
    return (torch.round(w / scales) + zero_points).clamp(0, 2**bits - 1)


def quantize(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Round-to-nearest codes uint8 [out, in] of `weight` on `grid`."""
    out, n = weight.shape
    g = grouped(weight.float(), grid.group_size)
    q = round_to_grid(g, grid.scales.unsqueeze(-1), _zero_points(grid), grid.bits).to(torch.uint8)
    return q.view(out, -1)[:, :n]


def dequantize(codes: torch.Tensor, grid: QuantGrid, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes uint8 [out, in] -> weight [out, in] in `dtype` (arithmetic in fp32, in place)."""
    out, n = codes.shape
    w = grouped(codes, grid.group_size).float()  # [out, G, gs], a fresh tensor
    w.sub_(_zero_points(grid)).mul_(grid.scales.unsqueeze(-1))
    return w.view(out, -1)[:, :n].to(dtype)
