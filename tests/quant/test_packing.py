import pytest
import torch

from compress.quant.packing import pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 77])
def test_pack_roundtrip_is_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packed_size_is_bits_over_eight():
    # 4-bit: two codes a byte; 3-bit: 8 codes in 3 bytes; 2-bit: four a byte
    assert packed_row_bytes(576, 4) == 288
    assert packed_row_bytes(576, 3) == 216
    assert packed_row_bytes(576, 2) == 144
    assert packed_row_bytes(576, 8) == 576


def test_four_bit_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_three_bit_layout_is_a_little_endian_stream():
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8)  # bits 0-2 set, bit 21 set
    assert pack_codes(codes, 3).tolist() == [[0x07, 0x00, 0x20]]


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="between 2 and 8"):
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), 9)
