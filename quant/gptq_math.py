"""Pure tensor math of GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), following the reference implementation (IST-DASLab/gptq).

A Linear computes y = x W^T with W [out, in]. For calibration inputs X [N, in] (one row per
token) the layer's squared output error for a quantized Q is

    ||X W^T - X Q^T||_F^2 = sum over rows r of (W_r - Q_r) (X^T X) (W_r - Q_r)^T,

a quadratic form in each row with the same Hessian H = 2/N X^T X (GPTQ's convention; the factor
2 and the mean over N do not change the minimiser). GPTQ quantizes the columns one after the
other and, after each, moves the not-yet-quantized columns of every row so as to cancel the
error just made as well as H allows (the Optimal Brain Surgeon update), using the upper
Cholesky factor of H^-1 so that the shrinking inverse never has to be recomputed.

The result is stored in exactly the round-to-nearest format of `quantize.py`: codes in the
original column order, contiguous groups of `group_size` columns, one scale (and zero point)
per (row, group). Activation order ("actorder") only changes the order in which columns are
processed, never the groups, so no g_idx is needed to dequantize.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from compress.errors import CompressError

from .quantize import QuantGrid, cast_grid, compute_grid, num_groups, round_to_grid

logger = logging.getLogger(__name__)

# Dampening is retried x10 at a time up to this fraction of mean(diag(H)). A (numerically)
# positive semi-definite H plus 1e3 * mean(diag) * I has all eigenvalues in
# [1e3 m, (n + 1e3) m] (m = mean diagonal, n = size), so its Cholesky cannot fail in float32
# for any realistic n; a failure there means H is not a Gram matrix at all (a caller bug).
MAX_DAMP = 1e3


@dataclass(frozen=True)
class GPTQResult:
    """codes: uint8 [out, in] in the original column order, in [0, 2**bits);
    grid: the QuantGrid the codes refer to (scales already rounded to the storage dtype, held as
    float32 values; zeros integer-valued float or None), so `dequantize(codes, grid)` is the
    quantized weight; damp: dampening actually used (fraction of mean(diag(H)));
    loss: the GPTQ objective summed over rows, sum((w - q)^2 / d^2) / 2 with d the diagonal of
    the upper Cholesky factor of the dampened H^-1 (the increase of the quadratic error
    predicted by the OBS step of each column, as the reference implementation reports it)."""

    codes: torch.Tensor
    grid: QuantGrid
    damp: float
    loss: float


def accumulate_hessian(hessian: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running H = 2/N * sum_tokens x^T x.

    hessian: [in, in] float32 (None to start); count: rows (tokens) already folded in;
    x: [..., in], every leading position is one token. Returns (H [in, in] float32, count + n).
    Kept as a running mean (not a sum) so the values stay O(x^2) however many tokens are seen.
    """
    n_in = x.shape[-1]
    rows = x.reshape(-1, n_in)  # [n, in]
    n = rows.shape[0]
    if hessian is None:
        hessian = torch.zeros(n_in, n_in, dtype=torch.float32, device=x.device)
    elif hessian.shape != (n_in, n_in):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, inputs have {n_in} features")
    if n == 0:
        return hessian, count
    total = count + n
    # H * count/total + 2/total * X^T X, with the 2/total folded into X as sqrt(2/total) like the
    # reference: one fused matmul, no [in, in] temporary scaled afterwards.
    rows = rows.to(device=hessian.device, dtype=torch.float32) * math.sqrt(2.0 / total)
    hessian = hessian.float()  # the caller's accumulator, updated in place (no [in, in] temporaries)
    hessian.mul_(count / total).addmm_(rows.t(), rows)  # [in, n] @ [n, in]
    return hessian, total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    damp: float = 0.01,
    block_size: int = 128,
    actorder: bool = False,
    static_groups: bool = False,
    clip: bool = False,
) -> GPTQResult:
    """GPTQ-quantize weight [out, in] (any float dtype; computed in float32) given H [in, in].

    group_size: resolved, 1 <= group_size <= in (in = per-channel; a shorter last group when it
    does not divide in). damp: fraction of mean(diag(H)) added to the diagonal (raised x10,
    with a warning, until the Cholesky factorisations succeed). block_size: columns per lazy
    batch update (a speed knob only: the result is the same up to float rounding).
    actorder: process columns by decreasing diag(H) (the groups stay the original contiguous
    ones). static_groups: every group's grid from the original weight up front instead of from
    the error-compensated values when the group's first column (in processing order) is reached.
    clip: each group's range shrunk to the least rounding error weighted by diag(H), the input
    energy of each column (quantize.compute_grid).
    """
    out, n = weight.shape
    if hessian.shape != (n, n):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, weight has {n} input columns")
    if not 1 <= group_size <= n:
        raise ValueError(f"group_size must be in [1, {n}], got {group_size}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size must be >= 1 and damp >= 0, got {block_size} and {damp}")

    w = weight.detach().to(torch.float32, copy=True)  # [out, in], updated in place below
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)  # [in, in]
    if not torch.isfinite(h).all():
        raise CompressError(
            f"GPTQ: the Hessian [{n}, {n}] has NaN or infinite entries; the calibration inputs overflowed"
        )

    # Dead inputs (a feature that is zero on every calibration token): H has a zero row and column
    # there, so it is singular; the weight column cannot matter on this data, so zero it and give
    # H a unit diagonal entry, which decouples that column from every other.
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    energy = h.diagonal().clone()  # [in], original column order

    def grid_of(values: torch.Tensor, start: int) -> QuantGrid:
        """The stored grid of one group: columns start.. (original order), holding `values` [out, k]."""
        k = values.shape[1]
        return cast_grid(compute_grid(values, bits, k, symmetric, clip, energy[start : start + k]), scale_dtype)

    static_grid = (cast_grid(compute_grid(w, bits, group_size, symmetric, clip, energy), scale_dtype)
                   if static_groups else None)

    perm = None
    if actorder:
        # Columns with the largest input energy first: their errors can still be compensated by
        # the most remaining columns.
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    start_damp = damp
    while True:
        u = inverse_hessian_cholesky(h, damp)  # [in, in] upper, or None
        if u is not None:
            # Clone: _gptq_pass updates its weight in place, and a retry needs the original.
            codes, scales, zeros, loss = _gptq_pass(w.clone(), u, perm, bits, group_size, symmetric, grid_of,
                                                    block_size, static_grid)
            if math.isfinite(loss) and torch.isfinite(scales).all():
                break
        next_damp = max(damp * 10, 1e-4)
        if next_damp > MAX_DAMP:
            raise CompressError(
                f"GPTQ: the Hessian [{n}, {n}] is not positive definite even with damp={damp:g}; "
                "it cannot come from real calibration inputs"
            )
        damp = next_damp
    if damp != start_damp:
        logger.warning(
            "GPTQ: Hessian [%d, %d] not positive definite (or too ill-conditioned) with damp=%g; used damp=%g",
            n, n, start_damp, damp,
        )

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]  # processing position -> original column
    return GPTQResult(codes, QuantGrid(bits, group_size, scales, zeros), damp, loss)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor U of (h + damp * mean(diag(h)) * I)^-1, [in, in], or None if a
    factorisation fails. Row j of U, divided by U[j, j], is the OBS update direction of column
    j over the columns after it, with the columns before it already eliminated."""
    hd = h.clone()
    hd.diagonal().add_(damp * h.diagonal().mean())
    low, info = torch.linalg.cholesky_ex(hd)
    if info.item() != 0 or not torch.isfinite(low).all():
        return None
    # H^-1 by two triangular solves against I: torch.cholesky_inverse is several times slower on CPU.
    inverse = torch.cholesky_solve(torch.eye(h.shape[0], device=h.device, dtype=h.dtype), low)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def quantize_column(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column w [out] on its group's per-row scales [out] and zeros [out] (None: symmetric).
    Returns (codes [out] float, dequantized [out] float32), the same float operations as
    `quantize` / `dequantize` so the results are bit-identical to them."""
    zp = 2 ** (bits - 1) if zeros is None else zeros
    q = round_to_grid(w, scales, zp, bits)
    return q, (q - zp) * scales


def _gptq_pass(
    w: torch.Tensor,
    u: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid_of: Callable[[torch.Tensor, int], QuantGrid],
    block_size: int,
    static_grid: QuantGrid | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """One GPTQ sweep over w [out, in] (columns in processing order; modified in place) with the
    upper Cholesky factor u [in, in] of the dampened H^-1 in the same order. perm[p] is the
    original column at position p (None: identity). grid_of(values [out, k], first original
    column) gives a group's grid. Returns codes uint8 [out, in] in processing
    order, scales [out, G], zeros [out, G] or None (original group order) and the loss."""
    out, n = w.shape
    n_groups = num_groups(n, group_size)
    if static_grid is not None:
        scales, zeros = static_grid.scales.clone(), static_grid.zeros
        ready = [True] * n_groups
    else:
        scales = torch.empty(out, n_groups, device=w.device)
        zeros = None if symmetric else torch.empty(out, n_groups, device=w.device)
        ready = [False] * n_groups
    # Index maps as Python lists: no device sync in the column loop.
    orig = perm.tolist() if perm is not None else list(range(n))  # position -> original column
    pos_of = [0] * n  # original column -> position
    for p, c in enumerate(orig):
        pos_of[c] = p
    codes = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    loss = torch.zeros(out, device=w.device)  # [out]

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2]  # [out, b], a view: in-block updates land in w directly
        err1 = torch.zeros(out, i2 - i1, device=w.device)  # [out, b] scaled errors, for the lazy update
        u1 = u[i1:i2, i1:i2]  # [b, b]
        with one_cpu_thread(w.device):
            _quantize_block(w, w1, u, u1, err1, codes, scales, zeros, loss, ready, orig, pos_of, i1, i2, bits,
                            group_size, grid_of)
        # Lazy batch update: the whole block's errors reach the later columns in one matmul.
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # [out, b] @ [b, n - i2]
    return codes, scales, zeros, loss.sum().item()


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on CPU, OpenMP threads only add synchronisation
    (10-20x slower when other processes compete for the cores), so run it on one thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quantize_block(w, w1, u, u1, err1, codes, scales, zeros, loss, ready, orig, pos_of, i1, i2, bits, group_size,
                    grid_of) -> None:
    """Quantize columns [i1, i2) one by one with in-block OBS updates (see _gptq_pass)."""
    for i in range(i2 - i1):
        g = orig[i1 + i] // group_size
        if not ready[g]:
            # First column of group g in processing order: its grid comes from the current
            # (error-compensated) values of all its columns, which all lie at positions >= i1+i.
            _group_grid(w, u, err1, pos_of, g, i1, i, i2, group_size, grid_of, scales, zeros)
            ready[g] = True
        col = w1[:, i]  # [out]
        q, dq = quantize_column(col, scales[:, g], None if zeros is None else zeros[:, g], bits)
        codes[:, i1 + i] = q.to(torch.uint8)
        d = u1[i, i]
        err = (col - dq) / d  # [out]
        loss += err.square() / 2
        # OBS update of the rest of the block: w_k -= (w_j - q_j) * U[j, k] / U[j, j].
        w1[:, i + 1 :] -= err.unsqueeze(1) * u1[i, i + 1 :].unsqueeze(0)
        err1[:, i] = err


def _group_grid(w, u, err1, pos_of, g, i1, i, i2, group_size, grid_of, scales, zeros) -> None:
    """Compute group g's grid into column g of scales/zeros [out, G], from its current values.

    Columns of the group inside the current block [i1, i2) are up to date in w; those after it
    still miss the pending lazy update from the block's first i columns, err1[:, :i] @ u[i1:i1+i].
    (The reference implementation reads w without that pending term when a group starts inside
    a block; the two agree whenever groups start on block boundaries, e.g. group 128, block 128.)
    """
    cols = pos_of[g * group_size : (g + 1) * group_size]  # positions of the group's columns, all >= i1 + i
    cur = w[:, cols]  # [out, gs], a copy (advanced indexing)
    later = [k for k, p in enumerate(cols) if p >= i2]
    if i > 0 and later:
        cur[:, later] -= err1[:, :i] @ u[i1 : i1 + i][:, [cols[k] for k in later]]  # [out, i] @ [i, len(later)]
    grid = grid_of(cur, g * group_size)
    scales[:, g] = grid.scales[:, 0]
    if zeros is not None:
        zeros[:, g] = grid.zeros[:, 0]
