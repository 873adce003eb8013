"""The weight layout the integer matmul kernels consume, derived at load time from the checkpoint.

The checkpoint (quant/packing.py) stores each row of codes as a little-endian bit stream of
bytes. For bits in {2, 4, 8} no code straddles a byte, so the same bytes read as little-endian
int32 words are already a kernel-friendly layout:

    words   int32 [N, n_words]   code k of row n sits in word k // cpw at bits (k % cpw) * bits,
                                 cpw = 32 // bits codes per word; n_words = ceil(K / cpw)

2:4 sparse weights (sparsity/sparse_quant.py) add, beside the words of the K / 2 kept codes of
each row, their positions (slot 0..3 in their group of 4 columns) as 2-bit codes in words of
their own:

    positions int32 [N, n_pos_words]   kept value j of a row sits at column 4 * (j // 2) + slot j

A 2:4 float weight (sparsity/layers.py's SparseLinear) is the same with the kept values
themselves in place of their codes: values [N, K / 2] (16-bit), positions as above.

Rows whose byte count is not a multiple of 4 are zero-padded (a copy); all others are a view,
so prepacking costs no memory for the weights. Codes of 3, 5, 6 and 7 bits straddle bytes in the
checkpoint's stream; prepacking widens them (`widen_codes`) to the next width the kernels read
(4 or 8 bits, `kernel_bits`), the same weight exactly, in a copy of its own. Scales and zero
points are transposed to [n_groups, N] so that a kernel loading one group's values for a block
of output rows reads contiguous memory.
"""

from __future__ import annotations

import torch

KERNEL_BITS = (2, 4, 8)  # widths whose codes never straddle a 32-bit word


def kernel_bits(bits: int) -> int:
    """The width the kernels read `bits`-bit codes at (2..8): the smallest of KERNEL_BITS that holds them."""
    return next(b for b in KERNEL_BITS if b >= bits)


def widen_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes uint8 [rows, n] of `bits` as codes of kernel_bits(bits) with the same dequantized
    values. Asymmetric codes and their zero points (< 2**bits) stay as they are; symmetric codes
    move by 2**(kb - 1) - 2**(bits - 1) so that the wider width's symmetric zero 2**(kb - 1)
    applies: (code + shift) - 2**(kb - 1) == code - 2**(bits - 1), and code + shift < 2**kb."""
    kb = kernel_bits(bits)
    if not symmetric or kb == bits:
        return codes
    return codes + (2 ** (kb - 1) - 2 ** (bits - 1))


def supported(bits: int, group_size: int, in_features: int, sp24: bool = False) -> bool:
    """Whether the Triton kernels handle this format (else the reference path runs): 2:4 needs
    groups of whole 32-column tiles and K a multiple of 32."""
    if sp24:
        return bits in KERNEL_BITS and in_features % 32 == 0 and (group_size >= in_features or group_size % 32 == 0)
    return bits in KERNEL_BITS and (group_size >= in_features or group_size % 16 == 0)


def words_of(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [N, row_bytes] (bit-packed rows) -> int32 [N, ceil(row_bytes / 4)], a view when it can be."""
    pad = (-packed_rows.shape[1]) % 4
    if pad:
        packed_rows = torch.nn.functional.pad(packed_rows, (0, pad))
    return packed_rows.contiguous().view(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [N, n_words] -> codes uint8 [N, k] (the reference reading of the layout). Works on the
    little-endian bytes: no code straddles a byte, and uint8 arithmetic moves 4x less memory."""
    b = words.view(torch.uint8)  # [N, 4 * n_words]
    if bits == 8:
        return b[:, :k]
    mask = (1 << bits) - 1
    codes = torch.stack([(b >> shift) & mask for shift in range(0, 8, bits)], dim=-1)  # [N, 4 * n_words, 8 // bits]
    return codes.reshape(words.shape[0], -1)[:, :k]


def dequantize_words(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference semantics of every kernel: weight [N, k] in `dtype`, computed in fp32 as
    (code - zero) * scale with scales [n_groups, N], zeros uint8 [n_groups, N] (None: the
    symmetric zero 2**(bits-1)); column j belongs to group j // group_size."""
    return _dequantize_codes(unpack_words(words, bits, k), scales, zeros, bits, group_size, dtype)


def _dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [N, k] -> (code - zero) * scale [N, k] in `dtype`, computed in fp32."""
    (n, k), groups = codes.shape, scales.shape[0]
    span = k if groups == 1 else group_size  # columns per group as stored
    codes = torch.nn.functional.pad(codes, (0, groups * span - k)).view(n, groups, span)
    w = codes.float()  # [N, n_groups, span], a fresh tensor
    w.sub_(2 ** (bits - 1) if zeros is None else zeros.T.unsqueeze(-1).float())
    w.mul_(scales.T.unsqueeze(-1).float())
    return w.view(n, -1)[:, :k].to(dtype)


def dequantize_sp24_words(words: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, bits: int, group_size: int, k: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """The reference semantics of the 2:4 kernels: weight [N, k] in `dtype`, zero but for the kept
    values, each dequantized on the group of its dense column."""
    n = words.shape[0]
    codes = unpack_words(words, bits, k // 2).view(n, k // 4, 2)  # kept codes, two per group of 4
    slots = unpack_words(positions, 2, k // 2).view(n, k // 4, 2).long()
    dense = torch.zeros(n, k // 4, 4, dtype=torch.uint8, device=words.device).scatter_(-1, slots, codes)
    kept = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=words.device).scatter_(-1, slots, True)
    w = _dequantize_codes(dense.view(n, k), scales, zeros, bits, group_size, torch.float32)
    return w.masked_fill_(~kept.view(n, k), 0.0).to(dtype)  # +0.0 (a product with 0 gave -0.0 or NaN)


def dense_sp24_values(values: torch.Tensor, positions: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference semantics of the 2:4 float kernels: values [N, k / 2] placed by their
    positions into the dense weight [N, k] in `dtype`, zeros elsewhere."""
    n = values.shape[0]
    slots = unpack_words(positions, 2, k // 2).view(n, k // 4, 2).long()
    dense = torch.zeros(n, k // 4, 4, dtype=dtype, device=values.device)
    return dense.scatter_(-1, slots, values.view(n, k // 4, 2).to(dtype)).view(n, k)
