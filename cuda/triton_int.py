"""Triton kernels for y = x @ dequantize(words).T with group-wise integer weights (layout.py).

Six kernels, chosen per shape by `int_matmul` (cuda/tuning.py measures which is fastest):

- `_gemv_kernel` (M = 1, decode): each program owns BLOCK_N output rows and walks the whole K
  dimension, so there is no split-K reduction, no zero-initialised buffer and one launch. Codes
  become biased floats in one mask-or each and the biases, zero points and scales are applied
  once per word (its comments); `_sp24_int_gemv_kernel` is the same walk over 2:4 codes and
  `_sp24_gemv_kernel` over 2:4 float values.
- `_dot_kernel` (small and medium M): dequantized weight tiles feed tensor cores through tl.dot;
  SPLIT_K > 1 spreads K over programs that add their fp32 partial sums atomically (enough
  programs to fill the GPU when M is small).
- `_mma_kernel` (M = 1 to a few hundred): the same with the operands swapped and cheaper
  dequantization (below).
- `_dequant_kernel`: the dense weight, for large M (then cuBLAS does the matmul) and for LoRA
  training or merges.

The others unpack a [rows, words] tile the same way (`_dequant_tile`): code i of every word is
peeled off by a logical shift into a "plane" [rows, words]; each plane is dequantized where it
is (the planes have the loaded words' register layout, so nothing moves between threads); then
tl.interleave merges the planes back into column order k = cpw * j + i. Interleaving adds a
per-thread dimension, so it is a register renaming, not a data exchange, and the tile ends with
each thread holding runs of consecutive columns, which meet x loaded as plain vectors.

Codes become floats without an int->float conversion instruction: OR-ing a code c < 2**23 into
the bits of 2**23 gives the float 2**23 + c exactly, and one subtraction (of 2**23 + zero)
leaves code - zero. Per weight: shift, mask-or, subtract, multiply by the scale, and the FMA.

2:4 sparse weights (`SP24`, the format of sparsity/sparse_quant.py): the words hold only the
kept codes (K / 2 per row, the groups of `GROUP` dense columns holding GROUP / 2 of them) and
`p_ptr` their positions, 2 bits each in int32 words (16 per word); with BITS == 16 (2:4 float
weights, sparsity/layers.py) w_ptr holds the kept values themselves. `_sp24_kept` gives each
group of 4 columns' two kept values and their slots. The 2:4 GEMV multiplies them by the x at
those slots (`_sp24_products`); `_mma_kernel` splits the tile by slot into four MMAs
and so does `_dot_kernel` (`_sp24_slot_tiles`); `_dequant_kernel` places them into a dense tile
(`_load_sp24_tile`, a select per slot). Half the codes and a quarter more bits of position per
weight are read.

`_mma_kernel` (M = 1 to a few hundred) is the tensor-core kernel with the operands swapped and
the dequantization done two codes per instruction, which cuts its hot loop from about 8 to 3-4
instructions per weight and thread at M <= 16 (benchmarks/kernel_sass.py counts them in the
compiled code):
- y.T [N, M] = W [N, K] @ x.T [K, M]: the weight tile is the MMA's A operand (64-row Hopper
  wgmma tiles, taken from registers) and the tokens are its narrow N side (16 and up), so a
  decode batch wastes MMA width, which is cheap, instead of weight rows, which cost bandwidth.
- Codes become 16-bit floats in pairs: masking a word with the code mask repeated in both
  halves (0x000F000F for 4 bits) and OR-ing in the bits of 1024.0 (fp16) or 128.0 (bf16) in both
  halves gives two floats magic + code in one instruction; one packed subtraction of
  magic + zero leaves code - zero, exactly (small integers). bf16 holds 128 + code exactly only
  for codes below 128, so 8-bit codes take the fp16 route and are converted (still exact).
- The tile's integer-valued weights go through the MMA unscaled; the group's scales multiply
  the fp32 result [BLOCK_N, BLOCK_M] (a K tile lies inside one group), BLOCK_K / BLOCK_M times
  fewer multiplications than scaling every weight.

Under TRITON_INTERPRET=1 (CPU tests) `FP32` is set: the interpreter gets bf16 arithmetic wrong,
so everything is upcast right after loading (the MMA kernel dequantizes in fp16 there, which it
gets right, then upcasts).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # bit pattern of the float 2**23 (constexpr: kernels may read only those globals)
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _plane(w, i: tl.constexpr, BITS: tl.constexpr, s, zm, CODES: tl.constexpr):
    """Code i of every word (uint32 [rows, words]) dequantized: (code - zero) * scale, fp32 (CODES:
    the code itself, uint32)."""
    code = (w >> (i * BITS)) & ((1 << BITS) - 1)
    if not CODES:
        code = ((code | MAGIC).to(tl.float32, bitcast=True) - zm) * s
    return code


@triton.jit
def _dequant_tile(words, s, zm, BITS: tl.constexpr, CODES: tl.constexpr = False):
    """int32 words [rows, words] -> fp32 [rows, words * cpw] in column order; s and zm
    (2**23 + zero) broadcast against [rows, words] (CODES: the codes, uint32, s and zm unused).
    Plane x pairs with plane x + half at each interleave level, which puts code i of word j at
    column cpw * j + i."""
    w = words.to(tl.uint32, bitcast=True)
    if BITS == 8:
        return tl.interleave(tl.interleave(_plane(w, 0, 8, s, zm, CODES), _plane(w, 2, 8, s, zm, CODES)),
                             tl.interleave(_plane(w, 1, 8, s, zm, CODES), _plane(w, 3, 8, s, zm, CODES)))
    elif BITS == 4:
        a = tl.interleave(tl.interleave(_plane(w, 0, 4, s, zm, CODES), _plane(w, 4, 4, s, zm, CODES)),
                          tl.interleave(_plane(w, 2, 4, s, zm, CODES), _plane(w, 6, 4, s, zm, CODES)))
        b = tl.interleave(tl.interleave(_plane(w, 1, 4, s, zm, CODES), _plane(w, 5, 4, s, zm, CODES)),
                          tl.interleave(_plane(w, 3, 4, s, zm, CODES), _plane(w, 7, 4, s, zm, CODES)))
        return tl.interleave(a, b)
    else:  # 2 bits, 16 planes
        a = tl.interleave(tl.interleave(tl.interleave(_plane(w, 0, 2, s, zm, CODES), _plane(w, 8, 2, s, zm, CODES)),
                                        tl.interleave(_plane(w, 4, 2, s, zm, CODES), _plane(w, 12, 2, s, zm, CODES))),
                          tl.interleave(tl.interleave(_plane(w, 2, 2, s, zm, CODES), _plane(w, 10, 2, s, zm, CODES)),
                                        tl.interleave(_plane(w, 6, 2, s, zm, CODES), _plane(w, 14, 2, s, zm, CODES))))
        b = tl.interleave(tl.interleave(tl.interleave(_plane(w, 1, 2, s, zm, CODES), _plane(w, 9, 2, s, zm, CODES)),
                                        tl.interleave(_plane(w, 5, 2, s, zm, CODES), _plane(w, 13, 2, s, zm, CODES))),
                          tl.interleave(tl.interleave(_plane(w, 3, 2, s, zm, CODES), _plane(w, 11, 2, s, zm, CODES)),
                                        tl.interleave(_plane(w, 7, 2, s, zm, CODES), _plane(w, 15, 2, s, zm, CODES))))
        return tl.interleave(a, b)


@triton.jit
def _load_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized fp32 weight tile [len(offs_n), BLOCK_K] of columns k0 ... k0 + BLOCK_K."""
    CPW: tl.constexpr = 32 // BITS
    offs_j = tl.arange(0, BLOCK_K // CPW)
    offs_w = k0 // CPW + offs_j
    words = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :],
                    mask=n_ok[:, None] & (offs_w[None, :] < n_words), other=0)
    if BLOCK_K <= GROUP:  # the tile lies in one group: a scale per row
        g = k0 // GROUP + offs_n * 0
        mask = n_ok
        s_off = g * N + offs_n
        s_off, mask = s_off[:, None], mask[:, None]
    else:  # whole groups: a scale per (row, word); a word never straddles two groups
        first = k0 + offs_j * CPW  # first column of each word; past K there is no group
        mask = n_ok[:, None] & (first < K)[None, :]
        s_off = (first // GROUP)[None, :] * N + offs_n[:, None]
    s = tl.load(s_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zm = tl.load(z_ptr + s_off, mask=mask, other=0).to(tl.float32) + MAGIC_F
    else:
        zm = tl.full(s.shape, (1 << (BITS - 1)) + 8388608.0, tl.float32)
    return _dequant_tile(words, s, zm, BITS)


@triton.jit
def _sp24_kept(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept half of dense columns k0 ... k0 + BLOCK_K (a multiple of 32) of a 2:4 weight, as
    (v0, v1, p0, p1), each [len(offs_n), BLOCK_K // 4]: the two kept values of every group of 4
    columns (fp32; dequantized codes, or the values themselves when BITS == 16) and their slots
    in the group (0..3, uint32, p0 < p1)."""
    HALF: tl.constexpr = BLOCK_K // 2
    if BITS == 16:  # w_ptr: the kept values [N, K / 2] (n_words = K / 2)
        offs_v = k0 // 2 + tl.arange(0, HALF)
        kept = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * n_words + offs_v[None, :],  # N * K / 2 may pass 2**31
                       mask=n_ok[:, None] & (offs_v[None, :] < n_words), other=0.0).to(tl.float32)
    else:
        kept = _load_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0 // 2, N, K // 2, n_words, BITS, GROUP // 2,
                          HAS_ZEROS, HALF)  # [rows, HALF], kept column order
    offs_p = k0 // 32 + tl.arange(0, HALF // 16)
    pw = tl.load(p_ptr + offs_n[:, None] * n_pos_words + offs_p[None, :],
                 mask=n_ok[:, None] & (offs_p[None, :] < n_pos_words), other=0)
    return _sp24_pairs(kept, pw)


@triton.jit
def _sp24_pairs(kept, pw):
    """Kept values [rows, HALF] (any dtype) and their position words int32 [rows, HALF / 16] ->
    (v0, v1, p0, p1) [rows, HALF / 2]: each group of 4 columns' two kept values and their slots
    (0..3, uint32, p0 < p1)."""
    pos = _dequant_tile(pw, None, None, 2, CODES=True)  # [rows, HALF]: each kept value's slot
    v0, v1 = tl.split(tl.reshape(kept, [kept.shape[0], kept.shape[1] // 2, 2]))
    p0, p1 = tl.split(tl.reshape(pos, [kept.shape[0], kept.shape[1] // 2, 2]))
    return v0, v1, p0, p1


@triton.jit
def _sp24_slot_tiles(v0, v1, p0, p1):
    """The kept pairs (`_sp24_pairs`) -> the weight's columns at slot 0, 1, 2, 3 of every group of 4,
    [rows, BLOCK_K / 4] each: W = sum over slots s of W_s placed at columns 4g + s, so W @ x.T is
    the sum of the four W_s @ x_s.T, each an MMA over a quarter of K, and the kept values never
    move between registers (placing them into a dense tile would: `_load_sp24_tile`)."""
    zero = tl.zeros_like(v0)
    return (tl.where(p0 == 0, v0, zero), tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero)),
            tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero)), tl.where(p1 == 3, v1, zero))


@triton.jit
def _load_sp24_tile(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized fp32 tile [len(offs_n), BLOCK_K] of dense columns k0 ... k0 + BLOCK_K of a 2:4
    weight: each kept pair placed into its group of 4 columns (a select per slot), zeros between."""
    v0, v1, p0, p1 = _sp24_kept(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words, BITS,
                                GROUP, HAS_ZEROS, BLOCK_K)
    slot = tl.arange(0, 4).to(tl.uint32)[None, None, :]
    dense = tl.where(p0[:, :, None] == slot, v0[:, :, None], 0.0) + tl.where(p1[:, :, None] == slot, v1[:, :, None],
                                                                             0.0)  # [rows, BLOCK_K // 4, 4]
    return tl.reshape(dense, [v0.shape[0], BLOCK_K])


@triton.jit
def _sp24_products(v0, v1, p0, p1, x):
    """v0 * x[slot p0] + v1 * x[slot p1] per group of 4 columns: [rows, BLOCK_K // 4] from the kept
    pairs (`_sp24_kept`) and x fp32 [BLOCK_K]. Picking each kept value's x (p0 is 0..2, p1 is
    1..3: two selects each) costs half of placing the values into a dense tile, and multiplies
    only the kept half."""
    xa, xb = tl.split(tl.reshape(x, [x.shape[0] // 4, 2, 2]))  # xa [G, 2]: x[4g], x[4g + 2]; xb: 4g + 1, 4g + 3
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    x0, x1, x2, x3 = x0[None, :], x1[None, :], x2[None, :], x3[None, :]
    xs0 = tl.where(p0 == 0, x0, tl.where(p0 == 1, x1, x2))
    xs1 = tl.where(p1 == 3, x3, tl.where(p1 == 2, x2, x1))
    return v0 * xs0 + v1 * xs1


@triton.jit
def _weight_tile(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr,
                 SP24: tl.constexpr):
    if SP24:
        w = _load_sp24_tile(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words, BITS, GROUP,
                            HAS_ZEROS, BLOCK_K)
    else:
        w = _load_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, BITS, GROUP, HAS_ZEROS, BLOCK_K)
    return w


@triton.jit
def _sp24_gemv_kernel(x_ptr, w_ptr, p_ptr, s_ptr, z_ptr, y_ptr, N, K, n_words, n_pos_words,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    # x [K], words [N, n_words] (the kept values of a 2:4 float weight, BITS == 16; integer codes
    # take `_sp24_int_gemv_kernel`), positions [N, n_pos_words], y [N]. Products accumulate
    # elementwise in [BLOCK_N, BLOCK_K / 4] registers (a sum per group of 4 columns) and are summed
    # across threads once, after the loop.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # masked tail: x = 0
        v0, v1, p0, p1 = _sp24_kept(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words,
                                    BITS, GROUP, HAS_ZEROS, BLOCK_K)
        acc += _sp24_products(v0, v1, p0, p1, x)
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _unit_at_mantissa_top(w, u: tl.constexpr, UNIT: tl.constexpr):
    """Bits u * UNIT ... (u + 1) * UNIT - 1 of every word (uint32; UNIT 8 or 4) moved to the top of
    an fp32 mantissa, bits 23 - UNIT ... 22 (bits shifted past either end are dropped: only those
    are read)."""
    if u * UNIT <= 23 - UNIT:
        return w << (23 - UNIT - u * UNIT)
    else:
        return w >> (u * UNIT - 23 + UNIT)


@triton.jit
def _biased_codes(moved, t: tl.constexpr, BITS: tl.constexpr, UNIT: tl.constexpr, magic):
    """Code t of the unit at the top of the mantissa (`_unit_at_mantissa_top`) as the fp32
    2**(UNIT - t * BITS) + code, exactly: the float's mantissa bit under the code's lowest
    (23 - UNIT + t * BITS) is worth 1. `magic` holds the bits of 256.0, the float's exponent is
    lowered from there. One mask-or, no shift of its own and no subtraction."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << (23 - UNIT + t * BITS)
    return ((moved & MASK) | (magic - ((8 - UNIT + t * BITS) << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, n_words, magic,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr):
    # x [K], words [N, n_words], scales/zeros [n_groups, N], y [N]; magic: the bits of 256.0 (a
    # runtime argument, so that it lives in a register: the mask-or takes one immediate, the mask).
    # EVEN_K: K % BLOCK_K == 0, no tail to mask.
    #
    # Each byte (nibble for 2-bit codes) of a word moves to the top of an fp32 mantissa, and each
    # code there becomes the float bias_t + code in one mask-or (`_biased_codes`: bias_t = 256, 16
    # for 4 bits; 256 for 8; 16, 4 for 2) and multiplies x unscaled, so per weight the loop spends
    # a share of a shift, the mask-or and one FMA: 3.3-3.8 instructions per weight and thread at 4
    # bits (sm_90) against 7.6-7.9 for shift, extract, or, subtract, scale and FMA per weight
    # (benchmarks/kernel_sass.py). Per word of each row,
    # r = sum_i (bias_i + c_i) * x_i; the biases and the zero point come off once per word, from
    # sums of x alone (shared by the thread's rows): sum_i (c_i - z) * x_i = r - sum_i (bias_i + z)
    # * x_i for symmetric codes, r - sum_i bias_i * x_i - z * sum_i x_i with zero points; then one
    # FMA by the group's scale. The biases are at most 256 and at most 17 times a code's largest
    # value (256 against 15 at 4 bits), so the cancellation costs little fp32 precision (relative
    # error up to ~6e-6 against the reference), far below a 16-bit output's rounding.
    #
    # The tile is [BLOCK_N, GPT, WPG] words: GPT groups per K tile (1 when the tile lies inside a
    # group) of WPG words each, so a scale is loaded once per (row, group), not per word.
    CPW: tl.constexpr = 32 // BITS  # codes per word
    UNIT: tl.constexpr = 4 if BITS == 2 else 8  # bits moved at a time: 2-bit codes in nibbles keep biases <= 16
    PER_UNIT: tl.constexpr = UNIT // BITS
    GPT: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    WPG: tl.constexpr = BLOCK_K // CPW // GPT
    magic = magic.to(tl.uint32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n[:, None, None]
    word = tl.arange(0, GPT)[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [GPT, WPG]: word in the tile
    acc = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_w = k0 // CPW + word
        words = tl.load(w_ptr + rows * n_words + offs_w[None], mask=(rows < N) & ((offs_w[None] < n_words) | EVEN_K),
                        other=0).to(tl.uint32, bitcast=True)
        g = k0 // GROUP + tl.arange(0, GPT)[None, :, None]  # [1, GPT, 1]; past K there is no group
        g_mask = (rows < N) & ((g * GROUP < K) | EVEN_K)
        s = tl.load(s_ptr + g * N + rows, mask=g_mask, other=0.0).to(tl.float32)  # [BLOCK_N, GPT, 1]
        r = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
        x_bias = tl.zeros([GPT, WPG], tl.float32)  # sum_i (bias_i [+ z]) * x_i per word
        x_sum = tl.zeros([GPT, WPG], tl.float32)  # sum_i x_i per word (zero points)
        for u in tl.static_range(32 // UNIT):
            moved = _unit_at_mantissa_top(words, u, UNIT)
            for t in tl.static_range(PER_UNIT):
                offs_k = k0 + word * CPW + (u * PER_UNIT + t)  # column of code u * PER_UNIT + t of each word
                x = tl.load(x_ptr + offs_k, mask=(offs_k < K) | EVEN_K, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    x_bias += x * (1 << (UNIT - t * BITS))
                    x_sum += x
                else:
                    x_bias += x * ((1 << (UNIT - t * BITS)) + (1 << (BITS - 1)))
                r += _biased_codes(moved, t, BITS, UNIT, magic) * x[None]
        r -= x_bias[None]
        if HAS_ZEROS:
            r -= tl.load(z_ptr + g * N + rows, mask=g_mask, other=0).to(tl.float32) * x_sum[None]
        acc += s * r
    tl.store(y_ptr + offs_n, tl.sum(tl.sum(acc, axis=2), axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sp24_kept_term(moved, pw, x_ptr, col0, x_ok, zc, magic, i: tl.constexpr, t: tl.constexpr, BITS: tl.constexpr):
    """(code - zero) * x at its slot for kept value i (0..15) of every position word pw (uint32
    [rows, words]; kept value i of a word sits in group i // 2 of its 32 columns, which start at
    col0 [words]): `moved` holds its code as code t of the byte at bits 15-22 (`_biased_codes`),
    zc = zero point [rows, words]. Kept value 2g sits at slot 0, 1 or 2 of its group and 2g + 1
    at 1, 2 or 3, so two bit tests and two selects pick its x among three."""
    col = col0 + 4 * (i // 2)
    b0 = (pw & (1 << (2 * i))) != 0  # the slot's bits
    b1 = (pw & (2 << (2 * i))) != 0
    if i % 2 == 0:  # slot 0, 1 or 2 (bits 00, 01, 10)
        x0 = tl.load(x_ptr + col, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(x_ptr + col + 1, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(x_ptr + col + 2, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        xs = tl.where(b1, x2, tl.where(b0, x1, x0))
    else:  # slot 1, 2 or 3 (01, 10, 11)
        x1 = tl.load(x_ptr + col + 1, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(x_ptr + col + 2, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        x3 = tl.load(x_ptr + col + 3, mask=x_ok, other=0.0).to(tl.float32)[None, :]
        xs = tl.where(b1, tl.where(b0, x3, x2), x1)
    return (_biased_codes(moved, t, BITS, 8, magic) - (zc + (1 << (8 - t * BITS)))) * xs


@triton.jit
def _sp24_int_gemv_kernel(x_ptr, w_ptr, p_ptr, s_ptr, z_ptr, y_ptr, N, K, n_words, n_pos_words, magic,
                          BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr):
    # x [K], words [N, n_words] (the K / 2 kept codes of each row), positions [N, n_pos_words],
    # scales/zeros [n_groups, N], y [N]; magic: the bits of 256.0 (as in `_gemv_kernel`); EVEN_K:
    # K % BLOCK_K == 0. The tile is [BLOCK_N, BLOCK_K / 32] position words, each covering 32
    # columns: 16 kept values, whose codes fill 16 / cpw words. Per kept value: a share of a
    # shift, a mask-or to a biased float (`_biased_codes`), the subtraction of bias + zero, two bit
    # tests and two selects for its x, one FMA; the scale applies once per position word (GROUP >=
    # 32). 5.3-6.0 instructions per dense weight and thread at 4 bits (sm_90), against 8.2-9.3
    # dequantizing each kept code and picking x as `_sp24_products` does (kernel_sass.py --sp24).
    CPW: tl.constexpr = 32 // BITS
    PER_BYTE: tl.constexpr = 8 // BITS
    CW: tl.constexpr = 16 // CPW  # code words per position word (16 kept codes)
    magic = magic.to(tl.uint32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n[:, None]
    offs_j = tl.arange(0, BLOCK_K // 32)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        pj = k0 // 32 + offs_j  # position words [words]
        mask = (rows < N) & ((pj[None, :] < n_pos_words) | EVEN_K)
        pw = tl.load(p_ptr + rows * n_pos_words + pj[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
        col0 = k0 + 32 * offs_j  # first column of each position word (K % 32 == 0: all in or all out)
        g_off = (col0 // GROUP)[None, :] * N + rows
        s = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zc = tl.load(z_ptr + g_off, mask=mask, other=0).to(tl.float32)
        else:
            zc = tl.full([BLOCK_N, BLOCK_K // 32], 1 << (BITS - 1), tl.float32)
        x_ok = (col0 < K) | EVEN_K
        r = tl.zeros([BLOCK_N, BLOCK_K // 32], tl.float32)
        for c in tl.static_range(CW):
            words = tl.load(w_ptr + rows * n_words + (pj * CW + c)[None, :], mask=mask,
                            other=0).to(tl.uint32, bitcast=True)
            for b in tl.static_range(4):
                moved = _unit_at_mantissa_top(words, b, 8)
                for t in tl.static_range(PER_BYTE):
                    r += _sp24_kept_term(moved, pw, x_ptr, col0, x_ok, zc, magic, c * CPW + b * PER_BYTE + t, t, BITS)
        acc += s * r
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _program_tiles(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """This program's rows of x, rows of the weight, and its range of K tiles [t_first, t_end)
    (program ids: 0 along N, 1 along M, 2 the split of K)."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    return (pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_k * per_split,
            tl.minimum((pid_k + 1) * per_split, tiles))


@triton.jit
def _dot_kernel(x_ptr, w_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, n_words, n_pos_words, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SP24: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                FP32: tl.constexpr):
    # x [M, K], y [M, N] (fp32 and zeroed when SPLIT_K > 1: programs add their partial sums).
    offs_m, offs_n, t_first, t_end = _program_tiles(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(t_first, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if FP32:
            x = x.to(tl.float32)
        if SP24:  # one MMA per slot, as in `_mma_kernel`
            v0, v1, p0, p1 = _sp24_kept(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words,
                                        BITS, GROUP, HAS_ZEROS, BLOCK_K)
            w0, w1, w2, w3 = _sp24_slot_tiles(v0.to(x.dtype), v1.to(x.dtype), p0, p1)
            xa, xb = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 4, 2, 2]))  # x[:, 4g + 2a + b]: b = 0, 1
            x0, x2 = tl.split(xa)
            x1, x3 = tl.split(xb)
            acc = tl.dot(x3, tl.trans(w3), tl.dot(x2, tl.trans(w2), tl.dot(x1, tl.trans(w1),
                                                                           tl.dot(x0, tl.trans(w0), acc))))
        else:
            w = _load_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, BITS, GROUP, HAS_ZEROS, BLOCK_K)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]  # M * N may pass 2**31
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def _dequant_kernel(w_ptr, p_ptr, s_ptr, z_ptr, out_ptr, N, K, n_words, n_pos_words,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SP24: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out [N, K] in its own dtype.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w = _weight_tile(w_ptr, p_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, N, K, n_words, n_pos_words, BITS, GROUP,
                     HAS_ZEROS, BLOCK_K, SP24)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_k[None, :] < K))


@triton.jit
def _pairs16(w, t: tl.constexpr, BITS: tl.constexpr, magic, DQ: tl.constexpr):
    """Codes t and t + cpw / 2 of every word (uint32 [rows, words]) as 16-bit floats magic + code:
    one mask-or with `magic` (the float's bits in both halves) gives both, read as two DQ values."""
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    p = ((w >> (t * BITS)) & MASK) | magic
    return p.to(tl.uint16).to(DQ, bitcast=True), (p >> 16).to(tl.uint16).to(DQ, bitcast=True)


@triton.jit
def _codes16(words, zc, BITS: tl.constexpr, magic, DQ: tl.constexpr, PAIRED: tl.constexpr):
    """int32 words [rows, words] -> code - zero in DQ [rows, words * cpw]; zc = magic + zero (DQ,
    broadcast against [rows, words]). Column order (planes interleave as in `_dequant_tile`), or
    PAIRED: each word's codes in the order t, t + cpw / 2 for t = 0 .. cpw / 2 - 1, which puts the
    two halves of one mask-or side by side, where the MMA wants two consecutive K elements in one
    register (column order takes a byte permute per pair to get there)."""
    w = words.to(tl.uint32, bitcast=True)
    if BITS == 8:
        a0, a2 = _pairs16(w, 0, 8, magic, DQ)
        a1, a3 = _pairs16(w, 1, 8, magic, DQ)
        if PAIRED:
            return tl.interleave(tl.interleave(a0 - zc, a1 - zc), tl.interleave(a2 - zc, a3 - zc))
        return tl.interleave(tl.interleave(a0 - zc, a2 - zc), tl.interleave(a1 - zc, a3 - zc))
    elif BITS == 4:
        a0, a4 = _pairs16(w, 0, 4, magic, DQ)
        a1, a5 = _pairs16(w, 1, 4, magic, DQ)
        a2, a6 = _pairs16(w, 2, 4, magic, DQ)
        a3, a7 = _pairs16(w, 3, 4, magic, DQ)
        if PAIRED:
            return tl.interleave(tl.interleave(tl.interleave(a0 - zc, a2 - zc), tl.interleave(a1 - zc, a3 - zc)),
                                 tl.interleave(tl.interleave(a4 - zc, a6 - zc), tl.interleave(a5 - zc, a7 - zc)))
        return tl.interleave(tl.interleave(tl.interleave(a0 - zc, a4 - zc), tl.interleave(a2 - zc, a6 - zc)),
                             tl.interleave(tl.interleave(a1 - zc, a5 - zc), tl.interleave(a3 - zc, a7 - zc)))
    else:  # 2 bits: codes t and t + 8 per pair
        a0, a8 = _pairs16(w, 0, 2, magic, DQ)
        a1, a9 = _pairs16(w, 1, 2, magic, DQ)
        a2, a10 = _pairs16(w, 2, 2, magic, DQ)
        a3, a11 = _pairs16(w, 3, 2, magic, DQ)
        a4, a12 = _pairs16(w, 4, 2, magic, DQ)
        a5, a13 = _pairs16(w, 5, 2, magic, DQ)
        a6, a14 = _pairs16(w, 6, 2, magic, DQ)
        a7, a15 = _pairs16(w, 7, 2, magic, DQ)
        if PAIRED:
            lo = tl.interleave(tl.interleave(tl.interleave(a0 - zc, a4 - zc), tl.interleave(a2 - zc, a6 - zc)),
                               tl.interleave(tl.interleave(a1 - zc, a5 - zc), tl.interleave(a3 - zc, a7 - zc)))
            hi = tl.interleave(tl.interleave(tl.interleave(a8 - zc, a12 - zc), tl.interleave(a10 - zc, a14 - zc)),
                               tl.interleave(tl.interleave(a9 - zc, a13 - zc), tl.interleave(a11 - zc, a15 - zc)))
            return tl.interleave(lo, hi)
        a = tl.interleave(tl.interleave(tl.interleave(a0 - zc, a8 - zc), tl.interleave(a4 - zc, a12 - zc)),
                          tl.interleave(tl.interleave(a2 - zc, a10 - zc), tl.interleave(a6 - zc, a14 - zc)))
        b = tl.interleave(tl.interleave(tl.interleave(a1 - zc, a9 - zc), tl.interleave(a5 - zc, a13 - zc)),
                          tl.interleave(tl.interleave(a3 - zc, a11 - zc), tl.interleave(a7 - zc, a15 - zc)))
        return tl.interleave(a, b)


@triton.jit
def _x_slots(xt):
    """xt [BLOCK_K, BLOCK_M] -> the rows at slot 0, 1, 2, 3 of every group of 4, [BLOCK_K / 4, BLOCK_M] each."""
    x4 = tl.permute(tl.reshape(xt, [xt.shape[0] // 4, 2, 2, xt.shape[1]]), (0, 3, 1, 2))  # [G, BLOCK_M, 2, 2]
    xa, xb = tl.split(x4)  # slots 0, 2 and 1, 3: [G, BLOCK_M, 2]
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    return x0, x1, x2, x3


@triton.jit
def _mma_kernel(x_ptr, w_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, n_words, n_pos_words, stride_xm, stride_ym, magic,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SP24: tl.constexpr,
                BF16_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, FP32: tl.constexpr):
    # x [M, K], y [M, N] (fp32 and zeroed when SPLIT_K > 1); BLOCK_K divides GROUP. The accumulator
    # is y.T's tile [BLOCK_N, BLOCK_M]. Codes are dequantized in bf16 (BF16_CODES, magic =
    # 0x43004300: 128.0 twice) or fp16 (0x64006400: 1024.0 twice). `magic` is a runtime argument
    # so that it lives in a register: as a constant, ptxas re-creates it before every mask-or
    # (a LOP3 takes one immediate, and the mask is the other), 10% more instructions per weight.
    # SP24: the words hold the K / 2 kept codes of each row (or, BITS == 16, the kept values
    # themselves, no scales) and p_ptr their slots; each tile is four MMAs, one per slot.
    DQ: tl.constexpr = tl.bfloat16 if BF16_CODES else tl.float16
    MAGIC_V: tl.constexpr = 128.0 if BF16_CODES else 1024.0
    CPW: tl.constexpr = 1 if BITS == 16 else 32 // BITS  # stored columns per element of w_ptr
    KW: tl.constexpr = BLOCK_K // 2 if SP24 else BLOCK_K  # stored columns (codes or values) per tile
    # dense codes in `_codes16`'s paired order, x's rows permuted to match: 10% fewer instructions
    # per weight at BLOCK_M <= 32; wider x tiles cost more to permute than pairing saves
    PAIRED: tl.constexpr = not SP24 and BLOCK_M <= 32
    offs_m, offs_n, t_first, t_end = _program_tiles(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for t in range(t_first, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                     mask=m_ok[None, :] & (offs_k[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_M]; tail x = 0
        if FP32:
            xt = xt.to(tl.float32)
        offs_w = k0 // (BLOCK_K // KW) // CPW + tl.arange(0, KW // CPW)
        w_mask = n_ok[:, None] & (offs_w[None, :] < n_words)
        if BITS == 16:  # the kept values of a 2:4 float weight; N * K / 2 may pass 2**31
            q = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * n_words + offs_w[None, :], mask=w_mask,
                        other=0.0).to(xt.dtype)
        else:
            words = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :], mask=w_mask, other=0)
            g_off = (k0 // GROUP) * N + offs_n
            s = tl.load(s_ptr + g_off, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zc = (tl.load(z_ptr + g_off, mask=n_ok, other=0).to(tl.float32) + MAGIC_V).to(DQ)[:, None]
            else:
                zc = tl.full([BLOCK_N, 1], MAGIC_V + (1 << (BITS - 1)), DQ)
            q = _codes16(words, zc, BITS, magic.to(tl.uint32), DQ, PAIRED).to(xt.dtype)  # [BLOCK_N, KW], code - zero
        if SP24:
            offs_p = k0 // 32 + tl.arange(0, KW // 16)
            pw = tl.load(p_ptr + offs_n[:, None] * n_pos_words + offs_p[None, :],
                         mask=n_ok[:, None] & (offs_p[None, :] < n_pos_words), other=0)
            w0, w1, w2, w3 = _sp24_slot_tiles(*_sp24_pairs(q, pw))
            x0, x1, x2, x3 = _x_slots(xt)
            part = tl.dot(w3, x3, tl.dot(w2, x2, tl.dot(w1, x1, tl.dot(w0, x0))))
        elif PAIRED:  # row 2t + h of each word's span <- column t + h * cpw / 2
            xp = tl.permute(tl.reshape(xt, [BLOCK_K // CPW, 2, CPW // 2, BLOCK_M]), (0, 2, 1, 3))
            part = tl.dot(q, tl.reshape(xp, [BLOCK_K, BLOCK_M]))
        else:
            part = tl.dot(q, xt)
        if BITS == 16:
            acc += part
        else:
            acc += part * s[:, None]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]  # M * N may pass 2**31
    y_mask = m_ok[None, :] & n_ok[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
