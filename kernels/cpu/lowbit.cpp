// Fused unpack + dequantize + GEMV/small GEMM for the 2-bit block-64 layout (workbench/quant/packing.py).
//
//   y[b, n] = sum_k x[b, k] * (code[n, k] - zero[n, k / G]) * scale[n, k / G]
//
// qweight [N, Kp/4] uint8: block j of a row is 16 bytes; byte m holds the codes of elements
// 64j+m, 64j+m+16, 64j+m+32, 64j+m+48 at bit shifts 0, 2, 4, 6. `zero` may be empty (ternary:
// the zero is 1). Registered as torch.ops.workbench_lowbit.lowbit_gemm.
//
// Kernels (all accumulate in fp32; group size a multiple of 16 unless said otherwise):
//  * tile_avx512 / tile_avx2: per row and group, a table holds the four dequantized values
//    (c - z) * s, so a code becomes a weight with one permute (vpermps) and no int-to-float
//    conversion. Tiles of R rows x BT activation rows share each decoded vector and each x load;
//    FMA-bound from 3 activation rows on.
//  * gemv_avx512 (1-2 activation rows, decode-bound): constant code tables, the scale applied once
//    per group to a partial sum and the zero as a correction from per-group sums of x.
//  * dp_avx512bf16 (bfloat16 activations, group size a multiple of 64): codes become bf16 words
//    (vpermw) and vdpbf16ps multiplies 32 pairs per instruction, exactly (products of bf16 codes
//    and bf16 activations are exact in fp32).
//  * tile8_avx512 (group sizes that are multiples of 8 but not 16): per-half-run scale vectors.
//  * generic (other group sizes, CPUs without AVX2/FMA): dequantize a row, then dot products.
// Each tile prefetches the next tile's rows (see NextTile).
// Rows are split over torch's intra-op threads (at::parallel_for, OpenMP).
//
// The integer path (lowbit_gemm_q8: int8 activations, integer dot products, AVX-512 VNNI / AVX-VNNI /
// AVX2 / NEON dotprod / scalar) lives in lowbit_q8.h, with its wide tile for batches (lowbit_gemm_q8w:
// lanes are 16 weight rows, AVX-512 VNNI, G a multiple of 64); lowbit_dequant writes W for torch's
// matmul (prefill, and batches on CPUs where the wide tile loses). The ISA is chosen at run time (__builtin_cpu_supports); ISA-specific code is compiled
// with `#pragma GCC target`, so the library itself needs no -march flag and runs on any x86-64. On
// other CPUs (aarch64) the x86 sections compile out: the float ops take the generic path, the
// integer op NEON.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "lowbit_q8.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

struct Problem {
  const float* x;      // [B, Kp] fp32 activations, zero beyond K (dp_avx512bf16: bf16 pairs, see bf16_pairs)
  const uint8_t* q;    // [N, Kp / 4]
  const float* scale;  // [N, NG]
  const float* zero;   // [N, NG], or nullptr for ternary (zero 1)
  const float* xsum;   // [B, NG] sums of x over each group
  void* y;             // [B, N], float or bfloat16
  bool y_bf16;
  int64_t B, N, K, Kp, G, NG;
};

inline void store(const Problem& p, int64_t b, int64_t n, float v) {
  if (p.y_bf16)
    static_cast<c10::BFloat16*>(p.y)[b * p.N + n] = c10::BFloat16(v);
  else
    static_cast<float*>(p.y)[b * p.N + n] = v;
}

// Prefetches the next tile's codes, scales and zeros (rows n0 + R ...) while a tile computes: a
// tile's rows are short (1 KB of codes at K = 4096), too short for the hardware prefetchers to ramp
// up on, and without it a cold GEMV reaches only a third of the bandwidth a dense one does.
struct NextTile {
  const char* cur[3] = {nullptr, nullptr, nullptr};  // next line to prefetch in each array
  const char* end[3] = {nullptr, nullptr, nullptr};
  int64_t stride = 64;  // bytes per step: 1 line, or 2 when a tile holds more lines than steps

  NextTile(const Problem& p, int64_t n0, int64_t R, int64_t steps) {
    const int64_t n = n0 + R;
    if (n >= p.N || steps <= 0) return;
    const int64_t code_bytes = R * (p.Kp / 4), meta_bytes = R * p.NG * 4;
    cur[0] = reinterpret_cast<const char*>(p.q + n * (p.Kp / 4));
    cur[1] = reinterpret_cast<const char*>(p.scale + n * p.NG);
    cur[2] = p.zero ? reinterpret_cast<const char*>(p.zero + n * p.NG) : nullptr;
    end[0] = cur[0] + code_bytes;
    end[1] = cur[1] + meta_bytes;
    end[2] = cur[2] ? cur[2] + meta_bytes : nullptr;
    if (std::max(code_bytes, meta_bytes) > 64 * steps) stride = 128;
  }

  // One step: the next `stride` bytes of each array (at most 2 lines; enough for the tiles here).
  inline void step() {
    for (int a = 0; a < 3; ++a)
      if (cur[a] < end[a]) {
        prefetch(cur[a]);
        if (stride > 64) prefetch(cur[a] + 64);
        cur[a] += stride;
      }
  }

  // asm, not _mm_prefetch: GCC's loop distribution moves __builtin_prefetch calls into a loop of
  // their own, which it then deletes as having no effect.
  static inline void prefetch(const char* p) {
#if defined(__x86_64__)
    asm volatile("prefetcht0 %0" : : "m"(*p));
#else
    __builtin_prefetch(p);
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Generic path: dequantize one row into a float buffer, then one dot product per activation row.

inline void dequant_row(const Problem& p, int64_t n, float* w) {
  const uint8_t* q = p.q + n * (p.Kp / 4);
  for (int64_t g = 0, k = 0; g < p.NG; ++g) {
    const float s = p.scale[n * p.NG + g], z = p.zero ? p.zero[n * p.NG + g] : 1.0f;
    for (const int64_t end = k + p.G; k < end; ++k) {
      const int64_t within = k & 63;
      const int code = (q[(k >> 6) * 16 + (within & 15)] >> (2 * (within >> 4))) & 3;
      w[k] = (static_cast<float>(code) - z) * s;
    }
  }
}

// sum of n floats, n a multiple of 16 (16 partial sums, so the compiler may vectorize)
float sum16(const float* a, int64_t n) {
  float acc[16] = {};
  for (int64_t k = 0; k < n; k += 16)
    for (int i = 0; i < 16; ++i) acc[i] += a[k + i];
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += acc[i];
  return s;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * b[k + i];
  for (; k < n; ++k) acc[0] += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// AVX-512 (this section to the dispatch: x86-64 only)

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace {

float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
  }
  for (; k + 16 <= n; k += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
  float tail = 0.f;
  for (; k < n; ++k) tail += a[k] * b[k];
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail;
}

// Rows n0 .. n0+R-1 against activation rows b0 .. b0+BT-1. NA accumulators per pair keep enough
// independent FMA chains in flight when R * BT is small.
template <int R, int BT>
void tile_avx512(const Problem& p, int64_t n0, int64_t b0) {
  constexpr int NA = (R * BT >= 8) ? 1 : 2;
  const int64_t row_bytes = p.Kp / 4;
  const int64_t runs = p.K / 16;  // runs of 16 codes that hold real weights
  const int64_t rpg = p.G / 16;   // runs per group
  // table entry i: code (i & 3) for quarters 0 and 2, code ((i >> 2) & 3) for quarters 1 and 3
  const __m512 c_lo = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  const __m512 c_hi = _mm512_set_ps(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512 one = _mm512_set1_ps(1.0f);

  __m512 acc[R][BT][NA];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t)
      for (int a = 0; a < NA; ++a) acc[r][t][a] = _mm512_setzero_ps();
  __m512 lut_lo[R], lut_hi[R];
  const uint8_t* qr[R];
  const float* sr[R];
  const float* zr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
    zr[r] = p.zero ? p.zero + (n0 + r) * p.NG : nullptr;
  }
  const float* xb[BT];
  for (int t = 0; t < BT; ++t) xb[t] = p.x + (b0 + t) * p.Kp;

  auto load_group = [&](int64_t g) {
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sr[r][g]);
      const __m512 z = zr[r] ? _mm512_set1_ps(zr[r][g]) : one;
      lut_lo[r] = _mm512_mul_ps(_mm512_sub_ps(c_lo, z), s);
      lut_hi[r] = _mm512_mul_ps(_mm512_sub_ps(c_hi, z), s);
    }
  };

  int64_t g = 0, left = 0, run = 0;  // current group, runs left in it, runs done
  // one block of 64 codes (nq of its 4 quarters); inlined twice so full blocks unroll
  auto block = [&](int64_t blk, int nq) __attribute__((always_inline)) {
    __m512i v[R], v4[R];
    for (int r = 0; r < R; ++r) {
      v[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + blk * 16)));
      v4[r] = _mm512_srli_epi32(v[r], 4);
    }
    for (int quarter = 0; quarter < nq; ++quarter, ++run) {
      if (left == 0) {
        load_group(g++);
        left = rpg;
      }
      --left;
      __m512 xv[BT];
      for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_ps(xb[t] + run * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_permutexvar_ps(quarter < 2 ? v[r] : v4[r], (quarter & 1) ? lut_hi[r] : lut_lo[r]);
        for (int t = 0; t < BT; ++t) {
          __m512& a = acc[r][t][quarter % NA];
          a = _mm512_fmadd_ps(w, xv[t], a);
        }
      }
    }
  };
  const int64_t full = runs / 4;
  NextTile next(p, n0, R, full);
  for (int64_t blk = 0; blk < full; ++blk) {
    next.step();
    block(blk, 4);
  }
  if (runs % 4) block(full, static_cast<int>(runs % 4));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) {
      __m512 s = acc[r][t][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[r][t][a]);
      store(p, b0 + t, n0 + r, _mm512_reduce_add_ps(s));
    }
}

// sum_g s[g] * z[g] * xs[g]: the zero's share of one output (gemv_avx512, dp_avx512bf16)
float zero_term_avx512(const float* s, const float* z, const float* xs, int64_t ng) {
  __m512 c = _mm512_setzero_ps();
  for (int64_t i = 0; i < ng; i += 16) {
    const __mmask16 m = ng - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (ng - i)) - 1);
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, z + i));
    c = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(m, xs + i), c);
  }
  return _mm512_reduce_add_ps(c);
}

// Group sizes that are multiples of 8 but not of 16 (HQQ's g8, say): each half of a 16-code run
// lies in one group, so a run's weights are (code - z) * s with per-half scale and zero vectors.
template <int R, int BT>
void tile8_avx512(const Problem& p, int64_t n0, int64_t b0) {
  const int64_t row_bytes = p.Kp / 4;
  const int64_t runs = (p.K + 15) / 16;  // the last run may hold only 8 real codes (x is 0 past K)
  const __m512 t_lo = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
  const __m512 t_hi = _mm512_set_ps(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512 one = _mm512_set1_ps(1.0f);

  __m512 acc[R][BT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* qr[R];
  const float* sr[R];
  const float* zr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
    zr[r] = p.zero ? p.zero + (n0 + r) * p.NG : nullptr;
  }
  const float* xb[BT];
  for (int t = 0; t < BT; ++t) xb[t] = p.x + (b0 + t) * p.Kp;

  NextTile next(p, n0, R, (runs + 3) / 4);
  int64_t g = 0, boundary = p.G;  // group of the current half, and where the next group starts
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t blk = run / 4;
    const int quarter = static_cast<int>(run % 4);
    if (quarter == 0) next.step();
    const int64_t k = run * 16;
    if (k >= boundary) ++g, boundary += p.G;
    const int64_t g_lo = g;
    if (k + 8 >= boundary) ++g, boundary += p.G;
    const int64_t g_hi = std::min(g, p.NG - 1);
    __m512 xv[BT];
    for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_ps(xb[t] + k);
    for (int r = 0; r < R; ++r) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + blk * 16)));
      if (quarter >= 2) v = _mm512_srli_epi32(v, 4);
      const __m512 c = _mm512_permutexvar_ps(v, (quarter & 1) ? t_hi : t_lo);
      const __m512 s = _mm512_mask_broadcastss_ps(_mm512_set1_ps(sr[r][g_lo]), 0xFF00, _mm_set_ss(sr[r][g_hi]));
      const __m512 z = zr[r] ? _mm512_mask_broadcastss_ps(_mm512_set1_ps(zr[r][g_lo]), 0xFF00, _mm_set_ss(zr[r][g_hi]))
                             : one;
      const __m512 w = _mm512_mul_ps(_mm512_sub_ps(c, z), s);
      for (int t = 0; t < BT; ++t) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) store(p, b0 + t, n0 + r, _mm512_reduce_add_ps(acc[r][t]));
}

// Few activation rows: decoding dominates, so the tables are constant (codes as floats) and the
// group's scale is applied once per group to a partial sum; the zero becomes a per-group
// correction  -sum_g scale * zero * xsum[g]  (for ternary the table holds code - 1 instead).
template <int R, int BT>
void gemv_avx512(const Problem& p, int64_t n0, int64_t b0) {
  const int64_t row_bytes = p.Kp / 4;
  const int64_t runs = p.K / 16;
  const int64_t rpg = p.G / 16;
  const bool ternary = p.zero == nullptr;
  const float off = ternary ? 1.0f : 0.0f;
  const __m512 t_lo = _mm512_sub_ps(_mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0), _mm512_set1_ps(off));
  const __m512 t_hi = _mm512_sub_ps(_mm512_set_ps(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_set1_ps(off));

  __m512 acc[R][BT], tot[R][BT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) acc[r][t] = tot[r][t] = _mm512_setzero_ps();
  const uint8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
  }
  const float* xb[BT];
  for (int t = 0; t < BT; ++t) xb[t] = p.x + (b0 + t) * p.Kp;

  int64_t g = 0, pos = 0, run = 0;  // current group, runs done in it, runs done
  auto block = [&](int64_t blk, int nq) __attribute__((always_inline)) {
    __m512i v[R], v4[R];
    for (int r = 0; r < R; ++r) {
      v[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + blk * 16)));
      v4[r] = _mm512_srli_epi32(v[r], 4);
    }
    for (int quarter = 0; quarter < nq; ++quarter, ++run) {
      __m512 xv[BT];
      for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_ps(xb[t] + run * 16);
      const bool first = pos == 0, last = pos == rpg - 1;
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_permutexvar_ps(quarter < 2 ? v[r] : v4[r], (quarter & 1) ? t_hi : t_lo);
        for (int t = 0; t < BT; ++t)
          acc[r][t] = first ? _mm512_mul_ps(w, xv[t]) : _mm512_fmadd_ps(w, xv[t], acc[r][t]);
      }
      if (last) {
        for (int r = 0; r < R; ++r) {
          const __m512 s = _mm512_set1_ps(sr[r][g]);
          for (int t = 0; t < BT; ++t) tot[r][t] = _mm512_fmadd_ps(s, acc[r][t], tot[r][t]);
        }
        ++g;
        pos = 0;
      } else {
        ++pos;
      }
    }
  };
  const int64_t full = runs / 4;
  NextTile next(p, n0, R, full);
  for (int64_t blk = 0; blk < full; ++blk) {
    next.step();
    block(blk, 4);
  }
  if (runs % 4) block(full, static_cast<int>(runs % 4));

  for (int r = 0; r < R; ++r) {
    const float* s = sr[r];
    const float* z = ternary ? nullptr : p.zero + (n0 + r) * p.NG;
    for (int t = 0; t < BT; ++t) {
      const float corr = z ? zero_term_avx512(s, z, p.xsum + (b0 + t) * p.NG, p.NG) : 0.0f;
      store(p, b0 + t, n0 + r, _mm512_reduce_add_ps(tot[r][t]) - corr);
    }
  }
}

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX-512 BF16, bfloat16 activations and group sizes that are multiples of 64: vdpbf16ps multiplies
// 32 bf16 pairs per instruction. The codes of two blocks (32 bytes) become 32 words; a word permute
// (vpermw) turns quarter q of every byte into the bf16 code (exact: codes are small integers), and
// the activations are reordered once per call (see bf16_pairs) so that one 64-byte load matches.
// Lanes 0-7 of the fp32 sum then belong to the first block, lanes 8-15 to the second, which is
// what the per-block scale vector applies. Products and sums are fp32, as on the fp32 path.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")
namespace {

// x[b] (bf16, K) -> pairs of blocks: word 128j + 32q + i = x[128j + 64 * (i / 16) + 16q + i % 16], 0 past K
void bf16_pairs(const uint16_t* x, int64_t K, int64_t Kp2, uint16_t* out) {
  for (int64_t j = 0; j < Kp2; j += 128)
    for (int q = 0; q < 4; ++q)
      for (int i = 0; i < 32; ++i) {
        const int64_t k = j + 64 * (i / 16) + 16 * q + i % 16;
        out[j + 32 * q + i] = k < K ? x[k] : 0;
      }
}

template <int R, int BT>
void dp_avx512bf16(const Problem& p, int64_t n0, int64_t b0) {
  const int64_t row_bytes = p.Kp / 4;
  const int64_t nblocks = p.Kp / 64, pairs = (nblocks + 1) / 2, Kp2 = pairs * 128;
  const int64_t bpg = p.G / 64;  // blocks per group
  const bool ternary = p.zero == nullptr;
  // bf16 bits of code - (ternary ? 1 : 0): entry i is code (i & 3) in t_lo, ((i >> 2) & 3) in t_hi
  static constexpr uint16_t kAsym[4] = {0x0000, 0x3F80, 0x4000, 0x4040};     // 0, 1, 2, 3
  static constexpr uint16_t kTernary[4] = {0xBF80, 0x0000, 0x3F80, 0x4000};  // -1, 0, 1, 2
  const uint16_t* val = ternary ? kTernary : kAsym;
  alignas(64) uint16_t lo[32], hi[32];
  for (int i = 0; i < 32; ++i) {
    lo[i] = val[i & 3];
    hi[i] = val[(i >> 2) & 3];
  }
  const __m512i t_lo = _mm512_load_si512(lo), t_hi = _mm512_load_si512(hi);

  __m512 tot[R][BT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) tot[r][t] = _mm512_setzero_ps();
  const uint8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
  }
  const uint16_t* xb[BT];
  for (int t = 0; t < BT; ++t) xb[t] = reinterpret_cast<const uint16_t*>(p.x) + (b0 + t) * Kp2;

  NextTile next(p, n0, R, pairs);
  for (int64_t j = 0; j < pairs; ++j) {
    next.step();
    const bool two = 2 * j + 1 < nblocks;
    __m512 acc[R][BT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < BT; ++t) acc[r][t] = _mm512_setzero_ps();
    __m512i v[R], v4[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = qr[r] + j * 32;
      const __m256i bytes = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      v[r] = _mm512_cvtepu8_epi16(bytes);
      v4[r] = _mm512_srli_epi16(v[r], 4);
    }
    for (int q = 0; q < 4; ++q) {
      __m512i xv[BT];
      for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_si512(xb[t] + j * 128 + q * 32);
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_permutexvar_epi16(q < 2 ? v[r] : v4[r], (q & 1) ? t_hi : t_lo);
        for (int t = 0; t < BT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
      }
    }
    const int64_t ga = (2 * j) / bpg, gb = (2 * j + 1) / bpg;
    for (int r = 0; r < R; ++r) {
      // lanes 0-7: scale of block 2j's group, lanes 8-15: block 2j+1's (0 for a missing block)
      const __m512 sa = _mm512_set1_ps(sr[r][ga]);
      const __m512 s = _mm512_mask_broadcastss_ps(sa, 0xFF00, _mm_set_ss(two ? sr[r][gb] : 0.0f));
      for (int t = 0; t < BT; ++t) tot[r][t] = _mm512_fmadd_ps(s, acc[r][t], tot[r][t]);
    }
  }

  for (int r = 0; r < R; ++r) {
    const float* s = sr[r];
    const float* z = ternary ? nullptr : p.zero + (n0 + r) * p.NG;
    for (int t = 0; t < BT; ++t) {
      const float corr = z ? zero_term_avx512(s, z, p.xsum + (b0 + t) * p.NG, p.NG) : 0.0f;
      store(p, b0 + t, n0 + r, _mm512_reduce_add_ps(tot[r][t]) - corr);
    }
  }
}

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2: 8 lanes, so a run of 16 codes is two vectors; vpermps takes 3 index bits, so every quarter
// is shifted down to bits 0-1 and looked up in one table whose entry i is the value of code i & 3.

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  for (; k + 8 <= n; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
  float tail = 0.f;
  for (; k < n; ++k) tail += a[k] * b[k];
  return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
}

template <int R, int BT>
void tile_avx2(const Problem& p, int64_t n0, int64_t b0) {
  const int64_t row_bytes = p.Kp / 4;
  const int64_t runs = p.K / 16;
  const int64_t rpg = p.G / 16;
  const __m256 c_lo = _mm256_set_ps(3, 2, 1, 0, 3, 2, 1, 0);
  const __m256 one = _mm256_set1_ps(1.0f);

  __m256 acc[R][BT][2];  // [.][.][half of the run]
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
  __m256 lut[R];
  const uint8_t* qr[R];
  const float* sr[R];
  const float* zr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
    zr[r] = p.zero ? p.zero + (n0 + r) * p.NG : nullptr;
  }
  const float* xb[BT];
  for (int t = 0; t < BT; ++t) xb[t] = p.x + (b0 + t) * p.Kp;

  int64_t g = 0, left = 0, run = 0;
  auto block = [&](int64_t blk, int nq) __attribute__((always_inline)) {
    __m256i v[R][2];
    for (int r = 0; r < R; ++r) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + blk * 16));
      v[r][0] = _mm256_cvtepu8_epi32(bytes);
      v[r][1] = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));
    }
    for (int quarter = 0; quarter < nq; ++quarter, ++run) {
      if (left == 0) {
        for (int r = 0; r < R; ++r) {
          const __m256 z = zr[r] ? _mm256_set1_ps(zr[r][g]) : one;
          lut[r] = _mm256_mul_ps(_mm256_sub_ps(c_lo, z), _mm256_set1_ps(sr[r][g]));
        }
        ++g;
        left = rpg;
      }
      --left;
      for (int h = 0; h < 2; ++h) {
        __m256 xv[BT];
        for (int t = 0; t < BT; ++t) xv[t] = _mm256_loadu_ps(xb[t] + run * 16 + h * 8);
        for (int r = 0; r < R; ++r) {
          const __m256i c = v[r][h];
          const __m256i idx = quarter == 0   ? c
                              : quarter == 1 ? _mm256_srli_epi32(c, 2)
                              : quarter == 2 ? _mm256_srli_epi32(c, 4)
                                             : _mm256_srli_epi32(c, 6);
          const __m256 w = _mm256_permutevar8x32_ps(lut[r], idx);
          for (int t = 0; t < BT; ++t) acc[r][t][h] = _mm256_fmadd_ps(w, xv[t], acc[r][t][h]);
        }
      }
    }
  };
  const int64_t full = runs / 4;
  NextTile next(p, n0, R, full);
  for (int64_t blk = 0; blk < full; ++blk) {
    next.step();
    block(blk, 4);
  }
  if (runs % 4) block(full, static_cast<int>(runs % 4));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) store(p, b0 + t, n0 + r, hsum256(_mm256_add_ps(acc[r][t][0], acc[r][t][1])));
}

}  // namespace
#pragma GCC pop_options
#endif  // __x86_64__

// ---------------------------------------------------------------------------------------------
// Dispatch

namespace {

Isa detect_isa() {
#if !defined(__x86_64__)
  return Isa::Scalar;
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Scalar;
#endif
}

const Isa kDetected = detect_isa();
Isa g_isa = kDetected;  // lowered by lowbit_set_isa (tests)

const char* isa_name(Isa isa) {
  return isa == Isa::Avx512Bf16 ? "avx512bf16" : isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

// Activation rows up to which AVX-512 uses gemv_avx512 (decode-bound); above, tile_avx512 is FMA-bound.
constexpr int64_t kGemvMaxB = 2;

#if defined(__x86_64__)
using TileFn = void (*)(const Problem&, int64_t, int64_t);

// One kernel family: tiles of R rows x up to BT activation rows; `full[bt - 1]` takes R rows and
// `one[bt - 1]` a single row (for the last N % R rows).
struct Tiles {
  int64_t R, BT;
  TileFn full[4], one[4];
};


const Tiles& pick_tiles(Isa isa, bool bf16_dot, bool g8, int64_t B) {
  static const Tiles t8{4, 4, {tile8_avx512<4, 1>, tile8_avx512<4, 2>, tile8_avx512<4, 3>, tile8_avx512<4, 4>},
                        {tile8_avx512<1, 1>, tile8_avx512<1, 2>, tile8_avx512<1, 3>, tile8_avx512<1, 4>}};
  static const Tiles dp1{4, 1, {dp_avx512bf16<4, 1>}, {dp_avx512bf16<1, 1>}};
  static const Tiles dpn{2, 4, {dp_avx512bf16<2, 1>, dp_avx512bf16<2, 2>, dp_avx512bf16<2, 3>, dp_avx512bf16<2, 4>},
                         {dp_avx512bf16<1, 1>, dp_avx512bf16<1, 2>, dp_avx512bf16<1, 3>, dp_avx512bf16<1, 4>}};
  static const Tiles gemv{4, 2, {gemv_avx512<4, 1>, gemv_avx512<4, 2>}, {gemv_avx512<1, 1>, gemv_avx512<1, 2>}};
  static const Tiles t512{4, 4, {tile_avx512<4, 1>, tile_avx512<4, 2>, tile_avx512<4, 3>, tile_avx512<4, 4>},
                          {tile_avx512<1, 1>, tile_avx512<1, 2>, tile_avx512<1, 3>, tile_avx512<1, 4>}};
  static const Tiles t256{4, 4, {tile_avx2<4, 1>, tile_avx2<4, 2>, tile_avx2<4, 3>, tile_avx2<4, 4>},
                          {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>, tile_avx2<1, 4>}};
  if (g8) return t8;
  if (bf16_dot) return B == 1 ? dp1 : dpn;
  if (isa >= Isa::Avx512) return B <= kGemvMaxB ? gemv : t512;
  return t256;
}

void run_tiles(const Problem& p, const Tiles& t) {
  const int64_t tiles = (p.N + t.R - 1) / t.R;
  // each task should hold a few hundred thousand weights, or threading costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, t.R * p.K * p.B));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * t.R;
      const int64_t rows = std::min<int64_t>(t.R, p.N - n0);
      for (int64_t b0 = 0; b0 < p.B; b0 += t.BT) {
        const int64_t bt = std::min<int64_t>(t.BT, p.B - b0);
        if (rows == t.R)
          t.full[bt - 1](p, n0, b0);
        else
          for (int64_t r = 0; r < rows; ++r) t.one[bt - 1](p, n0 + r, b0);
      }
    }
  });
}

#endif  // __x86_64__

void run_generic(const Problem& p, Isa isa) {
#if defined(__x86_64__)
  auto dot = isa >= Isa::Avx512 ? dot_avx512 : isa == Isa::Avx2 ? dot_avx2 : dot_scalar;
#else
  (void)isa;
  auto dot = dot_scalar;
#endif
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.K * p.B));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(p.K);
    for (int64_t n = begin; n < end; ++n) {
      dequant_row(p, n, w.data());
      for (int64_t b = 0; b < p.B; ++b) store(p, b, n, dot(w.data(), p.x + b * p.Kp, p.K));
    }
  });
}

// The argument checks of lowbit_gemm and lowbit_gemm_q8.
void check_gemm_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group_size, int64_t K) {
  TORCH_CHECK(x.dim() == 2, "lowbit_gemm: x must be [B, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lowbit_gemm: x must be float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "lowbit_gemm: qweight must be uint8 [N, Kp/4]");
  TORCH_CHECK(group_size > 0 && K > 0 && K % group_size == 0, "lowbit_gemm: group_size must divide K");
  TORCH_CHECK(x.size(1) == K, "lowbit_gemm: x has ", x.size(1), " columns, expected K = ", K);
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 4, NG = K / group_size;
  TORCH_CHECK(Kp % 64 == 0 && Kp >= K && Kp - K < 64, "lowbit_gemm: qweight has ", qweight.size(1),
              " bytes per row, which does not hold K = ", K, " in the block-64 layout");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == NG,
              "lowbit_gemm: scale must be float32 [N, K / group_size]");
  TORCH_CHECK(zero.numel() == 0 || (zero.scalar_type() == at::kFloat && zero.dim() == 2 && zero.size(0) == N &&
                            zero.size(1) == NG),
              "lowbit_gemm: zero must be empty or float32 [N, K / group_size]");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "lowbit_gemm: CPU tensors expected");

}

at::Tensor lowbit_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group_size, int64_t K) {
  check_gemm_args(x, qweight, scale, zero, group_size, K);
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 4, NG = K / group_size, B = x.size(0);
  const bool has_zero = zero.numel() > 0;
  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const at::Tensor q = qweight.contiguous(), s = scale.contiguous();
  const at::Tensor z = has_zero ? zero.contiguous() : zero;
  const Isa isa = g_isa;
  // group sizes that are multiples of 8 only: tile8_avx512 (AVX-512) or the generic path
  const bool g8 = group_size % 16 != 0 && group_size % 8 == 0 && isa >= Isa::Avx512;
  const bool tiled = (isa != Isa::Scalar && group_size % 16 == 0) || g8;
  const bool bf16_dot = !g8 && isa == Isa::Avx512Bf16 && x.scalar_type() == at::kBFloat16 && group_size % 64 == 0;

  // activations as fp32 rows of Kp, zero-padded; buffers are kept between calls on this thread
  thread_local std::vector<float> xbuf, xsum;
  thread_local std::vector<uint16_t> xpairs;
  const float* xp;
  at::Tensor xc;
  if (x.scalar_type() == at::kFloat && Kp == K) {
    xc = x.contiguous();
    xp = xc.data_ptr<float>();
  } else if (bf16_dot && !has_zero) {
    xp = nullptr;  // the bf16 kernel reads only xpairs
  } else {
    if (static_cast<int64_t>(xbuf.size()) < B * Kp) xbuf.resize(B * Kp);
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const float* src = xf.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(xbuf.data() + b * Kp, src + b * K, K * sizeof(float));
      std::fill(xbuf.data() + b * Kp + K, xbuf.data() + (b + 1) * Kp, 0.0f);
    }
    xp = xbuf.data();
  }
  if (bf16_dot) {
    const int64_t Kp2 = (Kp + 127) / 128 * 128;
    if (static_cast<int64_t>(xpairs.size()) < B * Kp2) xpairs.resize(B * Kp2);
    xc = x.contiguous();
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
#if defined(__x86_64__)
    for (int64_t b = 0; b < B; ++b) bf16_pairs(src + b * K, K, Kp2, xpairs.data() + b * Kp2);
#else
    (void)src;
#endif
  }
  // group sums of x, for the zero correction of gemv_avx512 and dp_avx512bf16
  const bool gemv = tiled && !g8 && !bf16_dot && isa >= Isa::Avx512 && B <= kGemvMaxB;
  if (has_zero && (gemv || bf16_dot)) {
    if (static_cast<int64_t>(xsum.size()) < B * NG) xsum.resize(B * NG);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < NG; ++g) xsum[b * NG + g] = sum16(xp + b * Kp + g * group_size, group_size);
  }

  Problem p{bf16_dot ? reinterpret_cast<const float*>(xpairs.data()) : xp, q.data_ptr<uint8_t>(), s.data_ptr<float>(),
            has_zero ? z.data_ptr<float>() : nullptr, xsum.data(), y.data_ptr(), y.scalar_type() == at::kBFloat16,
            B, N, K, Kp, group_size, NG};
#if defined(__x86_64__)
  if (tiled) {
    run_tiles(p, pick_tiles(isa, bf16_dot, g8, B));
    return y;
  }
#endif
  run_generic(p, isa);
  return y;
}

// "auto" restores the detected ISA; a request above it is lowered to it. Returns the ISA in use.
std::string lowbit_set_isa(const std::string& isa) {
  const Isa want = isa == "avx512bf16" ? Isa::Avx512Bf16
                   : isa == "avx512"   ? Isa::Avx512
                   : isa == "avx2"     ? Isa::Avx2
                   : isa == "scalar"   ? Isa::Scalar
                                       : kDetected;
  TORCH_CHECK(isa == "auto" || isa == "avx512bf16" || isa == "avx512" || isa == "avx2" || isa == "scalar",
              "lowbit_set_isa: expected auto, avx512bf16, avx512, avx2 or scalar, got ", isa);
  g_isa = static_cast<int>(want) <= static_cast<int>(kDetected) ? want : kDetected;
  return isa_name(g_isa);
}

std::string lowbit_isa() { return isa_name(g_isa); }

// ---------------------------------------------------------------------------------------------
// Integer path (lowbit_q8.h): int8 activations per block of 64, integer dot products. Chosen once
// (AVX-512 VNNI > AVX-VNNI > AVX2 > NEON > scalar); lowbit_set_int_isa lowers it (tests).

using lowbit_q8::IntIsa;
constexpr IntIsa kIntOrder[] = {IntIsa::Avx512Vnni, IntIsa::AvxVnni, IntIsa::Avx2, IntIsa::Neon, IntIsa::Scalar};

IntIsa detect_int_isa() {
  for (IntIsa isa : kIntOrder)
    if (lowbit_q8::cpu_has(isa)) return isa;
  return IntIsa::Scalar;
}

const IntIsa kIntDetected = detect_int_isa();
IntIsa g_int_isa = kIntDetected;

// x @ W^T with x quantized to int8 per block of 64 (the error bound is in lowbit_q8.h). Group sizes
// the ISA's tiles do not cover (a lane's groups must fit one vector: G a multiple of 4, at least 12
// on AVX-512) take the float kernels of lowbit_gemm.
at::Tensor lowbit_gemm_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t group_size, int64_t K) {
  check_gemm_args(x, qweight, scale, zero, group_size, K);
  const IntIsa isa = g_int_isa;
  thread_local lowbit_q8::Tables tables;
  if (!lowbit_q8::supports(isa, K, group_size, tables)) return lowbit_gemm(x, qweight, scale, zero, group_size, K);
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 4, NG = K / group_size, B = x.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor xc = x.contiguous(), q = qweight.contiguous(), s = scale.contiguous();
  const at::Tensor z = zero.numel() > 0 ? zero.contiguous() : zero;
  thread_local lowbit_q8::Acts acts;
  lowbit_q8::quantize_acts(xc.data_ptr(), bf16, B, K, K, group_size, lowbit_q8::chunk_blocks(isa), acts,
                           lowbit_q8::quant_block_fn(isa));
  const lowbit_q8::Problem p{q.data_ptr<uint8_t>(), s.data_ptr<float>(), z.numel() > 0 ? z.data_ptr<float>() : nullptr,
                             &acts, &tables, y.data_ptr(), bf16, N, K, Kp, group_size, NG};
  const lowbit_q8::TileSet& ts = lowbit_q8::tiles(isa, group_size % 64 != 0, B);
  const int64_t ntiles = (N + ts.R - 1) / ts.R;
  // a task holds at least 2^20 weight-rows: SmolLM2's layers (under 1M weights, ~10 us on one core)
  // stay on one thread, where a second saves a few microseconds but waits for a descheduled sibling
  // whenever the CPUs are shared (measured: 1.4 against 33 tokens/s decoding on 2 loaded cores)
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, ts.R * K * B));
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) { lowbit_q8::run_tiles(p, ts, begin, end); });
  return y;
}

// The same product by the wide tile (lowbit_q8.h: lanes are 16 weight rows), for batches: faster
// than lowbit_gemm_q8's tiles from a few rows on (kernels.py measures where). Problems it does not
// cover (no AVX-512 VNNI, G not a multiple of 64) take lowbit_gemm_q8. The same quantized activations,
// so the same bound; only the order of the fp32 sums differs.
at::Tensor lowbit_gemm_q8w(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group_size, int64_t K) {
#if defined(__x86_64__)
  check_gemm_args(x, qweight, scale, zero, group_size, K);
  const IntIsa isa = g_int_isa;
  if (!lowbit_q8::wide_supports(isa, group_size)) return lowbit_gemm_q8(x, qweight, scale, zero, group_size, K);
  const int64_t N = qweight.size(0), Kp = qweight.size(1) * 4, NG = K / group_size, B = x.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor xc = x.contiguous(), q = qweight.contiguous(), s = scale.contiguous();
  const at::Tensor z = zero.numel() > 0 ? zero.contiguous() : zero;
  thread_local lowbit_q8::Acts acts;
  thread_local lowbit_q8::WideActs wide;
  lowbit_q8::quantize_acts(xc.data_ptr(), bf16, B, K, K, group_size, 1, acts, lowbit_q8::quant_block_fn(isa));
  lowbit_q8::wide_acts(acts, wide);
  const lowbit_q8::Problem p{q.data_ptr<uint8_t>(), s.data_ptr<float>(), z.numel() > 0 ? z.data_ptr<float>() : nullptr,
                             &acts, nullptr, y.data_ptr(), bf16, N, K, Kp, group_size, NG};
  const int64_t ntiles = (N + lowbit_q8::kWideRows - 1) / lowbit_q8::kWideRows;
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, lowbit_q8::kWideRows * K * B));
  // the calling thread's buffers: a thread_local named inside the lambda would be each worker's own
  const lowbit_q8::WideActs* wa = &wide;
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) { lowbit_q8::run_wide(p, *wa, begin, end); });
  return y;
#else
  return lowbit_gemm_q8(x, qweight, scale, zero, group_size, K);
#endif
}

// ---------------------------------------------------------------------------------------------
// Dequantization for batches (torch's matmul then multiplies): the values of
// workbench.quant.quantizers.dequantize bit for bit, (code - zero) * scale in the output dtype (for
// bfloat16: each operand and each result rounded to bfloat16, as torch's bfloat16 ops do).

inline uint32_t bf16_round_bits(float v) {  // float -> the float bits of its bfloat16 rounding
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return u & 0xFFFF0000u;
}

inline float bf16_round(float v) {
  const uint32_t u = bf16_round_bits(v);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void dequant_row_out(const uint8_t* q, const float* s, const float* z, int64_t K, int64_t G, bool bf16, float* codes,
                 void* out) {
  for (int64_t j = 0; j < K / 64 + (K % 64 != 0); ++j)
    for (int qq = 0; qq < 4; ++qq)
      for (int m = 0; m < 16; ++m) codes[j * 64 + qq * 16 + m] = static_cast<float>((q[j * 16 + m] >> (2 * qq)) & 3);
  for (int64_t g = 0; g < K / G; ++g) {
    const float* c = codes + g * G;
    if (bf16) {
      const float zb = z ? bf16_round(z[g]) : 1.0f, sb = bf16_round(s[g]);
      uint16_t* o = static_cast<uint16_t*>(out) + g * G;
      for (int64_t i = 0; i < G; ++i) o[i] = static_cast<uint16_t>(bf16_round_bits(bf16_round(c[i] - zb) * sb) >> 16);
    } else {
      const float zf = z ? z[g] : 1.0f, sf = s[g];
      float* o = static_cast<float*>(out) + g * G;
      for (int64_t i = 0; i < G; ++i) o[i] = (c[i] - zf) * sf;
    }
  }
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
// dequant_row_out for group sizes that are multiples of 16 (a run of 16 codes lies in one group).
void dequant_row_avx512(const uint8_t* q, const float* s, const float* z, int64_t K, int64_t G, bool bf16,
                        void* out) {
  const __m512i m3 = _mm512_set1_epi32(3), r7 = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  auto round_bits = [&](__m512 v) __attribute__((always_inline)) {  // as bf16_round_bits
    const __m512i u = _mm512_castps_si512(v);
    return _mm512_add_epi32(u, _mm512_add_epi32(r7, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
  };
  for (int64_t j = 0; j * 64 < K; ++j) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * 16)));
    for (int qq = 0; qq < 4; ++qq) {
      const int64_t k = j * 64 + qq * 16, g = k / G;
      if (k >= K) break;
      const __m512 c = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(2 * qq)), m3));
      if (bf16) {
        const __m512 zb = _mm512_set1_ps(z ? bf16_round(z[g]) : 1.0f), sb = _mm512_set1_ps(bf16_round(s[g]));
        const __m512 t = _mm512_castsi512_ps(
            _mm512_and_si512(round_bits(_mm512_sub_ps(c, zb)), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
        const __m256i w = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits(_mm512_mul_ps(t, sb)), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + k), w);
      } else {
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z ? z[g] : 1.0f)), _mm512_set1_ps(s[g]));
        _mm512_storeu_ps(static_cast<float*>(out) + k, w);
      }
    }
  }
}
#pragma GCC pop_options
#endif

// out [N, K] (float32 or bfloat16, contiguous) = W from the packed codes, scales and zeros.
at::Tensor lowbit_dequant(at::Tensor out, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                          int64_t group_size, int64_t K) {
  const at::ScalarType dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "lowbit_dequant: out must be float32 or bfloat16");
  check_gemm_args(at::empty({0, K}, qweight.options().dtype(at::kFloat)), qweight, scale, zero, group_size, K);
  const int64_t N = qweight.size(0), row_bytes = qweight.size(1), NG = K / group_size;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == K && out.is_contiguous(),
              "lowbit_dequant: out must be contiguous [N, K]");
  const at::Tensor q = qweight.contiguous(), s = scale.contiguous();
  const at::Tensor z = zero.numel() > 0 ? zero.contiguous() : zero;
  const bool bf16 = dtype == at::kBFloat16;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.numel() > 0 ? z.data_ptr<float>() : nullptr;
  char* wp = static_cast<char*>(out.data_ptr());
  const int64_t esize = bf16 ? 2 : 4;
#if defined(__x86_64__)
  const bool avx512 = g_isa >= Isa::Avx512 && group_size % 16 == 0;
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t begin, int64_t end) {
    std::vector<float> codes(row_bytes * 4);
    for (int64_t n = begin; n < end; ++n) {
      const float* z_n = zp ? zp + n * NG : nullptr;
#if defined(__x86_64__)
      if (avx512) {
        dequant_row_avx512(qp + n * row_bytes, sp + n * NG, z_n, K, group_size, bf16, wp + n * K * esize);
        continue;
      }
#endif
      dequant_row_out(qp + n * row_bytes, sp + n * NG, z_n, K, group_size, bf16, codes.data(), wp + n * K * esize);
    }
  });
  return out;
}

// "auto" restores the detected ISA; one this CPU lacks is lowered to the best it has below it in
// kIntOrder. Returns the ISA in use.
std::string lowbit_set_int_isa(const std::string& name) {
  if (name == "auto") {
    g_int_isa = kIntDetected;
    return lowbit_q8::isa_name(g_int_isa);
  }
  bool below = false;
  for (IntIsa isa : kIntOrder) {
    below = below || name == lowbit_q8::isa_name(isa);
    if (below && lowbit_q8::cpu_has(isa)) {
      g_int_isa = isa;
      return lowbit_q8::isa_name(isa);
    }
  }
  TORCH_CHECK(false, "lowbit_set_int_isa: expected auto, avx512vnni, avxvnni, avx2, neon or scalar, got ", name);
}

std::string lowbit_int_isa() { return lowbit_q8::isa_name(g_int_isa); }

// y += scaling * (x @ A^T) @ B^T for the LoRA adapters of a layer, in place (float32 only). At decode
// sizes (a few rows, rank 4-64) two torch matmuls cost tens of microseconds of dispatch each; these
// loops cost a few. The same loops are compiled for AVX2+FMA and for plain x86-64.
template <bool kUnused>
inline void lora_loops(const float* xp, const float* ap, const float* bp, float* yp, float* tp, int64_t R,
                       int64_t K, int64_t r, int64_t N, float scaling) {
  for (int64_t b = 0; b < R; ++b)
    for (int64_t j = 0; j < r; ++j) {
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += ap[j * K + k] * xp[b * K + k];
      tp[b * r + j] = acc * scaling;
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < R; ++b) {
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < r; ++j) acc += bp[n * r + j] * tp[b * r + j];
      yp[b * N + n] += acc;
    }
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void lora_avx2(const float* xp, const float* ap, const float* bp, float* yp, float* tp, int64_t R, int64_t K,
               int64_t r, int64_t N, float scaling) {
  lora_loops<true>(xp, ap, bp, yp, tp, R, K, r, N, scaling);
}
#pragma GCC pop_options
#endif

void lora_scalar(const float* xp, const float* ap, const float* bp, float* yp, float* tp, int64_t R, int64_t K,
                 int64_t r, int64_t N, float scaling) {
  lora_loops<false>(xp, ap, bp, yp, tp, R, K, r, N, scaling);
}

at::Tensor lowbit_lora_add(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                           double scaling) {
  TORCH_CHECK(x.dim() == 2 && A.dim() == 2 && B.dim() == 2 && y.dim() == 2, "lowbit_lora_add: 2-D tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
                  y.scalar_type() == at::kFloat,
              "lowbit_lora_add: float32 tensors expected");
  const int64_t R = x.size(0), K = x.size(1), r = A.size(0), N = B.size(0);
  TORCH_CHECK(A.size(1) == K && B.size(1) == r && y.size(0) == R && y.size(1) == N && y.is_contiguous(),
              "lowbit_lora_add: shapes do not match: x [R, K], A [r, K], B [N, r], y [R, N] contiguous");
  const at::Tensor xc = x.contiguous(), ac = A.contiguous(), bc = B.contiguous();
  thread_local std::vector<float> t;
  if (static_cast<int64_t>(t.size()) < R * r) t.resize(R * r);
#if defined(__x86_64__)
  auto loops = g_isa >= Isa::Avx2 ? lora_avx2 : lora_scalar;
#else
  auto loops = lora_scalar;
#endif
  loops(xc.data_ptr<float>(), ac.data_ptr<float>(), bc.data_ptr<float>(), y.data_ptr<float>(), t.data(), R, K, r, N,
        static_cast<float>(scaling));
  return y;
}

}  // namespace

TORCH_LIBRARY(workbench_lowbit, m) {
  m.def("lowbit_gemm(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size, int K) -> Tensor");
  m.def("lowbit_set_isa(str isa) -> str", &lowbit_set_isa);
  m.def("lowbit_isa() -> str", &lowbit_isa);
  m.def("lowbit_gemm_q8(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size, int K) -> Tensor");
  m.def("lowbit_gemm_q8w(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group_size, int K) -> Tensor");
  m.def("lowbit_set_int_isa(str isa) -> str", &lowbit_set_int_isa);
  m.def("lowbit_dequant(Tensor(a!) out, Tensor qweight, Tensor scale, Tensor zero, int group_size, int K) -> Tensor(a!)");
  m.def("lowbit_int_isa() -> str", &lowbit_int_isa);
  m.def("lowbit_lora_add(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scaling) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(workbench_lowbit, CPU, m) {
  m.impl("lowbit_gemm", &lowbit_gemm);
  m.impl("lowbit_gemm_q8", &lowbit_gemm_q8);
  m.impl("lowbit_gemm_q8w", &lowbit_gemm_q8w);
  m.impl("lowbit_dequant", &lowbit_dequant);
  m.impl("lowbit_lora_add", &lowbit_lora_add);
}
