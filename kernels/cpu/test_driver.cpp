// Checks the integer kernels of lowbit_q8.h without torch, on every path this CPU has (under
// qemu-aarch64 for the NEON path): tests/bench/test_kernels_arm.py builds it with a cross compiler.
//
// For random codes, scales, zeros and activations (shapes and group sizes the layout allows, 1-5
// activation rows, float and bfloat16 outputs) each path's output is compared with a double-precision
// reference computed here from the unpacked weights:
//  * against the quantized activations xhat (what the kernels multiply): relative error < 1e-5;
//  * against the float activations x: within the bound of lowbit_q8.h,
//    |y - y_float| <= sum_j max|x_j| / 254 * sum_{k in block j} |w[n, k]|  (plus 1e-5 of the scale).
// Prints one line per path and case, "ok" or the failure, and exits non-zero on any failure.
//
//   g++ -O2 -std=c++17 kernels/cpu/test_driver.cpp -o driver && ./driver
//   aarch64-linux-gnu-g++ -O2 -std=c++17 -static kernels/cpu/test_driver.cpp -o driver && qemu-aarch64 ./driver

#include "lowbit_q8.h"

#include <cstdio>
#include <random>
#include <string>

using namespace lowbit_q8;

namespace {

struct Case {
  int64_t N, K, G;
  bool ternary;
};

int check(IntIsa isa, const Case& cs, int64_t B, bool bf16_in, bool bf16_out, std::mt19937& rng) {
  const int64_t N = cs.N, K = cs.K, G = cs.G, NG = K / G, Kp = (K + 63) / 64 * 64;
  std::uniform_int_distribution<int> code(0, cs.ternary ? 2 : 3);
  std::uniform_real_distribution<float> uni(0.5f, 1.5f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // codes in the block-64 layout: byte m of block j holds elements 64j + m + 16q at shift 2q
  std::vector<uint8_t> c(N * Kp), q(N * Kp / 4, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Kp; ++k) {
      c[n * Kp + k] = static_cast<uint8_t>(k < K ? code(rng) : (cs.ternary ? 1 : 0));
      const int64_t j = k / 64, i = k % 64;
      q[n * Kp / 4 + j * 16 + i % 16] |= static_cast<uint8_t>(c[n * Kp + k] << (2 * (i / 16)));
    }
  std::vector<float> s(N * NG), z(cs.ternary ? 0 : N * NG), x(B * K);
  for (auto& v : s) v = 0.01f * uni(rng);
  for (auto& v : z) v = 1.5f * uni(rng);
  for (auto& v : x) v = normal(rng) * (uni(rng) > 1.4f ? 8.0f : 1.0f);  // some outliers
  std::vector<uint16_t> xh(B * K);
  for (int64_t i = 0; i < B * K; ++i) {
    xh[i] = float_to_bf16(x[i]);
    if (bf16_in) x[i] = bf16_to_float(xh[i]);
  }

  Acts a;
  Tables t;
  const int CB = chunk_blocks(isa);
  if (!supports(isa, K, G, t)) return -1;  // not this path's group size
  const void* xin = bf16_in ? static_cast<const void*>(xh.data()) : x.data();
  quantize_acts(xin, bf16_in, B, K, K, G, CB, a, quant_block_fn(isa));
  Acts plain;  // the scalar quantizer must give the same codes and sums
  quantize_acts(xin, bf16_in, B, K, K, G, CB, plain);
  if (plain.xq != a.xq || plain.dx != a.dx || plain.xg != a.xg) {
    std::printf("%-10s N=%lld K=%lld G=%lld: the ISA's activation quantizer differs from the scalar one FAIL\n",
                isa_name(isa), static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(G));
    return 1;
  }
  std::vector<float> yf(B * N);
  std::vector<uint16_t> yb(B * N);
  Problem p{q.data(), s.data(), cs.ternary ? nullptr : z.data(), &a, &t,
            bf16_out ? static_cast<void*>(yb.data()) : yf.data(), bf16_out, N, K, Kp, G, NG};
  const TileSet& ts = tiles(isa, G % 64 != 0, B);
  run_tiles(p, ts, 0, (N + ts.R - 1) / ts.R);

  int bad = 0;
  double num = 0, den = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      double ref_q = 0, ref_x = 0, bound = 0, wabs_blk = 0, scale_sum = 0;
      float amax = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / G;
        const double w = (c[n * Kp + k] - (cs.ternary ? 1.0 : z[n * NG + g])) * s[n * NG + g];
        const int64_t blk = k / 64;
        const double xhat = a.dx[b * a.NB + blk] *
                            a.xq[b * a.Kx + (blk / CB) * 64 * CB + ((k % 64) / 16) * 16 * CB + 16 * (blk % CB) + k % 16];
        ref_q += w * xhat;
        ref_x += w * x[b * K + k];
        scale_sum += std::fabs(w * x[b * K + k]);
        amax = std::max(amax, std::fabs(x[b * K + k]));
        wabs_blk += std::fabs(w);
        if (k % 64 == 63 || k == K - 1) {
          bound += amax / 254.0 * wabs_blk;
          amax = 0;
          wabs_blk = 0;
        }
      }
      const double got = bf16_out ? bf16_to_float(yb[b * N + n]) : yf[b * N + n];
      const double tol = (bf16_out ? 4e-3 * std::fabs(ref_q) : 0.0) + 1e-5 * scale_sum;
      num += (got - ref_q) * (got - ref_q);
      den += ref_q * ref_q;
      if (std::fabs(got - ref_q) > tol + 1e-12 || std::fabs(got - ref_x) > bound + tol + 1e-12) ++bad;
    }
  const double rel = den > 0 ? std::sqrt(num / den) : 0;
  std::printf("%-10s N=%-4lld K=%-4lld G=%-3lld %-7s B=%lld in=%s out=%s rel_vs_xhat=%.2e %s\n", isa_name(isa),
              static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(G),
              cs.ternary ? "ternary" : "2bit", static_cast<long long>(B), bf16_in ? "bf16" : "f32",
              bf16_out ? "bf16" : "f32", rel, bad ? "FAIL" : "ok");
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  const Case cases[] = {{37, 96, 16, false}, {64, 200, 8, true},   {5, 80, 16, true},    {70, 576, 64, false},
                        {70, 576, 32, true}, {9, 1024, 256, true}, {130, 256, 128, false}, {33, 960, 48, false},
                        {12, 320, 40, true}, {17, 4096, 64, true}};
  const IntIsa isas[] = {IntIsa::Avx512Vnni, IntIsa::AvxVnni, IntIsa::Avx2, IntIsa::Neon, IntIsa::Scalar};
  std::mt19937 rng(1234);
  int failures = 0, runs = 0;
  for (IntIsa isa : isas) {
    if (!cpu_has(isa)) {
      std::printf("%-10s not available on this CPU\n", isa_name(isa));
      continue;
    }
    for (const Case& cs : cases)
      for (int64_t B : {1, 2, 5})
        for (int mode = 0; mode < 3; ++mode) {
          const int r = check(isa, cs, B, mode == 1, mode == 2, rng);
          if (r >= 0) {
            failures += r;
            ++runs;
          }
        }
  }
  std::printf("%d of %d checks failed\n", failures, runs);
  return failures || runs == 0 ? 1 : 0;
}
