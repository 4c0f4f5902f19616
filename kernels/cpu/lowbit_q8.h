// Integer kernels for the 2-bit block-64 layout (workbench/quant/packing.py), free of torch so that
// kernels/cpu/test_driver.cpp builds them for aarch64 and runs them under qemu.
//
//   y[b, n] = sum_k xhat[b, k] * (code[n, k] - zero[n, k / G]) * scale[n, k / G]
//
// xhat is the activation quantized to int8 per block of 64 (the layout's block): xq = rint(x / dx),
// dx = max|x| / 127 over the block, xhat = dx * xq. Codes (0..3) times xq are summed exactly in int32 by
// the integer dot instructions (AVX-512 VNNI / AVX-VNNI vpdpbusd, AVX2 vpmaddubsw, NEON sdot); each
// int32 lane (4 codes) is then scaled by scale * dx in fp32, and the zero enters once per group as
// scale * zero * sum(xhat over the group). The only error besides fp32 rounding is xhat - x, at most
// dx / 2 per element, so  |y - y_float| <= sum over blocks j of max|x_j| / 254 * sum_{k in j} |w[n, k]|.
//
// Chunks: one code vector holds CB blocks (AVX-512 4, AVX2 / AVX-VNNI 2, NEON and scalar 1). Byte m of a
// block holds elements m, m+16, m+32, m+48, so (v >> 2q) & 3 gives quarter q of every block in the
// vector; the activations are reordered once per call (quantize_acts) so that one load matches it.
// Int32 lane l of a chunk covers 4 consecutive elements of block l / 4 (16q + 4 (l % 4) + 0..3): with
// G a multiple of 64 all four quarters share a lane's group and one accumulator serves a chunk; other
// group sizes (a multiple of 4) scale each quarter on its own. A lane's scale comes from a table of
// group indices (Tables) and a permute of the scales loaded at the chunk's first group.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace lowbit_q8 {

enum class IntIsa { Scalar = 0, Neon = 1, Avx2 = 2, AvxVnni = 3, Avx512Vnni = 4 };

inline const char* isa_name(IntIsa isa) {
  switch (isa) {
    case IntIsa::Avx512Vnni: return "avx512vnni";
    case IntIsa::AvxVnni: return "avxvnni";
    case IntIsa::Avx2: return "avx2";
    case IntIsa::Neon: return "neon";
    default: return "scalar";
  }
}

// Blocks of 64 codes per code vector, and int32 lanes per vector (4 per block).
inline int chunk_blocks(IntIsa isa) {
  return isa == IntIsa::Avx512Vnni ? 4 : (isa == IntIsa::Avx2 || isa == IntIsa::AvxVnni) ? 2 : 1;
}

// B activation rows quantized per block of 64, laid out for chunks of CB blocks.
struct Acts {
  std::vector<int8_t> xq;  // [B, Kx]: chunk c, quarter q, block j, m -> c*64CB + q*16CB + 16j + m
  std::vector<float> dx;   // [B, NB] block scales
  std::vector<float> dxl;  // [B, nch * 4CB] lane scales: lane l of chunk c has dx[c * CB + l / 4]
  std::vector<float> xg;   // [B, NG] sums of xhat over each group
  int64_t B = 0, K = 0, Kx = 0, NB = 0, NG = 0, G = 0;
  int CB = 1;
};

// Per (chunk, quarter): the group of each int32 lane relative to g0, the chunk's first group, and how
// many scales to load from g0 (the rest of the row may be shorter than a vector).
struct Tables {
  std::vector<int32_t> rel, g0, cnt;  // rel [nch * 4, 4CB]; g0, cnt [nch * 4]
  int64_t K = -1, G = -1;
  int CB = 0;
  bool ok = false;  // every chunk's lanes span fewer groups than a vector has lanes
};

inline void make_tables(int64_t K, int64_t G, int CB, Tables& t) {
  if (t.K == K && t.G == G && t.CB == CB) return;
  const int L = 4 * CB;
  const int64_t Kx = (K + 64 * CB - 1) / (64 * CB) * (64 * CB), nch = Kx / (64 * CB), NG = K / G;
  t.rel.assign(nch * 4 * L, 0);
  t.g0.assign(nch * 4, 0);
  t.cnt.assign(nch * 4, 0);
  t.ok = G % 4 == 0;
  for (int64_t c = 0; c < nch; ++c)
    for (int q = 0; q < 4; ++q) {
      const int64_t i = c * 4 + q, first = (c * 64 * CB + 16 * q) / G;
      t.g0[i] = static_cast<int32_t>(std::min(first, NG - 1));
      t.cnt[i] = static_cast<int32_t>(std::min<int64_t>(L, NG - t.g0[i]));
      for (int l = 0; l < L; ++l) {
        const int64_t k = c * 64 * CB + 64 * (l / 4) + 16 * q + 4 * (l % 4);
        if (k >= K) continue;  // padding: its activations are 0, any scale will do
        const int64_t rel = k / G - t.g0[i];
        if (rel >= L) t.ok = false;
        t.rel[i * L + l] = static_cast<int32_t>(rel < L ? rel : 0);
      }
    }
  t.K = K;
  t.G = G;
  t.CB = CB;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Quantizes 64 floats to int8 (rint(x * 127 / max|x|)); returns max|x|. Every ISA's version does the
// same float operations (a product, then round to nearest even), so every path multiplies the same xq.
using QuantBlockFn = float (*)(const float* x, int8_t* q);

inline float quant_block_scalar(const float* x, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int i = 0; i < 64; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * id));
  return amax;
}

// Quantizes B rows of K activations (float, or bfloat16 bits when `bf16`), rows `ld` elements apart,
// laid out for chunks of CB blocks.
inline void quantize_acts(const void* x, bool bf16, int64_t B, int64_t K, int64_t ld, int64_t G, int CB, Acts& a,
                          QuantBlockFn quant_block = quant_block_scalar) {
  const int L = 4 * CB;
  a.B = B;
  a.K = K;
  a.G = G;
  a.CB = CB;
  a.NB = (K + 63) / 64;
  a.NG = K / G;
  a.Kx = (K + 64 * CB - 1) / (64 * CB) * (64 * CB);
  const int64_t nch = a.Kx / (64 * CB);
  a.xq.resize(B * a.Kx);
  a.dx.resize(B * a.NB);
  a.dxl.resize(B * nch * L);
  a.xg.assign(B * a.NG, 0.0f);
  if (a.Kx > a.NB * 64)  // whole padding blocks of the last chunk
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = a.NB; j < a.Kx / 64; ++j) {
        const int64_t c = j / CB, jj = j % CB;
        for (int q = 0; q < 4; ++q) std::memset(a.xq.data() + b * a.Kx + c * 64 * CB + q * 16 * CB + 16 * jj, 0, 16);
        for (int l = 0; l < 4; ++l) a.dxl[(b * nch + c) * L + 4 * jj + l] = 0.0f;
      }
  alignas(64) float blk[64];
  alignas(64) int8_t qb[64];
  for (int64_t b = 0; b < B; ++b) {
    int8_t* xq = a.xq.data() + b * a.Kx;
    float* xg = a.xg.data() + b * a.NG;
    for (int64_t j = 0; j < a.NB; ++j) {
      const int64_t k0 = j * 64, n = std::min<int64_t>(64, K - k0);
      if (bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(x) + b * ld + k0;
        for (int64_t i = 0; i < n; ++i) blk[i] = bf16_to_float(src[i]);
      } else {
        std::memcpy(blk, static_cast<const float*>(x) + b * ld + k0, n * sizeof(float));
      }
      for (int64_t i = n; i < 64; ++i) blk[i] = 0.0f;
      const float amax = quant_block(blk, qb), d = amax / 127.0f;
      a.dx[b * a.NB + j] = d;
      const int64_t c = j / CB, jj = j % CB;
      for (int q = 0; q < 4; ++q) std::memcpy(xq + c * 64 * CB + q * 16 * CB + 16 * jj, qb + 16 * q, 16);
      for (int l = 0; l < 4; ++l) a.dxl[(b * nch + c) * L + 4 * jj + l] = d;
      // group sums of xhat: an exact int32 sum per (block, group) piece, then d times it
      for (int64_t i0 = 0; i0 < n;) {
        const int64_t g = (k0 + i0) / G, i1 = std::min<int64_t>(n, (g + 1) * G - k0);
        int32_t isum = 0;
        for (int64_t i = i0; i < i1; ++i) isum += qb[i];
        xg[g] += d * static_cast<float>(isum);
        i0 = i1;
      }
    }
  }
}

// The problem one call solves: N weight rows against the quantized activations `a`.
struct Problem {
  const uint8_t* q;    // [N, Kp / 4]
  const float* scale;  // [N, NG]
  const float* zero;   // [N, NG], or nullptr (ternary: zero 1)
  const Acts* a;
  const Tables* t;     // SIMD paths only
  void* y;             // [B, N] float, or bfloat16 bits when y_bf16
  bool y_bf16;
  int64_t N, K, Kp, G, NG;
};

inline void store(const Problem& p, int64_t b, int64_t n, float v) {
  if (p.y_bf16)
    static_cast<uint16_t*>(p.y)[b * p.N + n] = float_to_bf16(v);
  else
    static_cast<float*>(p.y)[b * p.N + n] = v;
}

// sum_g scale[g] * zero[g] * xg[g] (zero 1 when null): the zeros' share of one output
inline float zero_term_scalar(const float* s, const float* z, const float* xg, int64_t ng) {
  float acc = 0.0f;
  for (int64_t g = 0; g < ng; ++g) acc += s[g] * (z ? z[g] : 1.0f) * xg[g];
  return acc;
}

// Any group size; activations laid out for CB = 1 (the natural order). Row n against activation row b.
inline void tile_scalar(const Problem& p, int64_t n, int64_t b) {
  const Acts& a = *p.a;
  const uint8_t* qr = p.q + n * (p.Kp / 4);
  const float* s = p.scale + n * p.NG;
  const float* z = p.zero ? p.zero + n * p.NG : nullptr;
  const int8_t* xq = a.xq.data() + b * a.Kx;
  const float* dx = a.dx.data() + b * a.NB;
  float acc = 0.0f;
  for (int64_t j = 0; j < a.NB; ++j) {
    int64_t g = (j * 64) / p.G;
    int32_t isum = 0;
    for (int64_t i = 0; i < 64 && j * 64 + i < p.K; ++i) {
      const int64_t k = j * 64 + i;
      if (k / p.G != g) {  // a group boundary inside the block
        acc += s[g] * dx[j] * static_cast<float>(isum);
        isum = 0;
        g = k / p.G;
      }
      const int code = (qr[j * 16 + (i & 15)] >> (2 * (i >> 4))) & 3;
      isum += code * xq[k];
    }
    acc += s[g] * dx[j] * static_cast<float>(isum);
  }
  store(p, b, n, acc - zero_term_scalar(s, z, a.xg.data() + b * a.NG, p.NG));
}

// Prefetches the next tile's codes, scales and zeros (rows n0 + R ...) while a tile computes: a tile's
// rows are short (1 KB of codes at K = 4096), too short for the hardware prefetchers to ramp up on.
// Each step (a chunk) fetches the next tile's share of codes (R rows x chunk_bytes: they end together)
// and a line of its scales and zeros (which end sooner); no divisions, as small layers have tens of
// thousands of tiles per second.
struct NextRows {
  const char* cur[3] = {nullptr, nullptr, nullptr};
  const char* end[3] = {nullptr, nullptr, nullptr};
  int64_t step_bytes[3] = {0, 64, 64};

  NextRows(const Problem& p, int64_t n0, int64_t R, int64_t chunk_bytes) {
    const int64_t n = n0 + R;
    if (n >= p.N) return;
    const int64_t rows = std::min(R, p.N - n);
    const char* base[3] = {reinterpret_cast<const char*>(p.q + n * (p.Kp / 4)),
                           reinterpret_cast<const char*>(p.scale + n * p.NG),
                           p.zero ? reinterpret_cast<const char*>(p.zero + n * p.NG) : nullptr};
    const int64_t bytes[3] = {rows * (p.Kp / 4), rows * p.NG * 4, rows * p.NG * 4};
    step_bytes[0] = std::max<int64_t>(64, R * chunk_bytes);
    for (int i = 0; i < 3; ++i) {
      if (!base[i]) continue;
      cur[i] = base[i];
      end[i] = base[i] + bytes[i];
    }
  }

  inline void step() {
    for (int i = 0; i < 3; ++i)
      for (int64_t off = 0; off < step_bytes[i] && cur[i] < end[i]; off += 64, cur[i] += 64) fetch(cur[i]);
  }

  static inline void fetch(const char* p) {
#if defined(__x86_64__)
    // asm, not __builtin_prefetch: GCC's loop distribution moves prefetch calls into a loop of their
    // own, which it then deletes as having no effect
    asm volatile("prefetcht0 %0" : : "m"(*p));
#else
    __builtin_prefetch(p);
#endif
  }
};

}  // namespace lowbit_q8

// ---------------------------------------------------------------------------------------------------
// x86: AVX-512 VNNI (chunks of 4 blocks, 16 lanes), AVX-VNNI and AVX2 (chunks of 2 blocks, 8 lanes).

#if defined(__x86_64__)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")
namespace lowbit_q8 {

inline float quant_block_avx512(const float* x, int8_t* q) {
  __m512 v[4], m = _mm512_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_loadu_ps(x + 16 * i);
    m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
  }
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  for (int i = 0; i < 4; ++i)  // vcvtps2dq rounds to nearest even, as nearbyint
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v[i], id))));
  return amax;
}

inline float zero_term_avx512(const float* s, const float* z, const float* xg, int64_t ng) {
  __m512 c = _mm512_setzero_ps();
  for (int64_t i = 0; i < ng; i += 16) {
    const __mmask16 m = ng - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (ng - i)) - 1);
    const __m512 sz = z ? _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, z + i))
                        : _mm512_maskz_loadu_ps(m, s + i);
    c = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(m, xg + i), c);
  }
  return _mm512_reduce_add_ps(c);
}

// Rows n0 .. n0+R-1 against activation rows b0 .. b0+BT-1; PerQ: each quarter scaled on its own
// (group sizes that are not a multiple of 64).
template <int R, int BT, bool PerQ>
void tile_avx512vnni(const Problem& p, int64_t n0, int64_t b0) {
  const Acts& a = *p.a;
  const Tables& tb = *p.t;
  const int64_t row_bytes = p.Kp / 4, nch = a.Kx / 256;
  const __m512i m3 = _mm512_set1_epi8(3);
  const __m128i shift[4] = {_mm_cvtsi32_si128(0), _mm_cvtsi32_si128(2), _mm_cvtsi32_si128(4), _mm_cvtsi32_si128(6)};
  __m512 acc[R][BT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < BT; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
  }
  const int8_t* xb[BT];
  const float* lb[BT];
  for (int t = 0; t < BT; ++t) {
    xb[t] = a.xq.data() + (b0 + t) * a.Kx;
    lb[t] = a.dxl.data() + (b0 + t) * nch * 16;
  }
  NextRows next(p, n0, R, 64);
  for (int64_t c = 0; c < nch; ++c) {
    next.step();
    const int64_t left = row_bytes - c * 64;
    const __mmask64 cm = left >= 64 ? ~0ULL : (1ULL << left) - 1;
    __m512i v[R], ia[R][BT];
    for (int r = 0; r < R; ++r) v[r] = _mm512_maskz_loadu_epi8(cm, qr[r] + c * 64);
    auto finish = [&](int q) __attribute__((always_inline)) {
      const int64_t i = c * 4 + q;
      const __m512i idx = _mm512_loadu_si512(tb.rel.data() + i * 16);
      const __mmask16 sm = static_cast<__mmask16>((1u << tb.cnt[i]) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 sv = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, sr[r] + tb.g0[i]));
        for (int t = 0; t < BT; ++t)
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][t]), _mm512_mul_ps(sv, _mm512_loadu_ps(lb[t] + c * 16)),
                                      acc[r][t]);
      }
    };
    for (int q = 0; q < 4; ++q) {
      __m512i xv[BT];
      for (int t = 0; t < BT; ++t) xv[t] = _mm512_loadu_si512(xb[t] + c * 256 + q * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i cq = _mm512_and_si512(_mm512_srl_epi16(v[r], shift[q]), m3);
        for (int t = 0; t < BT; ++t)
          ia[r][t] = _mm512_dpbusd_epi32((PerQ || q == 0) ? _mm512_setzero_si512() : ia[r][t], cq, xv[t]);
      }
      if (PerQ) finish(q);
    }
    if (!PerQ) finish(0);
  }
  for (int r = 0; r < R; ++r) {
    const float* z = p.zero ? p.zero + (n0 + r) * p.NG : nullptr;
    for (int t = 0; t < BT; ++t)
      store(p, b0 + t, n0 + r,
            _mm512_reduce_add_ps(acc[r][t]) - zero_term_avx512(sr[r], z, a.xg.data() + (b0 + t) * a.NG, p.NG));
  }
}


// ---------------------------------------------------------------------------------------------------
// The wide tile (batches, AVX-512 VNNI, G a multiple of 64): lanes are 16 weight rows, not positions
// along K. A 64-byte vector holds dword d (codes of elements 16q + 4d + 0..3 at shift 2q) of block j
// for 16 rows; vpdpbusd multiplies it by 4 activations of one row broadcast to every lane, so a block
// of 64 elements x 16 rows x BT activation rows is 16 BT vpdpbusd and the float work (convert, times
// dx, times the rows' scales: 3 ops, plus the zero's once per group) is done once per block and
// activation row instead of once per 4 vpdpbusd as in tile_avx512vnni. Measured on 2 Zen 4 cores at
// 4096 x 4096: about 1.6x tile_avx512vnni's speed at 16-64 rows (see kernels.py).
// The 16 rows are first gathered into this layout (WideTile, 16 KB at K = 4096), the activations
// into groups of BT rows whose 4-byte pieces interleave (WideActs), so every load is base + constant.

constexpr int kWideRows = 16;
constexpr int kWideMaxBT = 12;  // 12 int32 and 12 fp32 accumulators: 24 of the 32 vector registers

struct WideActs {
  std::vector<int32_t> x;   // group (b0, bt): [K / 4][bt] from b0 * K / 4
  std::vector<float> dx;    // group: [NB][bt] from b0 * NB
  std::vector<float> xg;    // group: [NG][bt] from b0 * NG
  std::vector<int64_t> b0;  // group starts, then B
};

// Splits B rows into ceil(B / kWideMaxBT) groups of near-equal size and interleaves each group.
inline void wide_acts(const Acts& a, WideActs& w) {
  const int64_t B = a.B, K4 = a.Kx / 4, ngroups = (B + kWideMaxBT - 1) / kWideMaxBT;
  w.x.resize(B * K4);
  w.dx.resize(B * a.NB);
  w.xg.resize(B * a.NG);
  w.b0.assign(1, 0);
  for (int64_t i = 0; i < ngroups; ++i) w.b0.push_back(w.b0.back() + B / ngroups + (i < B % ngroups));
  for (int64_t i = 0; i < ngroups; ++i) {
    const int64_t b0 = w.b0[i], bt = w.b0[i + 1] - b0;
    for (int64_t t = 0; t < bt; ++t) {
      const int8_t* src = a.xq.data() + (b0 + t) * a.Kx;
      int32_t* dst = w.x.data() + b0 * K4 + t;
      for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(dst + k4 * bt, src + 4 * k4, 4);
      for (int64_t j = 0; j < a.NB; ++j) w.dx[b0 * a.NB + j * bt + t] = a.dx[(b0 + t) * a.NB + j];
      for (int64_t g = 0; g < a.NG; ++g) w.xg[b0 * a.NG + g * bt + t] = a.xg[(b0 + t) * a.NG + g];
    }
  }
}

struct WideTile {
  std::vector<int32_t> codes;  // [NB][4 dwords][16 rows]
  std::vector<float> s, sz;    // [NG][16 rows]: scale, scale * zero (rows past N: 0)
};

inline void wide_pack(const Problem& p, int64_t n0, WideTile& w) {
  const int64_t NB = p.K / 64, row_bytes = p.Kp / 4, rows = std::min<int64_t>(kWideRows, p.N - n0);
  w.codes.resize(NB * 4 * kWideRows);
  w.s.resize(p.NG * kWideRows);
  w.sz.resize(p.NG * kWideRows);
  // rows past N read row n0 (any valid row): their scales are 0 and their outputs are not stored
  const uint8_t* qr[kWideRows];
  for (int i = 0; i < kWideRows; ++i) qr[i] = p.q + (n0 + (i < rows ? i : 0)) * row_bytes;
  // a 16 x 4 dword transpose per block (gathers cost ~50 cycles each on Zen 4): z[h] holds rows
  // 4h .. 4h+3, one per 128-bit lane; dword d of row i is element 4 (i % 4) + d of z[i / 4]
  __m512i idx[4];
  for (int d = 0; d < 4; ++d) {
    alignas(64) int32_t v[16];
    for (int i = 0; i < 16; ++i) v[i] = ((i % 8) < 4 ? 0 : 16) + 4 * (i % 4) + d;
    idx[d] = _mm512_load_si512(v);
  }
  for (int64_t j = 0; j < NB; ++j) {
    __m512i z[4];
    for (int h = 0; h < 4; ++h) {
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[4 * h] + 16 * j)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[4 * h + 1] + 16 * j)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[4 * h + 2] + 16 * j)), 2);
      z[h] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[4 * h + 3] + 16 * j)), 3);
    }
    for (int d = 0; d < 4; ++d) {
      const __m512i lo = _mm512_permutex2var_epi32(z[0], idx[d], z[1]), hi = _mm512_permutex2var_epi32(z[2], idx[d], z[3]);
      _mm512_storeu_si512(w.codes.data() + (j * 4 + d) * kWideRows, _mm512_mask_blend_epi32(0xFF00, lo, hi));
    }
  }
  for (int64_t i = 0; i < kWideRows; ++i) {
    const float* s = p.scale + (n0 + i) * p.NG;
    const float* z = p.zero ? p.zero + (n0 + i) * p.NG : nullptr;
    for (int64_t g = 0; g < p.NG; ++g) {
      const float sv = i < rows ? s[g] : 0.0f;
      w.s[g * kWideRows + i] = sv;
      w.sz[g * kWideRows + i] = z && i < rows ? sv * z[g] : sv;
    }
  }
}

inline void wide_store(const Problem& p, int64_t b, int64_t n0, int64_t rows, __m512 v) {
  const __mmask16 m = static_cast<__mmask16>((1u << rows) - 1);
  if (!p.y_bf16) {
    _mm512_mask_storeu_ps(static_cast<float*>(p.y) + b * p.N + n0, m, v);
    return;
  }
  const __m512i u = _mm512_castps_si512(v);  // round to nearest even, NaN to 0x7FC0, as float_to_bf16
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                       _mm512_set1_epi32(1)))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + b * p.N + n0, m, _mm512_cvtepi32_epi16(r));
}

// Tile rows n0 .. n0 + rows - 1 (packed in w) against activation group (b0, BT).
template <int BT>
void wide_avx512vnni(const Problem& p, const WideTile& w, const WideActs& wa, int64_t n0, int64_t rows, int64_t b0) {
  const Acts& a = *p.a;
  const int64_t NB = p.K / 64, bpg = p.G / 64;
  const int32_t* x = wa.x.data() + b0 * (a.Kx / 4);
  const float* dx = wa.dx.data() + b0 * a.NB;
  const float* xg = wa.xg.data() + b0 * a.NG;
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512 acc[BT];
  __m512i ia[BT];
  for (int t = 0; t < BT; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i* cv = reinterpret_cast<const __m512i*>(w.codes.data());
  for (int64_t j = 0, g = 0; j < NB; ++j) {
    for (int t = 0; t < BT; ++t) ia[t] = _mm512_setzero_si512();
    for (int d = 0; d < 4; ++d) {
      const __m512i v = _mm512_loadu_si512(cv + j * 4 + d);
      for (int q = 0; q < 4; ++q) {
        const __m512i c = q == 0 ? _mm512_and_si512(v, m3) : _mm512_and_si512(_mm512_srli_epi16(v, 2 * q), m3);
        const int32_t* xk = x + (j * 16 + q * 4 + d) * BT;  // element 64j + 16q + 4d of each row
        for (int t = 0; t < BT; ++t) ia[t] = _mm512_dpbusd_epi32(ia[t], c, _mm512_set1_epi32(xk[t]));
      }
    }
    const __m512 sv = _mm512_loadu_ps(w.s.data() + g * kWideRows);
    for (int t = 0; t < BT; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ia[t]), _mm512_set1_ps(dx[j * BT + t])), sv, acc[t]);
    if ((j + 1) % bpg == 0) {  // the group ends: subtract scale * zero * sum(xhat over the group)
      const __m512 szv = _mm512_loadu_ps(w.sz.data() + g * kWideRows);
      for (int t = 0; t < BT; ++t) acc[t] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(xg[g * BT + t]), acc[t]);
      ++g;
    }
  }
  for (int t = 0; t < BT; ++t) wide_store(p, b0 + t, n0, rows, acc[t]);
}

using WideFn = void (*)(const Problem&, const WideTile&, const WideActs&, int64_t, int64_t, int64_t);

// Tiles [tile0, tile1) of kWideRows rows against every activation group.
inline void run_wide(const Problem& p, const WideActs& wa, int64_t tile0, int64_t tile1) {
  static const WideFn fns[kWideMaxBT] = {wide_avx512vnni<1>, wide_avx512vnni<2>,  wide_avx512vnni<3>,
                                         wide_avx512vnni<4>, wide_avx512vnni<5>,  wide_avx512vnni<6>,
                                         wide_avx512vnni<7>, wide_avx512vnni<8>,  wide_avx512vnni<9>,
                                         wide_avx512vnni<10>, wide_avx512vnni<11>, wide_avx512vnni<12>};
  thread_local WideTile w;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t n0 = tile * kWideRows, rows = std::min<int64_t>(kWideRows, p.N - n0);
    wide_pack(p, n0, w);
    for (size_t i = 0; i + 1 < wa.b0.size(); ++i)
      fns[wa.b0[i + 1] - wa.b0[i] - 1](p, w, wa, n0, rows, wa.b0[i]);
  }
}

// Whether the wide tile runs this problem: AVX-512 VNNI, G a multiple of 64.
inline bool wide_supports(IntIsa isa, int64_t G) { return isa == IntIsa::Avx512Vnni && G % 64 == 0; }
}  // namespace lowbit_q8
#pragma GCC pop_options

#define LOWBIT_Q8_VNNI 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#include "lowbit_q8_256.inc"
#pragma GCC pop_options
#undef LOWBIT_Q8_VNNI

#define LOWBIT_Q8_VNNI 0
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "lowbit_q8_256.inc"
#pragma GCC pop_options
#undef LOWBIT_Q8_VNNI

namespace lowbit_q8 {
inline bool cpu_has(IntIsa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case IntIsa::Avx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
    case IntIsa::AvxVnni:
      return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case IntIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case IntIsa::Scalar:
      return true;
    default:
      return false;
  }
}
}  // namespace lowbit_q8

#endif  // __x86_64__

// ---------------------------------------------------------------------------------------------------
// aarch64: NEON sdot (vdotq_s32), chunks of one block, 4 lanes. Group sizes that are a multiple of 16
// (a quarter lies in one group); others take rows_scalar. Where the compiler's target lacks dotprod
// (GCC's default armv8-a), the kernel is compiled for armv8.2-a+dotprod and used after a runtime check.

#if defined(__aarch64__)

#if !defined(__ARM_FEATURE_DOTPROD) && defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_Q8_NEON_PRAGMA 1
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
#if defined(__ARM_FEATURE_DOTPROD) || defined(LOWBIT_Q8_NEON_PRAGMA)
#define LOWBIT_Q8_HAS_NEON 1
namespace lowbit_q8 {

template <int R>
void tile_neon(const Problem& p, int64_t n0, int64_t b) {
  const Acts& a = *p.a;
  const int64_t row_bytes = p.Kp / 4;
  const bool perq = p.G % 64 != 0;
  const uint8x16_t m3 = vdupq_n_u8(3);
  const int8_t* xq = a.xq.data() + b * a.Kx;
  const float* dx = a.dx.data() + b * a.NB;
  float32x4_t acc[R];
  const uint8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = vdupq_n_f32(0.0f);
    qr[r] = p.q + (n0 + r) * row_bytes;
    sr[r] = p.scale + (n0 + r) * p.NG;
  }
  NextRows next(p, n0, R, 16);
  for (int64_t j = 0; j < a.NB; ++j) {
    next.step();
    int8x16_t xv[4];
    for (int q = 0; q < 4; ++q) xv[q] = vld1q_s8(xq + j * 64 + q * 16);
    for (int r = 0; r < R; ++r) {
      const uint8x16_t v = vld1q_u8(qr[r] + j * 16);
      const int8x16_t c[4] = {vreinterpretq_s8_u8(vandq_u8(v, m3)),
                              vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)),
                              vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)),
                              vreinterpretq_s8_u8(vshrq_n_u8(v, 6))};
      if (!perq) {
        int32x4_t ia = vdupq_n_s32(0);
        for (int q = 0; q < 4; ++q) ia = vdotq_s32(ia, c[q], xv[q]);
        acc[r] = vmlaq_n_f32(acc[r], vcvtq_f32_s32(ia), sr[r][(j * 64) / p.G] * dx[j]);
      } else {
        for (int q = 0; q < 4 && j * 64 + 16 * q < p.K; ++q) {
          const int32x4_t ia = vdotq_s32(vdupq_n_s32(0), c[q], xv[q]);
          acc[r] = vmlaq_n_f32(acc[r], vcvtq_f32_s32(ia), sr[r][(j * 64 + 16 * q) / p.G] * dx[j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* z = p.zero ? p.zero + (n0 + r) * p.NG : nullptr;
    store(p, b, n0 + r, vaddvq_f32(acc[r]) - zero_term_scalar(sr[r], z, a.xg.data() + b * a.NG, p.NG));
  }
}

}  // namespace lowbit_q8
#endif
#if defined(LOWBIT_Q8_NEON_PRAGMA)
#pragma GCC pop_options
#endif

namespace lowbit_q8 {
inline bool cpu_has(IntIsa isa) {
  if (isa == IntIsa::Scalar) return true;
#if defined(LOWBIT_Q8_HAS_NEON)
  if (isa == IntIsa::Neon) {
#if defined(__ARM_FEATURE_DOTPROD)
    return true;
#elif defined(__linux__) && defined(HWCAP_ASIMDDP)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return false;
#endif
  }
#endif
  return false;
}
}  // namespace lowbit_q8

#endif  // __aarch64__

#if !defined(__x86_64__) && !defined(__aarch64__)
namespace lowbit_q8 {
inline bool cpu_has(IntIsa isa) { return isa == IntIsa::Scalar; }
}  // namespace lowbit_q8
#endif

// ---------------------------------------------------------------------------------------------------
// Tiles: R weight rows x up to BT activation rows per call; full[bt - 1] takes R rows, one[bt - 1] a
// single row (the last N % R rows).

namespace lowbit_q8 {

using TileFn = void (*)(const Problem&, int64_t, int64_t);
struct TileSet {
  int64_t R, BT;
  TileFn full[4], one[4];
};

// Whether `isa` runs group size G at K (else the caller takes another path), filling `t`.
inline bool supports(IntIsa isa, int64_t K, int64_t G, Tables& t) {
  if (isa == IntIsa::Scalar) return true;
  if (isa == IntIsa::Neon) return G % 16 == 0;
  make_tables(K, G, chunk_blocks(isa), t);
  return t.ok;
}

// The tiles for `isa` at B activation rows (PerQ: G not a multiple of 64).
inline const TileSet& tiles(IntIsa isa, bool perq, int64_t B) {
  static const TileSet scalar{1, 1, {tile_scalar}, {tile_scalar}};
#if defined(__x86_64__)
#define Q8_SETS(fn, P)                                                                          \
  static const TileSet fn##_1_##P{4, 1, {fn<4, 1, P>}, {fn<1, 1, P>}};                           \
  static const TileSet fn##_n_##P{2, 4, {fn<2, 1, P>, fn<2, 2, P>, fn<2, 3, P>, fn<2, 4, P>},    \
                                  {fn<1, 1, P>, fn<1, 2, P>, fn<1, 3, P>, fn<1, 4, P>}};
  Q8_SETS(tile_avx512vnni, false)
  Q8_SETS(tile_avx512vnni, true)
  Q8_SETS(tile_avxvnni, false)
  Q8_SETS(tile_avxvnni, true)
  Q8_SETS(tile_avx2, false)
  Q8_SETS(tile_avx2, true)
#undef Q8_SETS
  const bool one = B == 1;
  if (isa == IntIsa::Avx512Vnni)
    return perq ? (one ? tile_avx512vnni_1_true : tile_avx512vnni_n_true)
                : (one ? tile_avx512vnni_1_false : tile_avx512vnni_n_false);
  if (isa == IntIsa::AvxVnni)
    return perq ? (one ? tile_avxvnni_1_true : tile_avxvnni_n_true) : (one ? tile_avxvnni_1_false : tile_avxvnni_n_false);
  if (isa == IntIsa::Avx2)
    return perq ? (one ? tile_avx2_1_true : tile_avx2_n_true) : (one ? tile_avx2_1_false : tile_avx2_n_false);
#endif
#if defined(LOWBIT_Q8_HAS_NEON)
  static const TileSet neon{4, 1, {tile_neon<4>}, {tile_neon<1>}};
  if (isa == IntIsa::Neon) return neon;
#endif
  (void)perq;
  (void)B;
  return scalar;
}

// The block quantizer for `isa` (the same results on every one).
inline QuantBlockFn quant_block_fn(IntIsa isa) {
#if defined(__x86_64__)
  if (isa == IntIsa::Avx512Vnni) return quant_block_avx512;
  if (isa == IntIsa::AvxVnni || isa == IntIsa::Avx2) return quant_block_avx2;
#endif
  (void)isa;
  return quant_block_scalar;
}

// Tiles [tile0, tile1) of R rows each (the last one may be short), every activation row.
inline void run_tiles(const Problem& p, const TileSet& ts, int64_t tile0, int64_t tile1) {
  const int64_t B = p.a->B;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t n0 = tile * ts.R, rows = std::min<int64_t>(ts.R, p.N - n0);
    for (int64_t b0 = 0; b0 < B; b0 += ts.BT) {
      const int64_t bt = std::min<int64_t>(ts.BT, B - b0);
      if (rows == ts.R)
        ts.full[bt - 1](p, n0, b0);
      else
        for (int64_t r = 0; r < rows; ++r) ts.one[bt - 1](p, n0 + r, b0);
    }
  }
}

}  // namespace lowbit_q8
