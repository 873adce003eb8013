"""Compressed storage of pruned weights (the checkpoint format; kernels may re-pack at load).

N:M (`compress_nm`): each row keeps m - n values per group of m; stored as
    values   [out, in * (m - n) / m]   the kept weights, group by group, in column order
    indices  uint8 [out, packed]       each kept value's position inside its group
                                       (ceil(log2 m) bits each, bit-packed as quant/packing.py)
For 2:4 a kept value costs its own 16 bits plus 2 bits of position, so a bf16 layer takes
(8 + 1) / 16 = 56.25% of its dense bytes. `cutlass_metadata` turns the positions into the
metadata layout of PyTorch's CUTLASS 2:4 path (`to_cutlass`), for its sparse kernels.

Unstructured (`pack_bitmask`): one bit per weight (1 = kept), 8 per byte, lowest column in the
lowest bit, rows padded to whole bytes; the kept values follow in row-major order.
"""

from __future__ import annotations

import math

import torch

from compress.quant.packing import pack_codes, unpack_codes


def index_bits(m: int) -> int:
    return max(2, math.ceil(math.log2(m)))  # bit packing takes 2..8 bits per code


def compress_nm(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] and its N:M mask (True = kept, exactly m - n per group) ->
    (values [out, in * (m - n) / m], packed positions uint8)."""
    out, cols = weight.shape
    k = m - n
    groups = keep.reshape(out, -1, m)  # [out, G, m]
    # positions of the kept entries, ascending inside each group: sort the group's column indices
    # with the pruned ones pushed past the end
    pos = torch.arange(m, device=weight.device).expand_as(groups)
    pos = torch.where(groups, pos, m).sort(dim=-1).values[..., :k]  # [out, G, k]
    values = weight.reshape(out, -1, m).gather(-1, pos).reshape(out, -1)
    return values, pack_codes(pos.reshape(out, -1).to(torch.uint8), index_bits(m))


def decompress_nm(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """Inverse of compress_nm: the dense weight [out, cols] with zeros where pruned."""
    out = values.shape[0]
    k = m - n
    pos = unpack_codes(indices, index_bits(m), cols // m * k).long().view(out, -1, k)
    dense = torch.zeros(out, cols // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.view(out, -1, k))
    return dense.view(out, cols)


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in / 8)]."""
    out, cols = keep.shape
    bits = torch.nn.functional.pad(keep.to(torch.uint8), (0, (-cols) % 8)).view(out, -1, 8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.uint8))
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [out, bytes] -> bool [out, cols]."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [out, bytes, 8]
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


def to_cutlass(values: torch.Tensor, indices: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 layer in our format -> (values, metadata) exactly as PyTorch's CUTLASS conversion
    (`sparse_semi_structured_from_dense_cutlass`) lays them out for its sparse kernels: the kept
    values unchanged, and per row one int16 per 16 input columns holding the four groups' position
    nibbles (first kept position in the low two bits), then reordered into CUTLASS's interleaved
    tile order. Needs rows % 32 == 0 and cols % 16 == 0, as PyTorch does; 16-bit values."""
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    out = indices.shape[0]
    if values.shape != (out, cols // 2) or out % 32 or cols % 16 or values.element_size() != 2:
        raise ValueError(f"to_cutlass takes a 2:4 layer of 16-bit values with rows % 32 == 0 and cols % 16 == 0; "
                         f"got values {tuple(values.shape)} {values.dtype} for {cols} columns")
    pos = unpack_codes(indices, 2, cols // 2).to(torch.int32).view(out, -1, 8)  # 8 positions per 16 columns
    shifts = torch.arange(8, device=indices.device, dtype=torch.int32) * 2
    meta = (pos << shifts).sum(dim=-1, dtype=torch.int32)  # [out, cols // 16], 16 bits used
    meta = torch.where(meta < 2**15, meta, meta - 2**16).to(torch.int16)
    offsets = _calculate_meta_reordering_scatter_offsets(out, cols // 16, torch.int16, indices.device)
    reordered = meta.new_empty(meta.numel()).scatter_(0, offsets, meta.view(-1))
    return values, reordered.view(out, cols // 16)
