"""Bit packing of low-bit integer codes into bytes, for any width from 2 to 8 bits.

Layout: each row is one little-endian bit stream. Code i of a row occupies bits
[i*bits, (i+1)*bits) of the stream, byte j holds stream bits [8j, 8j+8). For 4 bits this is
the usual "low nibble first" layout; for 2 bits four codes per byte, lowest first. Rows are
padded with zero codes to a multiple of 8 codes, so a row of n codes takes ceil(n/8)*bits bytes
(8-bit rows are not padded).
Kernels may re-pack at load time; this layout is the checkpoint format.
"""

from __future__ import annotations

import torch

CODES_PER_CHUNK = 8  # 8 codes of b bits fill exactly b bytes, for every b


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one row of `n` codes takes when packed (8-bit codes are stored as they are)."""
    if bits == 8:
        return n
    return -(-n // CODES_PER_CHUNK) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [rows, n] (values < 2**bits) into uint8 [rows, packed_row_bytes(n, bits)]."""
    _check_bits(bits)
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    pad = (-n) % CODES_PER_CHUNK
    if 8 % bits == 0:  # 2 and 4 bits: byte j holds codes j * per ... j * per + per - 1, lowest first
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(rows, -1, per)
        packed = c[..., 0].clone()  # [rows, bytes]; uint8 throughout (1/8 the memory of the stream below)
        for i in range(1, per):
            packed |= c[..., i] << (i * bits)
        return packed
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    c = c.view(rows, -1, CODES_PER_CHUNK)  # [rows, chunks, 8]
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=codes.device) * bits
    stream = (c << shifts).sum(dim=-1, keepdim=True)  # [rows, chunks, 1]: 8*bits <= 56 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (stream >> byte_shifts) & 0xFF  # [rows, chunks, bits]
    return packed.to(torch.uint8).reshape(rows, -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [rows, bytes] -> uint8 codes [rows, n]."""
    _check_bits(bits)
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if 8 % bits == 0:  # 2 and 4 bits: codes never straddle a byte, so stay in uint8
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)
        return codes.reshape(rows, -1)[:, :n]
    # 3, 5, 6, 7 bits: code i of a chunk starts at bit i*bits and may straddle two bytes.
    b = torch.nn.functional.pad(packed.view(rows, -1, bits).to(torch.int32), (0, 1))  # [rows, chunks, bits+1]
    mask = (1 << bits) - 1
    codes = []
    for i in range(CODES_PER_CHUNK):
        byte, shift = divmod(i * bits, 8)
        codes.append(((b[..., byte] | (b[..., byte + 1] << 8)) >> shift) & mask)
    return torch.stack(codes, dim=-1).to(torch.uint8).reshape(rows, -1)[:, :n]


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
