"""Pure tensor math of SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot"), following the reference implementation (IST-DASLab/sparsegpt).

The layer's output error for a pruned W' on calibration inputs X is the same quadratic form as
GPTQ's, sum over rows of (W_r - W'_r) H (W_r - W'_r)^T with H = 2/N X^T X. SparseGPT walks the
columns in blocks: at each block it chooses the mask by the OBS saliency w^2 / U_jj^2 (U the upper
Cholesky factor of H^-1, U_jj^2 the inverse Hessian's diagonal after eliminating earlier columns)
(per block of columns for unstructured sparsity, per group of M columns for N:M), then zeroes
the pruned weights column by column and moves the not-yet-visited columns of each row to cancel
the error, with the same upper Cholesky factor of H^-1 as GPTQ.

Joint quantization (the paper's section on combining with GPTQ): the same column loop also
rounds every kept weight to its group's integer grid, so one OBS update compensates the pruning
and the rounding error of each column together. A group's grid is computed when the loop reaches
its first column, from the error-compensated values of its columns that are (or, for N:M, would
now be) kept. With a fixed mask (`keep`) the loop only quantizes: GPTQ with the pruned weights
held at zero, which is how "prune, then quantize" runs as a second pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.quant.gptq_math import MAX_DAMP, inverse_hessian_cholesky, one_cpu_thread, quantize_column
from compress.quant.quantize import QuantGrid, cast_grid, compute_grid, num_groups

from .masks import keep_top, nm_mask, pruned_per_row


@dataclass(frozen=True)
class GridSpec:
    """The integer grid the kept weights are rounded to (quant/quantize.py): group_size is in
    input columns of the dense weight, already resolved (<= in)."""

    bits: int
    group_size: int
    symmetric: bool
    clip: bool
    scale_dtype: torch.dtype


@dataclass(frozen=True)
class SparseGPTResult:
    """weight: fp32 [out, in], exactly 0 where pruned (quantized: the dequantized kept weights);
    keep: bool [out, in], True where kept; codes: uint8 [out, in] on `grid` (quantized only; the
    pruned entries' codes are meaningless)."""

    weight: torch.Tensor
    keep: torch.Tensor
    codes: torch.Tensor | None = None
    grid: QuantGrid | None = None

logger = logging.getLogger(__name__)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block_size: int = 128, per_row: bool = False, grid: GridSpec | None = None,
                    keep: torch.Tensor | None = None) -> SparseGPTResult:
    """Prune weight [out, in] given H [in, in]. Unstructured: exactly round(ratio * out * in)
    weights, each block of columns pruning its share: the lowest saliencies of the whole block (as
    the reference does, so rows may differ), or with `per_row` of each row of the block (every row
    prunes the same share, up to one). nm = (n, m): n of every m consecutive columns
    (block_size % m == 0). With `grid`, the kept weights are also quantized in the same pass (its
    groups must start on block boundaries or lie inside one block, and hold whole N:M groups).
    With `keep` (bool [out, in]) that mask is used as it is, not chosen."""
    out, cols = weight.shape
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of the group size {nm[1]}")
    if grid is not None:
        gs = grid.group_size
        if gs < cols and block_size % gs and gs % block_size:
            raise ValueError(f"group_size {gs} and block_size {block_size}: one must divide the other")
        if nm is not None and gs < cols and gs % nm[1]:
            raise ValueError(f"group_size {gs} must hold whole groups of {nm[1]}")
    fixed = keep is not None
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)
    if not torch.isfinite(h).all():
        raise CompressError(f"SparseGPT: the Hessian [{cols}, {cols}] has NaN or infinite entries; the calibration "
                            "inputs overflowed")
    dead = h.diagonal() == 0  # an input that is zero on every token: its weights cannot matter here
    h[dead, dead] = 1
    w[:, dead] = 0
    start = damp
    while (u := inverse_hessian_cholesky(h, damp)) is None:
        damp = max(damp * 10, 1e-4)
        if damp > MAX_DAMP:
            raise CompressError(f"SparseGPT: the Hessian [{cols}, {cols}] is not positive definite")
    if damp != start:
        logger.warning("SparseGPT: Hessian [%d, %d] needed damp=%g (asked %g)", cols, cols, damp, start)

    # Unstructured: each block prunes its share, counted cumulatively so the layer total is exact;
    # per row, or for the block as one [1, out * b] row.
    share = None if nm is not None or fixed else (pruned_per_row(ratio, out, cols) if per_row
                                                  else torch.tensor([round(ratio * out * cols)]))
    done = torch.zeros_like(share) if share is not None else None  # weights pruned so far
    # a fixed mask's pruned weights are zeroed (their error compensated) when the loop reaches them
    keep = keep.to(w.device, torch.bool, copy=True) if fixed else torch.ones(out, cols, dtype=torch.bool,
                                                                              device=w.device)
    energy = h.diagonal().clone()  # [in]: each column's input energy, the clip search's weights
    codes = scales = zeros = None
    if grid is not None:
        groups = num_groups(cols, grid.group_size)
        codes = torch.empty(out, cols, dtype=torch.uint8, device=w.device)
        scales = torch.empty(out, groups, device=w.device)
        zeros = None if grid.symmetric else torch.empty(out, groups, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2]  # [out, b], a view
        u1 = u[i1:i2, i1:i2]  # [b, b]
        err1 = torch.zeros_like(w1)
        if share is not None:
            saliency = w1.square() / u1.diagonal().square()  # [out, b]
            target = (share * i2 + cols // 2) // cols  # pruned by the end of this block, rounded
            scores = saliency if per_row else saliency.reshape(1, -1)
            keep[:, i1:i2] = keep_top(scores, target - done).view(out, i2 - i1)
            done = target
        with one_cpu_thread(w.device):
            for i in range(i2 - i1):
                j = i1 + i
                if nm is not None and not fixed and i % nm[1] == 0:
                    n, m = nm
                    saliency = w1[:, i:i + m].square() / u1.diagonal()[i:i + m].square()
                    keep[:, j:j + m] = nm_mask(saliency, n, m)
                col = w1[:, i]
                if grid is not None:
                    g = j // grid.group_size
                    if j % grid.group_size == 0:
                        _group_grid(w, u, keep, energy, nm, fixed, grid, j, scales, zeros, block_size)
                    q_codes, col_q = quantize_column(col, scales[:, g], None if zeros is None else zeros[:, g],
                                                     grid.bits)
                    codes[:, j] = q_codes.to(torch.uint8)
                else:
                    col_q = col
                q = torch.where(keep[:, j], col_q, 0.0)
                err = (col - q) / u1[i, i]
                w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                w1[:, i] = q
                err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if not torch.isfinite(w).all():
        raise CompressError(f"SparseGPT: the pruned weight [{out}, {cols}] has NaN or infinite entries; "
                            "raise damp")
    # pruned entries were set to exactly 0 in the column loop
    if grid is None:
        return SparseGPTResult(w, keep)
    return SparseGPTResult(w, keep, codes, QuantGrid(grid.bits, grid.group_size, scales, zeros))


def _group_grid(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, energy: torch.Tensor,
                nm: tuple[int, int] | None, fixed: bool, grid: GridSpec, j: int, scales: torch.Tensor,
                zeros: torch.Tensor | None, block_size: int) -> None:
    """The grid of the group starting at column j, into scales / zeros [out, n_groups], from the
    values its kept weights will have once the group's own pruned weights are compensated: the
    current values of its columns (all up to date: the group starts a block or lies inside the
    current one) with the pruning half of the column loop run ahead over the group alone. (From
    the current values, as the reference does, the large pruning updates inside the group push
    kept weights out of the range: on correlated inputs its error came out above pruning and
    then quantizing in two passes.) For N:M, the pattern the group would get from the current
    saliencies stands in for the masks not chosen yet; unstructured masks of blocks not reached
    yet count as kept."""
    k = min(grid.group_size, w.shape[1] - j)
    values = w[:, j:j + k].clone()  # [out, k]
    ug = u[j:j + k, j:j + k]  # [k, k]
    mask = nm_mask(values.square() / ug.diagonal().square(), *nm) if nm is not None and not fixed \
        else keep[:, j:j + k]  # unstructured: chosen for the current block, True beyond it
    for c1 in range(0, k, block_size):  # blocked like the main loop: a large group costs matmuls, not k^2 steps
        c2 = min(c1 + block_size, k)
        v1, u1 = values[:, c1:c2], ug[c1:c2, c1:c2]  # [out, b] (a view), [b, b]
        err1 = torch.zeros_like(v1)
        for c in range(c2 - c1):
            err = torch.where(mask[:, c1 + c], 0.0, v1[:, c]) / u1[c, c]  # [out]
            v1[:, c:] -= err.unsqueeze(1) * u1[c, c:].unsqueeze(0)
            err1[:, c] = err
        values[:, c2:] -= err1 @ ug[c1:c2, c2:]
    g = cast_grid(compute_grid(values * mask, grid.bits, k, grid.symmetric, grid.clip, energy[j:j + k]),
                  grid.scale_dtype)
    scales[:, j // grid.group_size] = g.scales[:, 0]
    if zeros is not None:
        zeros[:, j // grid.group_size] = g.zeros[:, 0]
