"""Pure tensor math of pruning masks. A mask is bool [out, in], True where a weight is KEPT.

Patterns:
- "unstructured": any positions; a ratio r prunes exactly round(r * out * in) weights of a layer.
- "N:M": in every group of M consecutive input weights of a row, exactly N are pruned (2:4 keeps
  2 of 4, the layout sparse tensor cores run; 4:8 keeps 4 of 8).

"Scores are importances (larger = keep): |W| for magnitude, |W| * ||x_j|| for Wanda, w^2 / U_jj^2
for SparseGPT (U the upper Cholesky factor of H^-1).
"""

from __future__ import annotations

import torch

from compress.errors import CompressError

UNSTRUCTURED = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N pruned, M group size), 0 < N < M <= 64."""
    if pattern == UNSTRUCTURED:
        return None
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m <= 64:
            return n, m
    raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M <= 64 (e.g. 2:4, 4:8), got '{pattern}'")


def pruned_per_row(ratio: float, rows: int, cols: int) -> torch.Tensor:
    """How many weights each row prunes so that the layer prunes exactly round(ratio * rows * cols):
    floor or ceil of ratio * cols, the extra ones on the first rows. int64 [rows]."""
    total = round(ratio * rows * cols)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.int64)
    counts[:extra] += 1
    return counts


def keep_top(scores: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """Per row, keep all but the `prune[r]` lowest scores. scores [rows, cols], prune int64 [rows]."""
    order = torch.argsort(scores, dim=1, stable=True)  # ascending: the first prune[r] go
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank >= prune.to(scores.device).unsqueeze(1)


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool) -> torch.Tensor:
    """Prune exactly round(ratio * numel) weights: the lowest scores of each row (per_row, Wanda's
    comparison group, the same count in every row up to one) or of the whole layer (magnitude)."""
    rows, cols = scores.shape
    if per_row:
        return keep_top(scores, pruned_per_row(ratio, rows, cols))
    flat = scores.reshape(1, -1)
    return keep_top(flat, torch.tensor([round(ratio * rows * cols)])).view(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores of every group of m consecutive columns (cols % m == 0)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    groups = scores.reshape(-1, m)  # [rows * cols / m, m], no group crosses a row
    keep = keep_top(groups, torch.full((groups.shape[0],), n, dtype=torch.int64))
    return keep.view(rows, cols)


def check_mask(mask: torch.Tensor, pattern: str, ratio: float | None, where: str) -> None:
    """Raise CompressError unless `mask` (True = kept) has exactly the pattern (and, unstructured,
    exactly round(ratio * numel) pruned weights): the verification every pruning step ends with."""
    rows, cols = mask.shape
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise CompressError(f"{where}: {cols} input columns do not split into groups of {m} ({pattern})")
        kept = mask.reshape(-1, m).sum(dim=1)
        if not bool((kept == m - n).all()):
            bad = int((kept != m - n).sum())
            raise CompressError(f"{where}: {bad} groups of {m} do not keep exactly {m - n} weights ({pattern})")
        return
    pruned = rows * cols - int(mask.sum())
    want = round(ratio * rows * cols)
    if pruned != want:
        raise CompressError(f"{where}: pruned {pruned} weights, expected {want} ({ratio:.2%} of {rows * cols})")
