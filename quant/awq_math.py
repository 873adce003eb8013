"""Pure tensor math of AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization").

A few input channels carry large activations; scaling those weight columns up by s before
quantization (and the activations down by 1/s, folded into the operation that produces them)
shrinks their relative rounding error where it matters. Everything here is measured with the
inputs' Gram matrix H = X^T X [in, in] (over calibration tokens), since for a Linear the
squared output error of a weight change D [out, in] is

    ||X D^T||_F^2 = tr(D H D^T) = sum over rows r of d_r H d_r^T,

so no activations need to be kept, only H and the mean absolute activation per channel.
"""

from __future__ import annotations

import torch

from .quantize import QuantGrid, cast_grid, compute_grid, dequantize, grouped, quantize


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T) for D [out, in], H [in, in]: the summed squared output error."""
    return ((delta @ hessian) * delta).sum()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                  ) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize w [out, in] (fp32)."""
    grid = cast_grid(compute_grid(w, bits, group_size, symmetric), scale_dtype)
    return dequantize(quantize(w, grid), grid)


def search_scales(
    weights: list[torch.Tensor], hessian: torch.Tensor, act_mean: torch.Tensor, bits: int, group_size: int,
    symmetric: bool, scale_dtype: torch.dtype, n_grid: int = 20, duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scales s [in] that minimise the output error of the weights
    [out_i, in] (all reading the same input) when quantized as Q(W s) / s.

    Candidates s = act_mean^a / w_mean^(1-a) (duo scaling; act_mean^a alone otherwise) for a in
    {0, 1/n_grid, ..., (n_grid-1)/n_grid}, normalised so that sqrt(max(s) min(s)) = 1; a = 0 is
    (nearly) plain round-to-nearest, so the search never does worse than it on these inputs.
    Returns (s, the chosen a, its error, the error of s = 1).
    """
    w = torch.cat([x.float() for x in weights], dim=0)  # [sum out_i, in]
    out, n = w.shape
    h = hessian.float()
    # mean magnitude of each input column relative to its group's absmax
    g = grouped(w.abs(), group_size)  # [out, G, gs]
    w_rel = (g / g.amax(-1, keepdim=True).clamp_min(1e-12)).view(out, -1)[:, :n]
    w_mean = w_rel.mean(0).clamp_min(1e-8)  # [in]
    x_mean = act_mean.float().clamp_min(1e-8)  # [in]

    def error(s: torch.Tensor) -> float:
        q = fake_quantize(w * s, bits, group_size, symmetric, scale_dtype) / s
        return output_error(w - q, h).item()

    plain = error(torch.ones_like(x_mean))
    best = (plain, 0.0, torch.ones_like(x_mean))
    for k in range(n_grid):
        a = k / n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a) if duo_scaling else x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best[0]:
            best = (e, a, s)
    return best[2], best[1], best[0], plain


def clipped_grid(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
) -> QuantGrid:
    """The grid of w [out, in] whose range, per (row, group), is shrunk by the ratio that
    minimises that group's output error d H_gg d^T (H_gg: the group's diagonal block of H).
    Clipping a few outliers buys a finer step for all the other weights."""
    out, n = w.shape
    w, h = w.float(), hessian.float()
    groups = [slice(start, min(start + group_size, n)) for start in range(0, n, group_size)]  # last may be short
    best_err = torch.full((out, len(groups)), float("inf"), device=w.device)
    best: QuantGrid | None = None
    for r in ratios:
        grid = cast_grid(compute_grid(w * r, bits, group_size, symmetric), scale_dtype)
        d = w - dequantize(quantize(w, grid), grid)  # [out, in]
        err = torch.stack([((d[:, g] @ h[g, g]) * d[:, g]).sum(1) for g in groups], dim=1)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        if best is None:
            best = grid
        else:
            zeros = None if symmetric else torch.where(better, grid.zeros, best.zeros)
            best = QuantGrid(bits, group_size, torch.where(better, grid.scales, best.scales), zeros)
    return best
