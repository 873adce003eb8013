"""Pure tensor math of SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot"), following the reference implementation (IST-DASLab/sparsegpt).

The layer's output error for a pruned W' on calibration inputs X is the same quadratic form as
GPTQ's, sum over rows of (W_r - W'_r) H (W_r - W'_r)^T with H = 2/N X^T X. SparseGPT walks the
columns in blocks: at each block it chooses the mask by the OBS saliency w^2 / U_jj^2 (U the upper
Cholesky factor of H^-1, U_jj^2 the inverse Hessian's diagonal after eliminating earlier columns)
(per block of columns for unstructured sparsity, per group of M columns for N:M), then zeroes
the pruned weights column by column and moves the not-yet-visited columns of each row to cancel
the error, with the same upper Cholesky factor of H^-1 as GPTQ.
"""

from __future__ import annotations

import logging

import torch

from compress.errors import CompressError
from compress.quant.gptq_math import MAX_DAMP, inverse_hessian_cholesky, one_cpu_thread

from .masks import keep_top, nm_mask, pruned_per_row

logger = logging.getLogger(__name__)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block_size: int = 128, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune weight [out, in] given H [in, in]: (updated weight [out, in] fp32 with zeros where
    pruned, keep mask bool [out, in]). Unstructured: exactly round(ratio * out * in) weights, each
    block of columns pruning its share: the lowest saliencies of the whole block (as the reference
    does, so rows may differ), or with `per_row` of each row of the block (every row prunes the
    same share, up to one). nm = (n, m): n of every m consecutive columns (block_size % m == 0)."""
    out, cols = weight.shape
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of the group size {nm[1]}")
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
    share = None if nm is not None else (pruned_per_row(ratio, out, cols) if per_row
                                         else torch.tensor([round(ratio * out * cols)]))
    done = torch.zeros_like(share) if share is not None else None  # weights pruned so far
    keep = torch.ones(out, cols, dtype=torch.bool, device=w.device)
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
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    saliency = w1[:, i:i + m].square() / u1.diagonal()[i:i + m].square()
                    keep[:, i1 + i:i1 + i + m] = nm_mask(saliency, n, m)
                col = w1[:, i]
                q = torch.where(keep[:, i1 + i], col, 0.0)
                err = (col - q) / u1[i, i]
                w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                w1[:, i] = q
                err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if not torch.isfinite(w).all():
        raise CompressError(f"SparseGPT: the pruned weight [{out}, {cols}] has NaN or infinite entries; "
                            "raise damp")
    return w, keep  # pruned entries were set to exactly 0 in the column loop
