// Few-row matmuls of 2, 4 and 8-bit integer weights on CPU, the dequantization fused in:
//
//   y[m, n] = sum_k ((code[n, k] - zero[g, n]) * scale[g, n]) * x[m, k],   g = k / span
//
// in fp32. Built and loaded by cuda/cpu_native.py (ctypes); the reference (cuda/layout.py:
// dequantize_words, then a matmul) defines the semantics, this differs by rounding only.
//
// The weight stays in the kernels' words (cuda/layout.py): int32 [N, row_words], word w of a row
// holding columns CPW * w + c (CPW = 32 / BITS codes per word) at bits c * BITS. x is transposed
// once per call into CPW "planes" (plane c of row m: x[m, c], x[m, CPW + c], ...), so that a
// vector of L words meets plane c's L consecutive values: a shift, a mask, a convert and two
// multiply-adds per code, no gather. Each decoded weight carries its group's scale (code * s + b,
// b = -zero * s), so the sums run across group boundaries in a few independent vector sums and are
// reduced once per chunk of x (16 rows at a time with 16-word vectors, narrower ones a row at a
// time). Up to 8 rows of x share each decoded weight.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Whether 16-lane vectors are one register (AVX-512). Elsewhere GCC lowers them through the stack
// (the AVX2 build of the fused matmuls took 1.7-22x the time it takes on 8 lanes), so those take
// NARROW lanes: 8 with AVX's 256-bit registers, else 4.
#ifdef __AVX512F__
constexpr bool WIDE = true;
#else
constexpr bool WIDE = false;
#endif
#ifdef __AVX__
constexpr int NARROW = 8;
#else
constexpr int NARROW = 4;
#endif

template <int L> struct Vec;  // L 32-bit lanes: GCC/Clang vector extensions, any instruction set
template <> struct Vec<4> {
  typedef int32_t i __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef float f __attribute__((vector_size(16)));
};
template <> struct Vec<8> {
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef float f __attribute__((vector_size(32)));
};
template <> struct Vec<16> {
  typedef int32_t i __attribute__((vector_size(64)));
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef float f __attribute__((vector_size(64)));
};

// The sum of a vector's lanes by halves (the rows of the narrower vectors' kernels; 16-lane
// vectors are summed 16 rows at a time, row_sums).
inline float lane_sum(Vec<4>::f v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline float lane_sum(Vec<8>::f v) {
  return lane_sum(Vec<4>::f(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}

// v in every lane (as a float, adding it to a zero vector is an instruction: x + 0 is not x for
// x = -0), or v itself where it is a vector already.
template <class V, class S>
inline V splat(S v) {
  if constexpr (std::is_same_v<S, V>) {
    return v;
  } else {
    typedef uint32_t U __attribute__((vector_size(sizeof(V))));
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return (V)(U{} + bits);  // an integer's + 0 folds away: a broadcast
  }
}

// 16 rows' sums at once: v[r]'s 16 lanes (row r's partial sums) -> lane r of the result, in four
// rounds that each add pairs of vectors' halves (15 adds and 30 shuffles for 16 rows), the same
// sums in the same order as halving one vector at a time, which ended each row with a chain of 12
// dependent operations: smollm2-135m's short rows (576 codes, 4.5 vectors of work) felt it.
inline Vec<16>::f row_sums(Vec<16>::f (&v)[16]) {
  typedef Vec<16>::f vf;
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // [row 2i: 8 partial sums | row 2i + 1: 8]
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // [row 4i: 4 | 4i + 1: 4 | 4i + 2: 4 | 4i + 3: 4]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // [row 8i: 2 | ... | 8i + 7: 2]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// y[0:rows] += lanes 0:rows of v.
inline void add_lanes(float* y, Vec<16>::f v, int64_t rows) {
  if (rows == 16) {
    Vec<16>::f t;
    std::memcpy(&t, y, sizeof(t));
    t += v;
    std::memcpy(y, &t, sizeof(t));
  } else {
    for (int64_t r = 0; r < rows; ++r) y[r] += v[r];
  }
}

// v[r][c] -> v[c][r]: four rounds of interleaving row i with row i + 8, each of which rotates the
// bits of an element's (row, column) index by one.
inline void transpose16(Vec<16>::f (&v)[16]) {
  Vec<16>::f t[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = __builtin_shufflevector(v[i], v[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      t[2 * i + 1] = __builtin_shufflevector(v[i], v[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    std::copy(t, t + 16, v);
  }
}

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// fp16 -> fp32, exact: one instruction where the CPU converts halves (F16C; it was a fifth of the
// dense kernel's time at groups of 64 with fp16 scales), else by the bits.
inline float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) return (sign ? -1.f : 1.f) * float(mant) * (1.f / 16777216.f);  // zero, subnormal: mant * 2**-24
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

enum ScaleKind { FP32 = 0, FP16 = 1, BF16 = 2 };

inline float scale_at(const void* scales, int kind, int64_t i) {
  if (kind == FP32) return static_cast<const float*>(scales)[i];
  const uint16_t h = static_cast<const uint16_t*>(scales)[i];
  return kind == BF16 ? bits_to_float(uint32_t(h) << 16) : half_to_float(h);
}

struct Weight {
  const int32_t* words;   // [N, row_words]
  int64_t n, row_words;
  const void* scales;     // [n_groups, N], fp32 / fp16 / bf16 (`kind`)
  int kind;
  const uint8_t* zeros;   // [n_groups, N] or null: the symmetric zero 2**(BITS - 1)
  int64_t span;           // columns per group (a multiple of CPW; the last group may be shorter)
};

// The 16 values from element i of `kind` (fp32, fp16 or bf16) memory, in fp32 (exact).
inline Vec<16>::f floats16(const void* from, int kind, int64_t i) {
  Vec<16>::f v;
  if (kind == FP32) {
    std::memcpy(&v, static_cast<const float*>(from) + i, sizeof(v));
    return v;
  }
  const uint16_t* h = static_cast<const uint16_t*>(from) + i;
  if (kind == BF16) {
    typedef uint16_t halves __attribute__((vector_size(32)));
    halves raw;
    std::memcpy(&raw, h, sizeof(raw));
    return (Vec<16>::f)(__builtin_convertvector(raw, Vec<16>::u) << 16);
  }
#if defined(__AVX512F__)
  return (Vec<16>::f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8)));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  for (int r = 0; r < 16; ++r) v[r] = half_to_float(h[r]);
  return v;
#endif
}

// The 16 scales from element i of a weight's scales, in fp32 (exact).
inline Vec<16>::f scales16(const Weight& wt, int64_t i) { return floats16(wt.scales, wt.kind, i); }

// The 16 uint8 zero points at z, in fp32.
inline Vec<16>::f zeros16(const uint8_t* z) {
  typedef uint8_t bytes __attribute__((vector_size(16)));
  bytes raw;
  std::memcpy(&raw, z, sizeof(raw));
  return __builtin_convertvector(raw, Vec<16>::f);
}

// The grid of a block of rows [n0, n1) (at most 16) of a weight in fp32: group g's scale s and
// bias b = -s * zero of row n0 + r at s[r * stride + g], b[...] (the decoded weight is code * s +
// b), or in the MANTISSA form, for codes read as the float f = 1 + code / 2**BITS (mantissa_code),
// 2**BITS * s (exact) and -s * (zero + 2**BITS) (one rounding), f * s + b the same weight; for
// every group of the row. Filled once a block (by the thread that walks it): each vector of a row then
// takes its groups' values with a load and a permute, where reading the stored fp16 scales and
// uint8 zero points (one row of N apart) and converting them again, per vector and row of x, was
// as much work as the codes' at groups of 64 words. The stored values lie group by group, 16 rows
// side by side: a full block takes a group's 16 rows as a vector and transposes 16 groups at a
// time (a value at a time, the fill and x's transposition were a fifth of the profiled time of a
// 576 x 576 call at M = 1; an eighth so).
template <int BITS, bool MANTISSA>
struct BlockGrid {
  typedef Vec<16>::i vi;
  typedef Vec<16>::f vf;
  int64_t gw, stride, n0;
  int shift;          // log2(gw) where gw divides 16 (SPAN_GROUPS): a vector's first group is j >> shift
  const float *s, *b;
  vi lane, group_of_lane;  // lane l belongs to the vector's group l / gw
  BlockGrid(const Weight& wt, int64_t gw_, int64_t groups, int64_t n0_, int64_t n1, std::vector<float>& buffer)
      : gw(gw_), stride(groups + 16), n0(n0_), shift(0),
        lane(vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}), group_of_lane(lane / int32_t(gw_)) {
    while ((int64_t(1) << shift) < gw) ++shift;
    // a row's last vector may read up to 16 groups past its first: padded with zeros
    buffer.assign(2 * 16 * stride, 0.f);
    float* sw = buffer.data();
    float* bw = sw + 16 * stride;
    const int64_t rows = n1 - n0;
    if (rows == 16) {  // 16 groups at a time: computed a group (16 rows) a vector, then transposed
      for (int64_t g0 = 0; g0 < groups; g0 += 16) {
        vf sv[16], bv[16];
        for (int64_t h = 0; h < 16; ++h) {
          if (g0 + h >= groups) {
            sv[h] = bv[h] = vf{};
            continue;
          }
          const vf scale = scales16(wt, (g0 + h) * wt.n + n0);
          const vf zero = wt.zeros ? zeros16(wt.zeros + (g0 + h) * wt.n + n0) : splat<vf>(float(1 << (BITS - 1)));
          sv[h] = MANTISSA ? scale * float(1 << BITS) : scale;
          bv[h] = -scale * (MANTISSA ? zero + float(1 << BITS) : zero);
        }
        transpose16(sv);
        transpose16(bv);
        for (int r = 0; r < 16; ++r) {  // g0 + 16 <= stride
          std::memcpy(sw + r * stride + g0, &sv[r], sizeof(vf));
          std::memcpy(bw + r * stride + g0, &bv[r], sizeof(vf));
        }
      }
    } else {  // the weight's last block, fewer rows
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = g * wt.n + n0 + r;
          const float scale = scale_at(wt.scales, wt.kind, i);
          const float zero = wt.zeros ? float(wt.zeros[i]) : float(1 << (BITS - 1));
          sw[r * stride + g] = MANTISSA ? scale * float(1 << BITS) : scale;
          bw[r * stride + g] = -scale * (MANTISSA ? zero + float(1 << BITS) : zero);
        }
      }
    }
    s = sw;
    b = bw;
  }
  void scale(int64_t g, int64_t n, float& sg, float& bg) const {
    sg = s[(n - n0) * stride + g];
    bg = b[(n - n0) * stride + g];
  }
  // Each lane's group's scale and bias for the 16 words at j of row n (gw divides 16, j a multiple
  // of 16); lanes from `live` on (the row's end) get 0 and 0, so that they weigh nothing whatever
  // their codes.
  template <class Live>  // int64_t, or the constant 16 for a whole vector (no mask)
  void scales(int64_t n, int64_t j, Live live, vf& sv, vf& bv) const {
    const int64_t i = (n - n0) * stride + (j >> shift);
#ifdef __AVX512F__
    sv = (vf)_mm512_permutexvar_ps((__m512i)group_of_lane, _mm512_loadu_ps(s + i));
    bv = (vf)_mm512_permutexvar_ps((__m512i)group_of_lane, _mm512_loadu_ps(b + i));
#else
    sv = splat<vf>(s[i]);
    bv = splat<vf>(b[i]);
    for (int32_t h = 1; h < 16 / gw; ++h) {
      const vi in_group = group_of_lane == h;  // all ones in group h's lanes
      sv = (vf)(((vi)sv & ~in_group) | ((vi)splat<vf>(s[i + h]) & in_group));
      bv = (vf)(((vi)bv & ~in_group) | ((vi)splat<vf>(b[i + h]) & in_group));
    }
#endif
    if constexpr (std::is_same_v<Live, int64_t>) {
      const vi alive = lane < int32_t(live);
      sv = (vf)((vi)sv & alive);
      bv = (vf)((vi)bv & alive);
    }
  }
};

// Row n's words [w0, w1) with their groups' scales and biases: add(j, live, s, b) for each vector
// of L words at j (live of them in the row: L but at the row's end under SPAN_GROUPS, or at a
// group's end under PARTIAL), tail(j, s, b) for each word of a group past its last whole vector
// (not under PARTIAL). s and b are one value (a group at a time), or under SPAN_GROUPS each lane
// its group's.
template <int L, bool SPAN_GROUPS, bool PARTIAL, class Grid, class Add, class Tail>
inline void walk_row(const Grid& grid, int64_t n, int64_t w0, int64_t w1, Add add, Tail tail) {
  const std::integral_constant<int64_t, L> whole;
  if constexpr (SPAN_GROUPS) {
    // w0 is a multiple of 16 (the callers' chunks), and so is w1 but at the row's end, where the
    // last vector has fewer live words (smollm2's rows of 576 4-bit codes: 72 words).
    int64_t j = w0;
    typename Vec<L>::f s, b;
    for (; j + L <= w1; j += L) {
      grid.scales(n, j, whole, s, b);
      add(j, whole, s, b);
    }
    if (j < w1) {
      grid.scales(n, j, w1 - j, s, b);
      add(j, w1 - j, s, b);
    }
  } else {
    const int64_t gw = grid.gw;
    for (int64_t g = w0 / gw; g * gw < w1; ++g) {
      const int64_t j1 = std::min(g * gw + gw, w1);
      float s, b;
      grid.scale(g, n, s, b);
      int64_t j = std::max(g * gw, w0);
      for (; j + L <= j1; j += L) add(j, whole, s, b);
      if constexpr (PARTIAL) {
        if (j < j1) add(j, j1 - j, s, b);  // a group's last words, fewer than L (K = 576 in groups of 128)
      } else {
        for (; j < j1; ++j) tail(j, s, b);  // a group shorter than a vector, or its end
      }
    }
  }
}

// The L words at src, of which `live` are read (all where it is the constant L); the others 0.
template <int L, class T, class V, class Live>
inline void load_live(V& v, const T* src, Live live) {
  if constexpr (!std::is_same_v<Live, int64_t>) {  // one load: through an array on the stack, it stalled on the store
    if constexpr (sizeof(T) == 4) {
      std::memcpy(&v, src, sizeof(v));
    } else {  // 2:4 slots of 1 or 2 bytes, widened
      typedef T narrow __attribute__((vector_size(L * sizeof(T))));
      narrow n;
      std::memcpy(&n, src, sizeof(n));
      v = __builtin_convertvector(n, V);
    }
    return;
  }
#ifdef __AVX512F__
  if constexpr (sizeof(T) == 4 && L == 16) {  // one masked load, where a copy of `live` words branched
    v = (V)_mm512_maskz_loadu_epi32(__mmask16((1u << live) - 1), src);
    return;
  }
#endif
  T stored[L] = {};
  if constexpr (!std::is_same_v<Live, int64_t>) std::memcpy(stored, src, sizeof(stored));
  else std::memcpy(stored, src, live * sizeof(T));
  if constexpr (sizeof(T) == 4) {
    std::memcpy(&v, stored, sizeof(v));
  } else {
    int32_t widened[L];
    for (int l = 0; l < L; ++l) widened[l] = stored[l];
    std::memcpy(&v, widened, sizeof(v));
  }
}

// Planes of x a row of x takes (add_words): its CPW planes, and for 2-bit codes the words' sums.
template <int BITS> constexpr int PLANES = 32 / BITS + (BITS == 2);

// Code c of each word (bits c * BITS) as the float 1 + code / 2**BITS: the code moved to the top
// of the mantissa of 1.0 by a shift, a mask and an or (one ternary-logic instruction on AVX-512),
// where a mask and a convert took two. (2:4 codes, picking each code's x by selects, ran slower
// so: 1.2x to 2.3x the time at one row of x.)
template <int BITS, class U>
inline U mantissa_code(U q, int c) {
  constexpr uint32_t FIELD = ((1u << BITS) - 1) << (23 - BITS), ONE = 0x3F800000u;
  const int shift = 23 - BITS - c * BITS;  // a constant once the callers' loops over c unroll
  return ((shift >= 0 ? q << shift : q >> -shift) & FIELD) | ONE;
}

// acc[m] += the CPW codes of the L words at row[j] (`live` of them read) times x, each code read
// as f = 1 + code / 2**BITS (mantissa_code) and decoded as f * s + b (s, b: BlockGrid's MANTISSA
// form; one value, or each lane its group's). For 2-bit codes and one row of x, the
// scale and bias are factored out of the word's sum instead: acc += s * sum_c f_c * x_c + b *
// sum_c x_c, two multiply-adds a word for its 16 codes, the sums of x a plane of their own (0.6x
// to 0.85x the time of decoding each code at 576 x 576 to 4096 x 4096; at 4 and 8 bits, or two
// rows of x, 0.9x to 1.1x the other way, and the factored sums cancel more: rounding errors 3x as
// large). xp: MT rows of PLANES planes of `ps` floats (x's CPW planes, then for 2-bit codes each
// word's sum of x). Of a vector with fewer live words (a group's or the row's end), the other
// lanes' codes and bias weigh nothing. With AVX-512, 4-bit codes whose vector lies in one group
// (ONE_GROUP: groups of 128 through the spanning path; or one scalar s and b: groups of 256 and
// more) take the group's 16 weights as a table, each code's weight a permute of it by the code
// (vpermps reads an index's low 4 bits): a shift and a permute a code, where the mask-or and the
// decoding multiply-add took three, the same weights bit for bit; 4-bit g128 0.68-0.95 of the
// time (A/B, cpu_kernels_ab_g128_table.jsonl).
#ifdef __AVX512F__
// 1 + code / 16 for the 16 4-bit codes: mantissa_code's floats, lane by lane.
const Vec<16>::f FOUR_BIT_CODES = {1.f, 1.0625f, 1.125f, 1.1875f, 1.25f, 1.3125f, 1.375f, 1.4375f,
                                    1.5f, 1.5625f, 1.625f, 1.6875f, 1.75f, 1.8125f, 1.875f, 1.9375f};
#endif

template <int BITS, int MT, int P, int L, bool ONE_GROUP, class S, class Live>
inline void add_words(const int32_t* row, int64_t j, Live live, S s, S b_in, const float* xp, int64_t ps,
                      typename Vec<L>::f (&acc)[MT][P]) {
  typedef typename Vec<L>::u vu;
  typedef typename Vec<L>::f vf;
  constexpr int CPW = 32 / BITS;
  constexpr bool FACTORED = BITS == 2 && MT == 1;
  vu q, alive = ~vu{};
  if constexpr (std::is_same_v<Live, int64_t>) {
    for (int l = 0; l < L; ++l) alive[l] = l < live ? ~0u : 0u;
  }
  load_live<L>(q, reinterpret_cast<const uint32_t*>(row) + j, live);
  vf b = splat<vf>(b_in);
  if constexpr (std::is_same_v<Live, int64_t>) b = (vf)((vu)b & alive);
  vf t[FACTORED ? MT : 1][P] = {};
#ifdef __AVX512F__
  if constexpr (BITS == 4 && L == 16 && (ONE_GROUP || std::is_same_v<S, float>)) {
    // The vector lies in one group: the group's 16 weights a table (f * s + b for each code's f;
    // under SPAN_GROUPS each lane holds the group's s and b, of which lane 0 always lives).
    float s0, b0;
    if constexpr (std::is_same_v<S, float>) s0 = s, b0 = b_in;
    else s0 = s[0], b0 = b_in[0];
    const vf table = splat<vf>(s0) * FOUR_BIT_CODES + splat<vf>(b0);
    for (int c = 0; c < CPW; ++c) {
      const vu index = c ? q >> (4 * c) : q;  // vpermps reads an index's low 4 bits: code c
      vf w = (vf)_mm512_permutexvar_ps((__m512i)index, (__m512)table);
      if constexpr (std::is_same_v<Live, int64_t>) w = (vf)((vu)w & alive);
      for (int m = 0; m < MT; ++m) {
        vf xv;
        std::memcpy(&xv, xp + (m * PLANES<BITS> + c) * ps + j, sizeof(vf));
        acc[m][c % P] += w * xv;
      }
    }
    return;
  }
#endif
  for (int c = 0; c < CPW; ++c) {
    vf f = (vf)mantissa_code<BITS>(q, c);
    if constexpr (std::is_same_v<Live, int64_t>) f = (vf)((vu)f & alive);  // 1.0 where a code 0 was read
    if constexpr (!FACTORED) f = f * s + b;  // the weights
    for (int m = 0; m < MT; ++m) {
      vf xv;
      std::memcpy(&xv, xp + (m * PLANES<BITS> + c) * ps + j, sizeof(vf));
      if constexpr (FACTORED) t[m][c % P] += f * xv;
      else acc[m][c % P] += f * xv;
    }
  }
  if constexpr (FACTORED) {
    for (int m = 0; m < MT; ++m) {
      vf xs;
      std::memcpy(&xs, xp + (m * PLANES<BITS> + CPW) * ps + j, sizeof(vf));
      acc[m][0] += b * xs;
      for (int p = 0; p < P; ++p) acc[m][p] += t[m][p] * s;
    }
  }
}

// Each row asks for the words of the row AHEAD rows on (the same chunk) before it reads its own.
// A decoded token's layers find their weights in L3 or memory, not where the last call left
// them, and a short row's few cache lines give the hardware's prefetchers little to follow: on
// smollm2-135m's int4 layers (rows of 288 bytes), the 210 layers called in turn took 8.3 against
// 10.9 ms (2 threads; 13.1 against 18.0 with one), and a decoded token of the demo's model 24.0
// against 26.5 ms (benchmarks/cpu_kernels_ab.py --decode). 4, 8 and 16 rows ahead timed the same.
constexpr int64_t AHEAD = 8;

// Asks the caches for the bytes [from, from + bytes), a 64-byte line at a time, where they are at
// most a kilobyte: longer rows' words have streams the hardware follows (8-bit codes at K = 4096
// took 1.3x the time with them asked for). Where a kernel's work per byte is small, asking costs
// more than it gains: 2:4 fp32 values (sp24_float_rows) decoded smollm2-135m 7% slower so, and
// take none. On x86 an asm statement: GCC deletes a loop of nothing but __builtin_prefetch once it
// can bound it.
inline void prefetch(const void* from, int64_t bytes) {
  if (bytes > 1024) return;
  const char* p = static_cast<const char*>(from);
  for (int64_t b = 0; b < bytes; b += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(p[b]));
#else
    __builtin_prefetch(p + b);
#endif
  }
}

// y[m, n0:n1] += the sums of done[m][0:n1 - n0] (a block's rows), for each of MT rows of x.
template <int MT>
inline void add_block_sums(Vec<16>::f (&done)[MT][16], float* y, int64_t n, int64_t n0, int64_t n1) {
  for (int m = 0; m < MT; ++m) {
    for (int64_t r = n1 - n0; r < 16; ++r) done[m][r] = Vec<16>::f{};  // the weight's last block
    add_lanes(y + m * n + n0, row_sums(done[m]), n1 - n0);
  }
}

// y[0:MT, n0:n1] += the sums over words [w0, w1) of each row (a chunk of x that stays in cache).
// xp: MT rows of PLANES planes of `ps` floats; y: MT rows of N. Where groups are 1, 2, 4 or 8 words
// (4-bit codes in groups of 8 to 64, 2-bit of 16 to 128, 8-bit of 4 to 32; SPAN_GROUPS), each
// 16-word vector spans 16 / gw groups, its lanes carrying their group's scale and bias, the last
// one of a row masked where the row is not a multiple of 16 words: a group at a time, such groups
// took 8-word vectors and the group loop's overhead every 8 words (1.6x the time of groups of 128
// at 4096 x 4096, M = 1).
template <int BITS, int MT, int L, bool SPAN_GROUPS, bool ONE_GROUP>
__attribute__((noinline))  // inlined into the OpenMP loop, it made the build of AVX2 code 2.3x as long
void rows(const Weight& wt, const BlockGrid<BITS, true>& grid, const float* xp, int64_t ps, float* y, int64_t n0,
          int64_t n1, int64_t w0, int64_t w1) {
  typedef typename Vec<L>::f vf;
  constexpr int P = MT >= 4 ? 1 : 4 / MT;  // independent vector sums per row of x: hide the add latency
  constexpr int CPW = 32 / BITS;
  Vec<16>::f done[MT][16];  // 16-word vectors: each row's sums, reduced for the block at once (row_sums)
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* row = wt.words + n * wt.row_words;
    if (n + AHEAD < wt.n) prefetch(row + AHEAD * wt.row_words + w0, (w1 - w0) * 4);
    vf acc[MT][P];
    float tail[MT] = {};
    for (int m = 0; m < MT; ++m)
      for (int p = 0; p < P; ++p) acc[m][p] = vf{};
    // A group's or the row's last words fewer than a vector: masked under 16-word vectors (K = 576
    // in groups of 128), a word at a time under the narrower ones (uncommon group sizes, whose
    // masked variants would double the build's time where a 16-word vector takes two instructions)
    walk_row<L, SPAN_GROUPS, L == 16>(
        grid, n, w0, w1,
        [&](int64_t j, auto live, auto s, auto b) {
          add_words<BITS, MT, P, L, ONE_GROUP>(row, j, live, s, b, xp, ps, acc);
        },
        [&](int64_t j, float s, float b) {
          for (int c = 0; c < CPW; ++c) {
            const float w = bits_to_float(mantissa_code<BITS>(uint32_t(row[j]), c)) * s + b;
            for (int m = 0; m < MT; ++m) tail[m] += w * xp[(m * PLANES<BITS> + c) * ps + j];
          }
        });
    for (int m = 0; m < MT; ++m) {
      vf t = acc[m][0];
      for (int p = 1; p < P; ++p) t += acc[m][p];
      if constexpr (L == 16) done[m][n - n0] = t;  // no tail: whole vectors or masked ones
      else y[m * wt.n + n] += tail[m] + lane_sum(t);
    }
  }
  if constexpr (L == 16) add_block_sums(done, y, wt.n, n0, n1);
}

// f(n0, n1, grid) for each block of 16 rows [n0, n1) of the weight (the last one shorter), the
// blocks split across threads (OpenMP), each with its grid of `groups` groups of gw words a row
// (BlockGrid; each thread fills its own buffer).
template <int BITS, bool MANTISSA, class F>
void for_each_block(const Weight& wt, int64_t gw, int64_t groups, int threads, F f) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buffer;  // the thread's BlockGrid
#pragma omp for schedule(static)
    for (int64_t block = 0; block < (wt.n + 15) / 16; ++block) {
      const int64_t n0 = block * 16, n1 = std::min(n0 + 16, wt.n);
      f(n0, n1, BlockGrid<BITS, MANTISSA>(wt, gw, groups, n0, n1, buffer));
    }
  }
}

// Rows of x to take at once out of `left`: the largest power of two up to `most`, so that a few
// variants serve every M (each variant costs compile time at first use).
inline int64_t rows_at_once(int64_t left, int64_t most) {
  while (most > left) most /= 2;
  return most;
}

template <int BITS, int L, bool SPAN_GROUPS = false, bool ONE_GROUP = false>
void rows_of(int64_t mt, const Weight& wt, const BlockGrid<BITS, true>& grid, const float* xp, int64_t ps, float* y,
             int64_t n0, int64_t n1, int64_t w0, int64_t w1) {
  switch (mt) {  // the rows of x as a constant (1, 2, 4 or 8): their sums stay in registers
    case 1: return rows<BITS, 1, L, SPAN_GROUPS, ONE_GROUP>(wt, grid, xp, ps, y, n0, n1, w0, w1);
    case 2: return rows<BITS, 2, L, SPAN_GROUPS, ONE_GROUP>(wt, grid, xp, ps, y, n0, n1, w0, w1);
    case 4: return rows<BITS, 4, L, SPAN_GROUPS, ONE_GROUP>(wt, grid, xp, ps, y, n0, n1, w0, w1);
    default: return rows<BITS, 8, L, SPAN_GROUPS, ONE_GROUP>(wt, grid, xp, ps, y, n0, n1, w0, w1);
  }
}

template <int BITS>
void matmul(const float* x, int64_t m_rows, int64_t k, const Weight& wt, float* y, int threads) {
  constexpr int CPW = 32 / BITS;
  const int64_t kw = k / CPW, gw = wt.span / CPW;
  // Planes padded by 16 floats: power-of-two strides would put the planes' chunks in the same
  // cache sets (4.7x slower at K = 4096 and 8 rows).
  const int64_t ps = kw + 16;
  // xp[m][c][w] = x[m, CPW * w + c] (c < CPW); 2-bit codes: xp[m][CPW][w] = the sum of those CPW
  constexpr int PL = PLANES<BITS>;
  std::vector<float> xp(m_rows * PL * ps);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int c = 0; c < CPW; ++c)
      for (int64_t w = 0; w < kw; ++w) xp[(m * PL + c) * ps + w] = x[m * k + CPW * w + c];
    if constexpr (PL > CPW) {
      float* sums = xp.data() + (m * PL + CPW) * ps;
      for (int c = 0; c < CPW; ++c)
        for (int64_t w = 0; w < kw; ++w) sums[w] += x[m * k + CPW * w + c];
    }
  }
  // Words per chunk: 8 rows of x's planes fill 16 KB of L1 cache; a multiple of 16 (SPAN_GROUPS).
  const int64_t chunk = std::max<int64_t>(16, 4096 / (std::min<int64_t>(m_rows, 8) * PL) / 16 * 16);
  std::fill(y, y + m_rows * wt.n, 0.f);
  for_each_block<BITS, true>(wt, gw, (kw + gw - 1) / gw, threads,
                             [&](int64_t n0, int64_t n1, const BlockGrid<BITS, true>& grid) {
    for (int64_t m0 = 0, mt; m0 < m_rows; m0 += mt) {
      mt = rows_at_once(m_rows - m0, 8);
      const float* xm = xp.data() + m0 * PL * ps;
      float* ym = y + m0 * wt.n;
      for (int64_t w0 = 0; w0 < kw; w0 += chunk) {
        const int64_t w1 = std::min(w0 + chunk, kw);
        if constexpr (!WIDE) {
          if (gw % 8 == 0) rows_of<BITS, NARROW>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
          else rows_of<BITS, 4>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
        } else if (BITS == 4 && gw == 16) {  // 4-bit g128: a vector a group, its groups' values permuted in
          rows_of<BITS, 16, true, BITS == 4>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
        } else if (gw % 16 == 0) rows_of<BITS, 16>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
        else if (16 % gw == 0) rows_of<BITS, 16, true>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
        else if (gw % 8 == 0) rows_of<BITS, 8>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
        else rows_of<BITS, 4>(mt, wt, grid, xm, ps, ym, n0, n1, w0, w1);
      }
    }
  });
}

// 2:4 weights (cuda/layout.py): int32 words of the K / 2 kept codes (kept code t at bits
// (t % CPW) * BITS of word t / CPW) and their slots, 2 bits each (kept code t's slot in its group
// of 4 columns, 4 * (t / 2) .. + 3, at bits 2 * (t % 16) of position word t / 16). The slots of
// code word w's CPW codes are element w of the positions read as 2 * CPW-bit integers (`SlotsOf`,
// little-endian).
// Without AVX-512, or where groups are shorter than 32 columns (sp24_lanes_matmul serves the
// rest): lanes are code words; x is transposed into 2 * CPW planes, plane (h, r) holding the
// column r of group of 4 number h of each code word, and each code's x is picked from its
// group's four by its slot with selects, which vectorize where a gather would not.
template <int BITS> struct SlotsOf;
template <> struct SlotsOf<2> { typedef uint32_t t; };
template <> struct SlotsOf<4> { typedef uint16_t t; };
template <> struct SlotsOf<8> { typedef uint8_t t; };

// acc[m] += the CPW kept codes of the L code words at row[j] (`live` of them read), each decoded
// as code * s + b (one value, or each lane its group's) and multiplied by the x at its slot.
template <int BITS, int MT, int P, int L, class S, class Live>
inline void add_sp24_words(const int32_t* row, const typename SlotsOf<BITS>::t* slot_row, int64_t j, Live live,
                           S s, S b, const float* xp, int64_t ps, typename Vec<L>::f (&acc)[MT][P]) {
  typedef typename Vec<L>::i vi;
  typedef typename Vec<L>::f vf;
  constexpr int CPW = 32 / BITS;
  constexpr int32_t MASK = (1 << BITS) - 1;
  vi q, sl;
  load_live<L>(q, row + j, live);
  load_live<L>(sl, slot_row + j, live);  // read as 1, 2 or 4-byte integers: the words are int32
  for (int c = 0; c < CPW; ++c) {
    const vf w = __builtin_convertvector((q >> (c * BITS)) & MASK, vf) * s + b;
    const vi slot = (sl >> (2 * c)) & 3;
    for (int m = 0; m < MT; ++m) {
      const float* plane = xp + (m * 2 * CPW + 4 * (c / 2)) * ps + j;  // planes (c / 2, 0..3)
      vf x0, x1, x2, x3;
      std::memcpy(&x0, plane, sizeof(vf));
      std::memcpy(&x1, plane + ps, sizeof(vf));
      std::memcpy(&x2, plane + 2 * ps, sizeof(vf));
      std::memcpy(&x3, plane + 3 * ps, sizeof(vf));
      acc[m][c % P] += w * (slot == 0 ? x0 : slot == 1 ? x1 : slot == 2 ? x2 : x3);
    }
  }
}

// As `rows`, SPAN_GROUPS included (4-bit kept codes in groups of 128 columns: 8 code words).
template <int BITS, int MT, int L, bool SPAN_GROUPS>
__attribute__((noinline))  // as rows
void sp24_rows(const Weight& wt, const BlockGrid<BITS, false>& grid, const void* positions, int64_t pos_row_bytes,
               const float* xp, int64_t ps, float* y, int64_t n0, int64_t n1, int64_t w0, int64_t w1) {
  typedef typename Vec<L>::f vf;
  typedef typename SlotsOf<BITS>::t slots_t;
  constexpr int CPW = 32 / BITS;
  constexpr int32_t MASK = (1 << BITS) - 1;
  constexpr int P = MT >= 2 ? 1 : 2;      // independent vector sums per row of x
  Vec<16>::f done[MT][16];  // as rows
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* row = wt.words + n * wt.row_words;
    const slots_t* slot_row = reinterpret_cast<const slots_t*>(static_cast<const uint8_t*>(positions) + n * pos_row_bytes);
    if (n + AHEAD < wt.n) {  // as rows: the codes and their slots
      prefetch(row + AHEAD * wt.row_words + w0, (w1 - w0) * 4);
      prefetch(reinterpret_cast<const uint8_t*>(slot_row + w0) + AHEAD * pos_row_bytes, (w1 - w0) * sizeof(slots_t));
    }
    vf acc[MT][P];
    float tail[MT];
    for (int m = 0; m < MT; ++m) {
      tail[m] = 0.f;
      for (int p = 0; p < P; ++p) acc[m][p] = vf{};
    }
    walk_row<L, SPAN_GROUPS, false>(
        grid, n, w0, w1,
        [&](int64_t j, auto live, auto s, auto b) {
          add_sp24_words<BITS, MT, P, L>(row, slot_row, j, live, s, b, xp, ps, acc);
        },
        [&](int64_t j, float s, float b) {
          slots_t stored;
          std::memcpy(&stored, slot_row + j, sizeof(stored));
          for (int c = 0; c < CPW; ++c) {
            const float w = float((row[j] >> (c * BITS)) & MASK) * s + b;
            const int slot = (stored >> (2 * c)) & 3;
            for (int m = 0; m < MT; ++m) tail[m] += w * xp[(m * 2 * CPW + 4 * (c / 2) + slot) * ps + j];
          }
        });
    for (int m = 0; m < MT; ++m) {
      vf t = acc[m][0];
      for (int p = 1; p < P; ++p) t += acc[m][p];
      if constexpr (L == 16) {
        t[0] += tail[m];  // a group's words past its last whole vector
        done[m][n - n0] = t;
      } else {
        y[m * wt.n + n] += tail[m] + lane_sum(t);
      }
    }
  }
  if constexpr (L == 16) add_block_sums(done, y, wt.n, n0, n1);
}

template <int BITS, int L, bool SPAN_GROUPS = false>
void sp24_rows_of(int64_t mt, const Weight& wt, const BlockGrid<BITS, false>& grid, const void* positions,
                  int64_t pos_row_bytes, const float* xp, int64_t ps, float* y, int64_t n0, int64_t n1, int64_t w0,
                  int64_t w1) {
  switch (mt) {
    case 1: return sp24_rows<BITS, 1, L, SPAN_GROUPS>(wt, grid, positions, pos_row_bytes, xp, ps, y, n0, n1, w0, w1);
    case 2: return sp24_rows<BITS, 2, L, SPAN_GROUPS>(wt, grid, positions, pos_row_bytes, xp, ps, y, n0, n1, w0, w1);
    default: return sp24_rows<BITS, 4, L, SPAN_GROUPS>(wt, grid, positions, pos_row_bytes, xp, ps, y, n0, n1, w0, w1);
  }
}

#ifdef __AVX512F__
// With AVX-512, where each group holds whole tiles of 16 kept codes (span a multiple of 32
// columns: 4-bit g64 and g128, the common formats), lanes are kept codes as for float values
// (sp24_float_rows): the 16 codes from kept value t (a multiple of 16) decoded where they lie,
// each one's x a two-register permute of the 32 columns of x from 2 * t by 4 * (value / 2) +
// slot, x as it lies. A 4 or 2-bit code's weight is a permute of its group's 16 weights by the
// code (vpermps reads an index's low 4 bits; 2-bit tables repeat their 4), an 8-bit code's a
// convert and a multiply-add. 4-bit codes come as their two words broadcast, lane 2i holding
// value i and lane 2i + 1 value 8 + i (a shift each), and their slots and x are taken in that
// order. The code words' lanes against x's 2 * CPW planes took three selects per code and row of x.
template <int BITS, int MT>
__attribute__((noinline))  // as rows
void sp24_lanes_rows(const Weight& wt, const BlockGrid<BITS, false>& grid, const int32_t* positions, int64_t pos_row,
                     const float* x, int64_t stride, float* y, int64_t n0, int64_t n1, int64_t t0, int64_t t1) {
  typedef Vec<16>::i vi;
  typedef Vec<16>::f vf;
  constexpr int CPW = 32 / BITS, P = MT >= 2 ? 1 : 2;  // P: independent sums per row of x
  constexpr int32_t MASK = (1 << BITS) - 1;
  const int64_t per_group = wt.span / 2;  // kept codes a group: a multiple of 16
  vi value, code_shift;                   // the kept value (of 16) in lane l, and its code's shift
  vf codes;                               // the codes a table holds, lane by lane
  for (int l = 0; l < 16; ++l) {
    value[l] = BITS == 4 ? l / 2 + 8 * (l % 2) : l;
    code_shift[l] = BITS == 4 ? 4 * (l / 2) : BITS == 2 ? 2 * l : 0;
    codes[l] = float(l & MASK);
  }
  const vi slot_shift = 2 * value, group_of_value = 4 * (value / 2);
  Vec<16>::f done[MT][16];  // as rows
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(wt.words + n * wt.row_words);
    const int32_t* pos = positions + n * pos_row;
    if (n + AHEAD < wt.n) {  // as rows: the codes and their slots
      prefetch(row + AHEAD * wt.row_words * 4 + t0 * BITS / 8, (t1 - t0) * BITS / 8);
      prefetch(pos + AHEAD * pos_row + t0 / 16, (t1 - t0) / 4);
    }
    vf acc[MT][P];
    float tail[MT];
    for (int m = 0; m < MT; ++m) {
      tail[m] = 0.f;
      for (int p = 0; p < P; ++p) acc[m][p] = vf{};
    }
    for (int64_t g = t0 / per_group; g * per_group < t1; ++g) {
      const int64_t g1 = std::min(g * per_group + per_group, t1);
      float s, b;
      grid.scale(g, n, s, b);
      const vf table = splat<vf>(s) * codes + splat<vf>(b);  // each code's weight, as the FMA below gives it
      // acc[m][p] += the 16 codes from kept value t (all in group g) times their x
      auto sixteen = [&](int64_t t, int p) {
        vf w;
        if constexpr (BITS == 8) {
          w = (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + t))));
          w = w * s + b;
        } else {
          vi q;
          if constexpr (BITS == 4) {
            int64_t pair;
            std::memcpy(&pair, row + t / 2, 8);
            q = (vi)_mm512_set1_epi64(pair);
          } else {
            int32_t word;
            std::memcpy(&word, row + t / 4, 4);
            q = vi{} + word;
          }
          w = (vf)_mm512_permutexvar_ps((__m512i)(q >> code_shift), (__m512)table);
        }
        const vi index = (((vi{} + pos[t / 16]) >> slot_shift) & 3) | group_of_value;
        for (int m = 0; m < MT; ++m) {
          const float* xs = x + m * stride + 2 * t;
          acc[m][p] += w * (vf)_mm512_permutex2var_ps(_mm512_loadu_ps(xs), (__m512i)index, _mm512_loadu_ps(xs + 16));
        }
      };
      int64_t t = std::max(g * per_group, t0);
      for (; t + 32 <= g1; t += 32) {
        sixteen(t, 0);
        sixteen(t + 16, P - 1);
      }
      if (t + 16 <= g1) sixteen(t, 0), t += 16;
      for (; t < g1; ++t) {  // the row's last kept codes, fewer than 16
        const uint32_t word = uint32_t(wt.words[n * wt.row_words + t / CPW]);
        const float w = float((word >> (t % CPW * BITS)) & MASK) * s + b;
        const int slot = (pos[t / 16] >> (2 * (t % 16))) & 3;
        for (int m = 0; m < MT; ++m) tail[m] += w * x[m * stride + 4 * (t / 2) + slot];
      }
    }
    for (int m = 0; m < MT; ++m) {
      vf sum = acc[m][0];
      if constexpr (P > 1) sum += acc[m][1];
      sum[0] += tail[m];
      done[m][n - n0] = sum;
    }
  }
  add_block_sums(done, y, wt.n, n0, n1);
}

template <int BITS>
void sp24_lanes_matmul(const float* x, int64_t m_rows, int64_t k, const Weight& wt, const int32_t* positions,
                       int64_t pos_row, float* y, int threads) {
  constexpr int CPW = 32 / BITS;
  const int64_t kept = k / 2, gw = wt.span / 2 / CPW;  // kept codes a row, code words a group
  // Up to 8 rows of x at a time (each code decoded once for them); kept codes per chunk: those
  // rows' x (2 columns a code) fill 8 KB of L1 cache (a multiple of 16).
  const int64_t chunk = 1024 / std::min<int64_t>(m_rows, 8) / 16 * 16;
  std::fill(y, y + m_rows * wt.n, 0.f);
  for_each_block<BITS, false>(wt, gw, (kept / CPW + gw - 1) / gw, threads,
                              [&](int64_t n0, int64_t n1, const BlockGrid<BITS, false>& grid) {
    for (int64_t m0 = 0, mt; m0 < m_rows; m0 += mt) {
      mt = rows_at_once(m_rows - m0, 8);
      const float* xm = x + m0 * k;
      float* ym = y + m0 * wt.n;
      for (int64_t t0 = 0; t0 < kept; t0 += chunk) {
        const int64_t t1 = std::min(t0 + chunk, kept);
        if (mt == 1) sp24_lanes_rows<BITS, 1>(wt, grid, positions, pos_row, xm, k, ym, n0, n1, t0, t1);
        else if (mt == 2) sp24_lanes_rows<BITS, 2>(wt, grid, positions, pos_row, xm, k, ym, n0, n1, t0, t1);
        else if (mt == 4) sp24_lanes_rows<BITS, 4>(wt, grid, positions, pos_row, xm, k, ym, n0, n1, t0, t1);
        else sp24_lanes_rows<BITS, 8>(wt, grid, positions, pos_row, xm, k, ym, n0, n1, t0, t1);
      }
    }
  });
}
#endif

template <int BITS>
void sp24_matmul(const float* x, int64_t m_rows, int64_t k, const Weight& wt, const void* positions,
                 int64_t pos_row_bytes, float* y, int threads) {
#ifdef __AVX512F__
  if (wt.span % 32 == 0)
    return sp24_lanes_matmul<BITS>(x, m_rows, k, wt, static_cast<const int32_t*>(positions), pos_row_bytes / 4, y,
                                   threads);
#endif
  constexpr int CPW = 32 / BITS;
  const int64_t kw = k / 2 / CPW, gw = wt.span / 2 / CPW;  // code words per row and per group
  const int64_t ps = kw + 16;  // padded, as for dense weights
  std::vector<float> xp(m_rows * 2 * CPW * ps);  // xp[m][h][r][w] = x[m, 2 * CPW * w + 4 * h + r]
  for (int64_t m = 0; m < m_rows; ++m)
    for (int hr = 0; hr < 2 * CPW; ++hr)
      for (int64_t w = 0; w < kw; ++w) xp[(m * 2 * CPW + hr) * ps + w] = x[m * k + 2 * CPW * w + hr];
  // Code words per chunk: 4 rows of x's planes fill 16 KB of L1 cache; a multiple of 16 (SPAN_GROUPS).
  const int64_t chunk = std::max<int64_t>(16, 4096 / (std::min<int64_t>(m_rows, 4) * 2 * CPW) / 16 * 16);
  std::fill(y, y + m_rows * wt.n, 0.f);
  for_each_block<BITS, false>(wt, gw, (kw + gw - 1) / gw, threads,
                              [&](int64_t n0, int64_t n1, const BlockGrid<BITS, false>& grid) {
    for (int64_t m0 = 0, mt; m0 < m_rows; m0 += mt) {  // up to 4 rows of x at a time: each takes 4 planes per code
      mt = rows_at_once(m_rows - m0, 4);
      const float* xm = xp.data() + m0 * 2 * CPW * ps;
      float* ym = y + m0 * wt.n;
      for (int64_t w0 = 0; w0 < kw; w0 += chunk) {
        const int64_t w1 = std::min(w0 + chunk, kw);
        if constexpr (!WIDE) {
          if (gw % 8 == 0) sp24_rows_of<BITS, NARROW>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
          else sp24_rows_of<BITS, 4>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
        } else if (gw % 16 == 0) {
          sp24_rows_of<BITS, 16>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
        } else if (16 % gw == 0) {
          sp24_rows_of<BITS, 16, true>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
        } else if (gw % 8 == 0) {
          sp24_rows_of<BITS, 8>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
        } else {
          sp24_rows_of<BITS, 4>(mt, wt, grid, positions, pos_row_bytes, xm, ps, ym, n0, n1, w0, w1);
        }
      }
    }
  });
}

// A row's sums zeroed: MT vector sums and their scalar tails.
template <class V, int MT>
inline void clear_sums(V (&acc)[MT], float (&tail)[MT]) {
  for (int m = 0; m < MT; ++m) {
    acc[m] = V{};
    tail[m] = 0.f;
  }
}

// 2:4 weights of float values (SparseLinear): values [N, K / 2] in fp32, fp16 or bf16 (`kind`, as
// scales), kept value t's slot as for codes above; lanes are kept values t, t + 1, ...
//   sp24_float_rows<MT>(..., x, stride, ...): y[0:MT, n0:n1] += the sums over kept values [t0, t1)
// of each row (t0 a multiple of 16), x's MT rows `stride` floats apart.
#ifdef __AVX512F__
// With AVX-512, x as it lies (stride = K): the 16 kept values from t lie in the 32 columns from
// 2 * t, value l in group l / 2, so each value's x is lane 4 * (l / 2) + slot of those two
// vectors, one two-register permute (vpermt2ps) a vector and row of x, where x transposed into
// planes took four loads and three selects (and the transposition).
template <int MT>
__attribute__((noinline))  // as rows
void sp24_float_rows(const void* values, int kind, int64_t value_row, const int32_t* positions, int64_t pos_row,
                     int64_t n_all, const float* x, int64_t stride, float* y, int64_t n0, int64_t n1, int64_t t0,
                     int64_t t1) {
  typedef Vec<16>::i vi;
  typedef Vec<16>::f vf;
  const vi shifts = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi group_of_value = {0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28};  // 4 * (l / 2)
  Vec<16>::f done[MT][16];  // as rows
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* pos = positions + n * pos_row;
    vf acc[MT];
    float tail[MT];
    clear_sums(acc, tail);
    int64_t t = t0;
    for (; t + 16 <= t1; t += 16) {  // 16 values: one position word
      const vf v = floats16(values, kind, n * value_row + t);
      const vi index = (((vi{} + pos[t / 16]) >> shifts) & 3) | group_of_value;
      for (int m = 0; m < MT; ++m) {
        const float* xs = x + m * stride + 2 * t;
        acc[m] += v * (vf)_mm512_permutex2var_ps(_mm512_loadu_ps(xs), (__m512i)index, _mm512_loadu_ps(xs + 16));
      }
    }
    for (; t < t1; ++t) {  // the row's last kept values, fewer than 16
      const float v = scale_at(values, kind, n * value_row + t);
      const int slot = (pos[t / 16] >> (2 * (t % 16))) & 3;
      for (int m = 0; m < MT; ++m) tail[m] += v * x[m * stride + 4 * (t / 2) + slot];
    }
    for (int m = 0; m < MT; ++m) {
      acc[m][0] += tail[m];
      done[m][n - n0] = acc[m];
    }
  }
  add_block_sums(done, y, n_all, n0, n1);
}
#else
// Elsewhere NARROW kept values a vector (half or a quarter of a position word: its slots shifted
// by the part's position) against x transposed into 4 planes (stride = 4 planes), plane r holding
// column r of each kept value's group of 4 (x[m, 4 * (t / 2) + r]), each value's x picked by its
// slot with selects.
template <int MT>
void sp24_float_rows(const void* values, int kind, int64_t value_row, const int32_t* positions, int64_t pos_row,
                     int64_t n_all, const float* xp, int64_t stride, float* y, int64_t n0, int64_t n1, int64_t t0,
                     int64_t t1) {
  constexpr int L = NARROW;
  typedef typename Vec<L>::i vi;
  typedef typename Vec<L>::f vf;
  const int64_t ps = stride / 4;
  vi shifts;
  for (int l = 0; l < L; ++l) shifts[l] = 2 * l;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* pos = positions + n * pos_row;
    vf acc[MT];
    float tail[MT];
    clear_sums(acc, tail);
    int64_t t = t0;
    for (; t + L <= t1; t += L) {  // L values lie in one position word
      vf v;
      if (kind == FP32) {
        std::memcpy(&v, static_cast<const float*>(values) + n * value_row + t, sizeof(v));
      } else {
        for (int l = 0; l < L; ++l) v[l] = scale_at(values, kind, n * value_row + t + l);
      }
      const vi slot = ((vi{} + (pos[t / 16] >> (2 * (t % 16)))) >> shifts) & 3;
      for (int m = 0; m < MT; ++m) {
        const float* plane = xp + m * stride + t;
        vf x0, x1, x2, x3;
        std::memcpy(&x0, plane, sizeof(vf));
        std::memcpy(&x1, plane + ps, sizeof(vf));
        std::memcpy(&x2, plane + 2 * ps, sizeof(vf));
        std::memcpy(&x3, plane + 3 * ps, sizeof(vf));
        acc[m] += v * (slot == 0 ? x0 : slot == 1 ? x1 : slot == 2 ? x2 : x3);
      }
    }
    for (; t < t1; ++t) {  // the row's last kept values, fewer than L
      const float v = scale_at(values, kind, n * value_row + t);
      const int slot = (pos[t / 16] >> (2 * (t % 16))) & 3;
      for (int m = 0; m < MT; ++m) tail[m] += v * xp[m * stride + slot * ps + t];
    }
    for (int m = 0; m < MT; ++m) y[m * n_all + n] += tail[m] + lane_sum(acc[m]);
  }
}
#endif

// f(std::integral_constant<int, V>()) for V = 0 .. N - 1: a loop whose index is a constant in
// each step (shuffle indices must be).
template <class F, size_t... V>
inline void for_each_constant(F f, std::index_sequence<V...>) {
  (f(std::integral_constant<int, int(V)>()), ...);
}

// The 16 lanes of vector V of a dequantized row chunk: lane l reads word V * 16 / CPW + l / CPW of
// the chunk's 16 words q (its code l % CPW).
template <int CPW, int V, size_t... L>
inline Vec<16>::u words_of_vector(Vec<16>::u q, std::index_sequence<L...>) {
  return __builtin_shufflevector(q, q, (V * (16 / CPW) + int(L) / CPW)...);
}

// Dequantization, for calls with more rows of x than the fused matmuls serve: the weight fp32
// [N, K] that PyTorch's dense matmul then takes. Each value is (code - zero) * scale as the
// reference computes it (cuda/layout.py: _dequantize_codes): the difference of two small integers
// is exact in fp32, and a single rounded product follows (nothing to fuse into a multiply-add), so
// the bits match the reference's. Rows of the weight are split across threads. A row is taken 16
// words at a time, each of its CPW output vectors of 16 values a shuffle of the words, a shift by
// each lane's code position, a mask and a convert (a code at a time, it was 7% of smollm2-135m's
// prefill), where a vector's words share a group (groups of at least 16 / CPW words); the row's
// last words and narrower groups a code at a time, and every word without AVX-512 (!WIDE: there
// the 16-lane vectors took 2x the time of a code at a time, on AVX2).
template <int BITS>
void dequantize(const Weight& wt, int64_t k, float* w, int threads) {
  typedef Vec<16>::u vu;
  typedef Vec<16>::f vf;
  constexpr int CPW = 32 / BITS, WPV = 16 / CPW;  // codes a word, words an output vector
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int64_t kw = k / CPW, gw = wt.span / CPW;
  vu shifts;
  for (int l = 0; l < 16; ++l) shifts[l] = uint32_t(l % CPW * BITS);
  const int64_t vector_words = WIDE && gw % WPV == 0 ? kw / 16 * 16 : 0;  // the words taken 16 at a time
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < wt.n; ++n) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(wt.words + n * wt.row_words);
    float* out = w + n * k;
    float s = 0.f, z = 0.f;
    int64_t group_end = 0;  // the words of the group whose s and z are loaded end here
    const auto group_of = [&](int64_t j) {
      if (j < group_end) return;
      const int64_t g = j / gw;
      s = scale_at(wt.scales, wt.kind, g * wt.n + n);
      z = wt.zeros ? float(wt.zeros[g * wt.n + n]) : float(1 << (BITS - 1));
      group_end = std::min(g * gw + gw, kw);
    };
    if constexpr (WIDE) {
      for (int64_t j0 = 0; j0 < vector_words; j0 += 16) {
        vu q;
        std::memcpy(&q, row + j0, sizeof(q));
        for_each_constant([&](auto v) {
          constexpr int V = decltype(v)::value;
          group_of(j0 + V * WPV);
          const vu codes = (words_of_vector<CPW, V>(q, std::make_index_sequence<16>()) >> shifts) & MASK;
          const vf values = (__builtin_convertvector(codes, vf) - z) * s;
          std::memcpy(out + (j0 + V * WPV) * CPW, &values, sizeof(values));
        }, std::make_index_sequence<CPW>());
      }
    }
    for (int64_t j = vector_words; j < kw; ++j) {
      group_of(j);
      for (int c = 0; c < CPW; ++c) out[j * CPW + c] = (float((row[j] >> (c * BITS)) & MASK) - z) * s;
    }
  }
}

// The same for 2:4 codes (layout above): zeros, then each kept code's value at its column
// 4 * (t / 2) + slot, on the group of that column (groups hold whole groups of 4).
template <int BITS>
void sp24_dequantize(const Weight& wt, const int32_t* positions, int64_t pos_row_words, int64_t k, float* w,
                     int threads) {
  constexpr int CPW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int64_t kept = k / 2, group_kept = wt.span / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < wt.n; ++n) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(wt.words + n * wt.row_words);
    const uint32_t* pos = reinterpret_cast<const uint32_t*>(positions + n * pos_row_words);
    float* out = w + n * k;
    std::fill(out, out + k, 0.f);
    for (int64_t g = 0; g * group_kept < kept; ++g) {
      const float s = scale_at(wt.scales, wt.kind, g * wt.n + n);
      const float z = wt.zeros ? float(wt.zeros[g * wt.n + n]) : float(1 << (BITS - 1));
      for (int64_t t = g * group_kept, t1 = std::min(t + group_kept, kept); t < t1; ++t) {
        const uint32_t code = (row[t / CPW] >> (t % CPW * BITS)) & MASK, slot = (pos[t / 16] >> (t % 16 * 2)) & 3;
        out[4 * (t / 2) + slot] = (float(code) - z) * s;
      }
    }
  }
}

// f(std::integral_constant<int, MR>(), m0) for each chunk of up to 8 rows of x from row m0 on, MR
// its row count: the FP8 and NF4 matmuls' kernels take the rows sharing each decoded row as a
// compile-time count.
template <class F>
inline void for_row_chunks(int64_t m_rows, F f) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += 8) {
    switch (std::min<int64_t>(8, m_rows - m0)) {
      case 1: f(std::integral_constant<int, 1>(), m0); break;
      case 2: f(std::integral_constant<int, 2>(), m0); break;
      case 3: f(std::integral_constant<int, 3>(), m0); break;
      case 4: f(std::integral_constant<int, 4>(), m0); break;
      case 5: f(std::integral_constant<int, 5>(), m0); break;
      case 6: f(std::integral_constant<int, 6>(), m0); break;
      case 7: f(std::integral_constant<int, 7>(), m0); break;
      default: f(std::integral_constant<int, 8>(), m0);
    }
  }
}

// --- FP8 e4m3 weights, one scale per row (quant/layers.py: FP8Linear; cuda/cpu_fp8.py) --------
//   y[m, n] = scale[n] * sum_k e4m3(w[n, k]) * x[m, k]
// PyTorch converts e4m3 to fp32 a value at a time (2.5 ms for a 1536 x 576 weight on this
// project's 2-core CPU, 27x the fp32 matmul at one row of x), so the reference path made an fp8
// model decode 8x slower than the float one. Here a code's 7 bits below its sign, shifted left by
// 7 into a half's exponent and mantissa (e4m3: 4 + 3 bits, bias 7; fp16: 5 + 10, bias 15), are
// the half of the code's value times 2**-8, subnormals included: one exact convert to fp32 (F16C,
// 16 codes an instruction); the 2**8 joins the row's scale. The codes 0x7f / 0xff (e4m3fn's NaN)
// would read 1.875 so: they are made NaN by a compare and a blend.
constexpr float E4M3_UNIT = 256.f;  // a decoded code times E4M3_UNIT is its value

// The e4m3 code b's value times 2**-8, exact, without F16C: a normal code's bits moved into an
// fp32's (its exponent rebased by 127 - 7 - 8), a subnormal one (exponent 0) m * 2**-17.
inline float e4m3_value(uint8_t b) {
  const uint32_t em = b & 0x7fu, sign = uint32_t(b & 0x80u) << 24;
  if (em == 0x7fu) return __builtin_nanf("");
  const float v = em < 8u ? float(em) * (1.f / 131072.f) : bits_to_float((em << 20) + ((127u - 7u - 8u) << 23));
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits_to_float(sign | bits);
}

// FP8_LANES codes at p -> their values times 2**-8 in fp32, exact. AVX-512 (BW, VL): 16 codes
// sign-extended to 16 bits and shifted left by 7 (the sign at bits 15 and 14, the 7 bits below
// it at 13 ... 7), bit 14 cleared, one convert: 4 instructions (zero-extension, masks, two shifts
// and an or took 8); NaN codes are flagged in `nan` (a compare of the bytes) rather than blended
// in, and the caller makes the row NaN. AVX2 + F16C: 8 codes the same way (16-lane vectors there
// go through the stack: 30x slower). Elsewhere the bits' formula on 4 or 8 lanes (NaN lanes NaN).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int FP8_LANES = 16;
inline Vec<16>::f e4m3_vector(const uint8_t* p, uint32_t& nan) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  nan |= _mm_cmpeq_epi8_mask(_mm_or_si128(raw, _mm_set1_epi8(char(0x80))), _mm_set1_epi8(char(0xff)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7), _mm256_set1_epi16(-0x4001));
  return (Vec<16>::f)_mm512_cvtph_ps(h);
}
// 32 codes at p -> lo (the first 16) and hi, as e4m3_vector: one widening, shift and and for both
// halves (one extract more).
inline void e4m3_pair(const uint8_t* p, uint32_t& nan, Vec<16>::f& lo, Vec<16>::f& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  nan |= _mm256_cmpeq_epi8_mask(_mm256_or_si256(raw, _mm256_set1_epi8(char(0x80))), _mm256_set1_epi8(char(0xff)));
  const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(raw), 7), _mm512_set1_epi16(-0x4001));
  lo = (Vec<16>::f)_mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = (Vec<16>::f)_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
#elif defined(__AVX2__) && defined(__F16C__)
constexpr int FP8_LANES = 8;
inline Vec<8>::f e4m3_vector(const uint8_t* p, uint32_t& nan) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));  // 8 codes, 8 zero bytes
  nan |= uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_or_si128(raw, _mm_set1_epi8(char(0x80))),
                                                   _mm_set1_epi8(char(0xff)))));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(raw), 7), _mm_set1_epi16(-0x4001));
  return (Vec<8>::f)_mm256_cvtph_ps(h);
}
#else
constexpr int FP8_LANES = NARROW;
inline Vec<NARROW>::f e4m3_vector(const uint8_t* p, uint32_t&) {
  typedef Vec<NARROW>::u vu;
  typedef uint8_t bytes __attribute__((vector_size(NARROW)));
  bytes raw;
  std::memcpy(&raw, p, sizeof(raw));
  const vu b = __builtin_convertvector(raw, vu), em = b & 0x7fu;
  const vu normal = (em << 20) + ((127u - 7u - 8u) << 23);
  const vu subnormal = (vu)(__builtin_convertvector(em, Vec<NARROW>::f) * (1.f / 131072.f));
  const vu small = (vu)(em < 8u), nan = (vu)(em == 0x7fu);  // lanes all ones where true
  const vu v = (small & subnormal) | (~small & normal);
  return (Vec<NARROW>::f)((v & ~nan) | (nan & 0x7fc00000u) | ((b & 0x80u) << 24));
}
#endif
typedef Vec<FP8_LANES>::f Fp8Vec;
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
inline void e4m3_pair(const uint8_t* p, uint32_t& nan, Fp8Vec& lo, Fp8Vec& hi) {  // two vectors, one by one
  lo = e4m3_vector(p, nan);
  hi = e4m3_vector(p + FP8_LANES, nan);
}
#endif

inline float lane_sum(Vec<16>::f v) {
  return lane_sum(Vec<8>::f(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}

// sums[r] = sum_k e4m3(row[k]) * 2**-8 * x[r * k_len + k] for MR rows of x (NaN where the row holds
// a NaN code): each decoded vector meets MR rows; U independent sums per row hide the multiply-
// adds' latency at few rows. Where U is even, codes are decoded two vectors at a time (e4m3_pair:
// 13-14% less time at one or two rows of x with AVX-512; at 3-8 rows U = 1, as two sums per row
// there took 2-9% more).
template <int MR>
inline void fp8_row_dot(const float* x, int64_t k_len, const uint8_t* row, float* sums) {
  constexpr int L = FP8_LANES, U = (MR == 1 ? 4 : MR == 2 ? 2 : 1) * (16 / L), P = U % 2 == 0 ? 2 : 1;
  Fp8Vec acc[MR][U] = {};
  uint32_t nan = 0;
  int64_t k = 0;
  for (; k + L * U <= k_len; k += L * U)
    for (int u = 0; u < U; u += P) {
      Fp8Vec w[P];
      if constexpr (P == 2)
        e4m3_pair(row + k + L * u, nan, w[0], w[1]);
      else
        w[0] = e4m3_vector(row + k + L * u, nan);
      for (int h = 0; h < P; ++h)
        for (int r = 0; r < MR; ++r) {
          Fp8Vec xv;
          std::memcpy(&xv, x + r * k_len + k + L * (u + h), sizeof(xv));
          acc[r][u + h] += w[h] * xv;
        }
    }
  for (; k + L <= k_len; k += L) {
    const Fp8Vec w = e4m3_vector(row + k, nan);
    for (int r = 0; r < MR; ++r) {
      Fp8Vec xv;
      std::memcpy(&xv, x + r * k_len + k, sizeof(xv));
      acc[r][0] += w * xv;
    }
  }
  for (int r = 0; r < MR; ++r) {
    Fp8Vec total = acc[r][0];
    for (int u = 1; u < U; ++u) total += acc[r][u];
    float sum = lane_sum(total);
    for (int64_t t = k; t < k_len; ++t) sum += e4m3_value(row[t]) * x[r * k_len + t];
    sums[r] = nan ? __builtin_nanf("") : sum;
  }
}

template <int MR>
void fp8_block(const float* x, int64_t k, const uint8_t* w, int64_t n, int64_t row_bytes, const void* scales,
               int kind, float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) {
    float sums[MR];
    fp8_row_dot<MR>(x, k, w + r * row_bytes, sums);
    const float s = scale_at(scales, kind, r) * E4M3_UNIT;
    for (int m = 0; m < MR; ++m) y[m * n + r] = sums[m] * s;
  }
}

// --- NF4 / FP4 weights of bitsandbytes (quant/nf4.py: NF4Linear; cuda/cpu_nf4.py) ----------
//   w[n, k] = level[code] * absmax[block],   block = (n * K + k) / BLOCK (K a multiple of BLOCK)
// Codes two a byte, the first (even k) in the high nibble, as bitsandbytes packs them; its CPU
// path rebuilt the whole fp32 weight with PyTorch indexing on every call (an NF4 smollm2-135m
// decoded 2.7 tokens/s against the float model's ~20). With AVX-512 a block's 16 levels times
// its absmax are one vector (the weight bitsandbytes computes, bit for bit) and 16 codes become
// their weights by one permute: 8 bytes, each doubled, widened to 32-bit lanes, the even lanes
// shifted right by 4 (the permute reads a lane's low 4 bits only). Elsewhere a code at a time.
#if defined(__AVX512F__)
inline __m512i nf4_indices(const uint8_t* p) {  // 16 codes from 8 bytes, in their lanes' low 4 bits
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m512i doubled = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(raw, raw));
  return _mm512_srlv_epi32(doubled, _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
}
#endif

inline uint32_t nf4_code(const uint8_t* row, int64_t k) { return k & 1 ? row[k >> 1] & 15u : row[k >> 1] >> 4; }

// sums[r] = sum_k w[k] * x[r * k_len + k] for a row's codes `row` (k_len / 2 bytes) and its
// blocks' absmax, MR rows of x; U independent sums per row at few rows.
template <int MR>
inline void nf4_row_dot(const float* x, int64_t k_len, const uint8_t* row, const float* absmax, const float* levels,
                        int64_t block, float* sums) {
#if defined(__AVX512F__)
  constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  typedef Vec<16>::f vf;
  vf acc[MR][U] = {};
  vf base;
  std::memcpy(&base, levels, sizeof(base));
  for (int64_t b0 = 0, b = 0; b0 < k_len; b0 += block, ++b) {
    const __m512 table = (__m512)(base * absmax[b]);
    int64_t k = b0;
    for (; k + 16 * U <= b0 + block; k += 16 * U)
      for (int u = 0; u < U; ++u) {
        const vf w = (vf)_mm512_permutexvar_ps(nf4_indices(row + (k + 16 * u) / 2), table);
        for (int r = 0; r < MR; ++r) {
          vf xv;
          std::memcpy(&xv, x + r * k_len + k + 16 * u, sizeof(xv));
          acc[r][u] += w * xv;
        }
      }
    for (; k < b0 + block; k += 16) {
      const vf w = (vf)_mm512_permutexvar_ps(nf4_indices(row + k / 2), table);
      for (int r = 0; r < MR; ++r) {
        vf xv;
        std::memcpy(&xv, x + r * k_len + k, sizeof(xv));
        acc[r][0] += w * xv;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    vf total = acc[r][0];
    for (int u = 1; u < U; ++u) total += acc[r][u];
    sums[r] = lane_sum(total);
  }
#else
  float acc[MR] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    const float w = levels[nf4_code(row, k)] * absmax[k / block];
    for (int r = 0; r < MR; ++r) acc[r] += w * x[r * k_len + k];
  }
  for (int r = 0; r < MR; ++r) sums[r] = acc[r];
#endif
}

template <int MR>
void nf4_block(const float* x, int64_t k, const uint8_t* codes, int64_t n, const float* absmax, const float* levels,
               int64_t block, float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) {
    float sums[MR];
    nf4_row_dot<MR>(x, k, codes + r * (k / 2), absmax + r * (k / block), levels, block, sums);
    for (int m = 0; m < MR; ++m) y[m * n + r] = sums[m];
  }
}

}  // namespace

// y fp32 [m_rows, n] = x fp32 [m_rows, k] @ dequantize(words, scales, zeros).T; k and span are
// multiples of 32 / bits (cuda/cpu_fused.py: applies; it checks the sizes too).
extern "C" void int_matmul(const float* x, int64_t m_rows, int64_t k, const int32_t* words, int64_t n,
                           int64_t row_words, const void* scales, int scale_kind, const uint8_t* zeros, int bits,
                           int64_t span, float* y, int threads) {
  if (m_rows == 0 || n == 0) return;
  const Weight wt{words, n, row_words, scales, scale_kind, zeros, span};
  if (bits == 2) matmul<2>(x, m_rows, k, wt, y, threads);
  else if (bits == 4) matmul<4>(x, m_rows, k, wt, y, threads);
  else matmul<8>(x, m_rows, k, wt, y, threads);
}

// The same for 2:4 weights: words hold the K / 2 kept codes, positions int32 [n, pos_row_words]
// their slots; k and span are multiples of 64 / bits (cuda/cpu_fused.py: sp24_applies).
extern "C" void sp24_int_matmul(const float* x, int64_t m_rows, int64_t k, const int32_t* words, int64_t n,
                                int64_t row_words, const int32_t* positions, int64_t pos_row_words,
                                const void* scales, int scale_kind, const uint8_t* zeros, int bits, int64_t span,
                                float* y, int threads) {
  if (m_rows == 0 || n == 0) return;
  const Weight wt{words, n, row_words, scales, scale_kind, zeros, span};
  if (bits == 2) sp24_matmul<2>(x, m_rows, k, wt, positions, pos_row_words * 4, y, threads);
  else if (bits == 4) sp24_matmul<4>(x, m_rows, k, wt, positions, pos_row_words * 4, y, threads);
  else sp24_matmul<8>(x, m_rows, k, wt, positions, pos_row_words * 4, y, threads);
}

// y fp32 [m_rows, n] = x fp32 [m_rows, k] @ the 2:4 weight of float values [n, k / 2] (row stride
// value_row) placed by their positions int32 [n, pos_row_words]; k a multiple of 4.
// Words a vector of the build's kernels (16 with AVX-512): which 2:4 path serves, and so up to how
// many rows of x (cuda/cpu_fused.py: sp24_max_m).
extern "C" int vector_words() { return WIDE ? 16 : NARROW; }

extern "C" void sp24_float_matmul(const float* x, int64_t m_rows, int64_t k, const void* values, int value_kind,
                                  int64_t value_row, int64_t n, const int32_t* positions, int64_t pos_row_words,
                                  float* y, int threads) {
  if (m_rows == 0 || n == 0) return;
  const int64_t kept = k / 2;
#ifdef __AVX512F__
  const int64_t stride = k;  // x's rows as they lie
  const float* xr = x;
#else
  const int64_t ps = kept + 16, stride = 4 * ps;  // a row's 4 planes, padded as for codes
  std::vector<float> xp(m_rows * stride);         // xp[m][r][t] = x[m, 4 * (t / 2) + r]
  for (int64_t m = 0; m < m_rows; ++m)
    for (int r = 0; r < 4; ++r)
      for (int64_t t = 0; t < kept; ++t) xp[m * stride + r * ps + t] = x[m * k + 4 * (t / 2) + r];
  const float* xr = xp.data();
#endif
  // Rows of x at a time: up to 8 where x is read as it lies, 4 against planes. Kept values per
  // chunk: those rows' x (2 columns or 4 plane values a kept value) fill 8 or 16 KB of L1 cache
  // (a multiple of 16).
  constexpr int MOST = WIDE ? 8 : 4;
  const int64_t chunk = 1024 / std::min<int64_t>(m_rows, MOST) / 16 * 16;
  std::fill(y, y + m_rows * n, 0.f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t block = 0; block < (n + 15) / 16; ++block) {
    const int64_t n0 = block * 16, n1 = std::min(n0 + 16, n);
    for (int64_t m0 = 0, mt; m0 < m_rows; m0 += mt) {
      mt = rows_at_once(m_rows - m0, MOST);
      const float* xm = xr + m0 * stride;
      float* ym = y + m0 * n;
      for (int64_t t0 = 0; t0 < kept; t0 += chunk) {
        const int64_t t1 = std::min(t0 + chunk, kept);
        if (mt == 1) sp24_float_rows<1>(values, value_kind, value_row, positions, pos_row_words, n, xm, stride, ym, n0, n1, t0, t1);
        else if (mt == 2) sp24_float_rows<2>(values, value_kind, value_row, positions, pos_row_words, n, xm, stride, ym, n0, n1, t0, t1);
        else if (mt == 4) sp24_float_rows<4>(values, value_kind, value_row, positions, pos_row_words, n, xm, stride, ym, n0, n1, t0, t1);
        else sp24_float_rows<MOST>(values, value_kind, value_row, positions, pos_row_words, n, xm, stride, ym, n0, n1, t0, t1);
      }
    }
  }
}

// w fp32 [n, k] = dequantize(words, scales, zeros) (cuda/layout.py: dequantize_words), the
// reference's values exactly; k and span multiples of 32 / bits (cuda/cpu_fused.py: applies).
extern "C" void int_dequantize(const int32_t* words, int64_t n, int64_t row_words, const void* scales, int scale_kind,
                               const uint8_t* zeros, int bits, int64_t span, int64_t k, float* w, int threads) {
  const Weight wt{words, n, row_words, scales, scale_kind, zeros, span};
  if (bits == 2) dequantize<2>(wt, k, w, threads);
  else if (bits == 4) dequantize<4>(wt, k, w, threads);
  else dequantize<8>(wt, k, w, threads);
}

// The same for 2:4 codes (cuda/layout.py: dequantize_sp24_words); span a multiple of 4.
extern "C" void sp24_int_dequantize(const int32_t* words, int64_t n, int64_t row_words, const int32_t* positions,
                                    int64_t pos_row_words, const void* scales, int scale_kind, const uint8_t* zeros,
                                    int bits, int64_t span, int64_t k, float* w, int threads) {
  const Weight wt{words, n, row_words, scales, scale_kind, zeros, span};
  if (bits == 2) sp24_dequantize<2>(wt, positions, pos_row_words, k, w, threads);
  else if (bits == 4) sp24_dequantize<4>(wt, positions, pos_row_words, k, w, threads);
  else sp24_dequantize<8>(wt, positions, pos_row_words, k, w, threads);
}

// w fp32 [n, k] = the 2:4 weight of float values [n, k / 2] (row stride value_row, fp32 / fp16 /
// bf16 as `value_kind`) placed by their positions (cuda/layout.py: dense_sp24_values), zeros elsewhere.
extern "C" void sp24_float_dense(const void* values, int value_kind, int64_t value_row, int64_t n,
                                 const int32_t* positions, int64_t pos_row_words, int64_t k, float* w, int threads) {
  const int64_t kept = k / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) {
    const uint32_t* pos = reinterpret_cast<const uint32_t*>(positions + r * pos_row_words);
    float* out = w + r * k;
    std::fill(out, out + k, 0.f);
    for (int64_t t = 0; t < kept; ++t)
      out[4 * (t / 2) + ((pos[t / 16] >> (t % 16 * 2)) & 3)] = scale_at(values, value_kind, r * value_row + t);
  }
}

// y fp32 [m_rows, n] = x fp32 [m_rows, k] @ (e4m3 w [n, k] (row stride row_bytes) * scales[n]).T,
// scales fp32 / fp16 / bf16 as `scale_kind` (cuda/cpu_fp8.py checks the sizes); up to 8 rows of x
// share each decoded row.
extern "C" void fp8_matmul(const float* x, int64_t m_rows, int64_t k, const uint8_t* w, int64_t n, int64_t row_bytes,
                           const void* scales, int scale_kind, float* y, int threads) {
  if (n == 0) return;
  for_row_chunks(m_rows, [&](auto mr, int64_t m0) {
    fp8_block<decltype(mr)::value>(x + m0 * k, k, w, n, row_bytes, scales, scale_kind, y + m0 * n, threads);
  });
}

// out fp32 [n, k] = e4m3 w [n, k] * scales[n] (quant/layers.py: FP8Linear.dequantized_weight in
// fp32), the reference's values exactly: the decoded value times 2**-8 and the scale times 2**8
// are both exact, so their product rounds once, as value * scale does.
extern "C" void fp8_dequantize(const uint8_t* w, int64_t n, int64_t row_bytes, const void* scales, int scale_kind,
                               int64_t k, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    const float s = scale_at(scales, scale_kind, r) * E4M3_UNIT;
    int64_t j = 0;
    uint32_t nan = 0;
    for (; j + FP8_LANES <= k; j += FP8_LANES) {
      const Fp8Vec v = e4m3_vector(row + j, nan) * s;
      std::memcpy(o + j, &v, sizeof(v));
    }
    for (; j < k; ++j) o[j] = e4m3_value(row[j]) * s;
    if (nan)  // flagged NaN codes (the vector kernels decode them as 1.875)
      for (int64_t c = 0; c < k; ++c) o[c] = (row[c] & 0x7fu) == 0x7fu ? __builtin_nanf("") : o[c];
  }
}

// y fp32 [m_rows, n] = x fp32 [m_rows, k] @ w.T for bitsandbytes' 4-bit codes [n * k / 2] (two a
// byte, high nibble first), their 16 levels and each block's fp32 absmax [n * k / block]; k a
// multiple of the block, the block of 16 (cuda/cpu_nf4.py checks them); up to 8 rows of x share
// each decoded row.
extern "C" void nf4_matmul(const float* x, int64_t m_rows, int64_t k, const uint8_t* codes, int64_t n,
                           const float* absmax, const float* levels, int64_t block, float* y, int threads) {
  if (n == 0) return;
  for_row_chunks(m_rows, [&](auto mr, int64_t m0) {
    nf4_block<decltype(mr)::value>(x + m0 * k, k, codes, n, absmax, levels, block, y + m0 * n, threads);
  });
}

// out fp32 [n, k] = level[code] * absmax[block], bitsandbytes' dequantize_4bit in fp32 bit for bit.
extern "C" void nf4_dequantize(const uint8_t* codes, int64_t n, int64_t k, const float* absmax, const float* levels,
                               int64_t block, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = codes + r * (k / 2);
    const float* a = absmax + r * (k / block);
    float* o = out + r * k;
    int64_t j = 0;
#if defined(__AVX512F__)
    Vec<16>::f base;
    std::memcpy(&base, levels, sizeof(base));
    for (int64_t b = 0; b < k / block; ++b) {
      const __m512 table = (__m512)(base * a[b]);
      for (j = b * block; j < (b + 1) * block; j += 16)
        _mm512_storeu_ps(o + j, _mm512_permutexvar_ps(nf4_indices(row + j / 2), table));
    }
#endif
    for (; j < k; ++j) o[j] = levels[nf4_code(row, j)] * a[j / block];
  }
}
