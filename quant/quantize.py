"""Pure tensor math of uniform integer weight quantization (round-to-nearest and its grid).

Shapes: a weight is [out, in]; it is split along `in` into groups of `group_size` columns
(the last group may be shorter); each (row, group) pair has one scale and, when asymmetric,
one integer zero point. Codes are unsigned integers in [0, 2**bits).

    dequantized = (code - zero) * scale

Symmetric grids use the fixed zero point 2**(bits-1) and scale = 2*absmax / (2**bits - 1) (the GPTQ
convention): all 2**bits levels are used, at the cost of clipping the largest positive weight by at
most half a step. (absmax / (2**(bits-1) - 1) would waste a level: 3 of 4 levels at 2 bits.) Asymmetric grids span
[min(w, 0), max(w, 0)] so that zero stays representable (as in GPTQ and AWQ formats).

With `clip=True` each (row, group)'s range is then shrunk by the factor of CLIP_RATIOS that
minimises its rounding error: clipping the few largest weights buys a finer step for all the
others (at 3 bits this removes a sizeable part of the error, see tests/quant/test_quantize.py).
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


CLIP_RATIOS = tuple(1 - i / 100 for i in range(21))  # range shrink factors the clip search tries: 1.00 .. 0.80


def compute_grid(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: bool = False,
                 importance: torch.Tensor | None = None) -> QuantGrid:
    """The grid of each (row, group) of `weight` [out, in], computed in fp32: min/max, or with
    clip the shrunk range with the least sum over the group of importance * (w - q(w))^2
    (importance [in], e.g. the calibration inputs' mean square per column; None: all ones)."""
    g = grouped(weight.float(), group_size)  # [out, G, gs]
    lo = None if symmetric else g.amin(dim=-1).clamp(max=0)
    span = 2 * g.abs().amax(dim=-1) if symmetric else g.amax(dim=-1).clamp(min=0) - lo
    scales = span / (2**bits - 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = None if symmetric else torch.round(-lo / scales).clamp(0, 2**bits - 1)
    if clip:
        n = weight.shape[1]
        importance = torch.ones(n) if importance is None else importance.detach().float().cpu()
        padded = torch.cat([importance, importance.new_zeros(g.shape[1] * group_size - n)])  # padding counts 0
        scales = _least_error_scales(g, scales, zeros, bits, padded.view(1, -1, group_size).to(g.device))
    return QuantGrid(bits, group_size, scales, zeros)


def _least_error_scales(g: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                        weight: torch.Tensor) -> torch.Tensor:
    """For g [out, G, gs], min/max scales [out, G] and error weights [1, G, gs]: the scales times
    the CLIP_RATIOS factor with the least weighted rounding error, per (row, group). Shrinking a
    range [lo, hi] around zero scales the step and keeps the zero point: only the scales change."""
    zp = 2 ** (bits - 1) if zeros is None else zeros.unsqueeze(-1)
    best, best_err = scales.clone(), torch.full_like(scales, float("inf"))
    for ratio in CLIP_RATIOS:
        s = (scales * ratio).unsqueeze(-1)  # [out, G, 1]
        err = (((round_to_grid(g, s, zp, bits) - zp) * s - g).square() * weight).sum(-1)  # [out, G]
        better = err < best_err
        best = torch.where(better, s.squeeze(-1), best)
        best_err = torch.where(better, err, best_err)
    return best


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
