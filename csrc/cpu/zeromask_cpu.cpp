// zeromask CPU kernels: fused f0 rotary + zero-soft attention (forward and backward) and the
// standalone f0 rotary op.  docs/design.md sections 3.1 and 3.3; the kernel contract is the
// docstring of zeromask/backends/__init__.py.
//
// Structure (flash-attention-2 style, fp32 accumulation for every input dtype):
//   * rotary angle tables cos/sin/dphi_dtheta (B, L, R/2) are computed once per call, angles
//     in double precision (so the kernel is not less accurate than the fp32 reference);
//     self-attention with identical theta/positions on both sides shares one table;
//   * keys are rotated once per (batch, kv head) -- per thread that meets that head -- into
//     a packed fp32 scratch: K^T (D x Lkp) for the Q K^T tiles and, for the backward,
//     K (Lkp x Dp); V likewise (V or V^T); score-mode zero scaling is folded into the
//     packed keys (S' = Q . (g_j k_j)); queries are rotated per query block as loaded;
//   * prob-mode ln(s), seqlens_k and padding are one additive per-key bias row (B, Lkp);
//   * forward: work split over (batch, q head, query block) with at::parallel_for; online
//     softmax over key blocks of BK; every product (Q K^T, P V, and in the backward dP,
//     dV, dK, dQ) runs through one register-blocked microkernel of GCC vector extensions
//     sized to the ISA (see ZM_VBYTES and NVP: 6 rows x 4 zmm with AVX-512, 6 x 2 ymm with
//     AVX2, 6 x 2 xmm with SSE / NEON or 128-bit AVX units); the tile the causal diagonal
//     crosses is trimmed per 6-row strip; the Q K^T tile's epilogue adds the key bias and
//     takes each row's max while the scores are in registers; exp is 2^(x log2 e) with the
//     Cephes exp2f polynomial (vscalefps under AVX-512, four exps interleaved otherwise);
//   * the transposed key/value packs have a row pitch that is not a multiple of 4 KiB (a
//     Q K^T tile reads D rows of it, which would otherwise share one L1 set);
//   * backward: phase 1 splits over (batch, kv head, slice of the GQA group's q heads;
//     one slice unless there are fewer (b, kv head) pairs than threads), dK'/dV accumulate
//     in per-task fp32 buffers (no atomics), dQ per query block; each task then finishes
//     its keys (dk/dv), or, for a sliced group, phase 2 sums the slices per (batch, kv
//     head) and finishes them; theta/radius/zero_scale gradients are
//     per-task partial sums returned to Python and reduced there;
//   * memory O(L * D) per thread / head: tiles are BQ x BK, no L x L buffer.
// Masked logits are -inf; the exp below maps anything below -87 to exactly 0, and a row
// whose keys are all hard-masked yields out 0 / lse -inf (backward: P = 0, finite grads).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "vector_width.h"
#include "zeromask_args.h"

namespace zm {

// The vector width (ZM_VBYTES) follows the ISA: see vector_width.h.
typedef float vf __attribute__((vector_size(ZM_VBYTES)));
typedef float vfu __attribute__((vector_size(ZM_VBYTES), aligned(4)));
typedef int vi __attribute__((vector_size(ZM_VBYTES)));
constexpr int VL = ZM_VBYTES / 4;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float NAN_F = std::numeric_limits<float>::quiet_NaN();
constexpr float LOG2E = 1.44269504088896341f;

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
#ifdef __AVX512F__
static inline vf vset(float x) { vf v = {}; return v + x; }
#else
// x - (+0) is x for every x (-0 too), so GCC makes this one broadcast, straight from memory
// where x is loaded; 0 + x is not x for x = -0, so {} + x costs a scalar add first.
static inline vf vset(float x) { return x - vf{}; }
#endif

// e^x for a vector of floats as 2^(x log2 e): the Cephes exp2f polynomial on [-1/2, 1/2]
// (~2 ulp), the exponent put in by vscalefps under AVX-512 (else by integer bits).  Exactly
// 0 below -87 (incl. -inf), so no denormal reaches the P V product.  Forward and backward
// use this one function, so the backward's recomputed P is the forward's.
#ifdef __AVX512F__
static inline vf vexp(vf x) {
  // lanes below -87 (and -inf) come out 0 through the mask of the final scalef; NaN lanes
  // are put back as NaN at the end (a kernel never hides a NaN: README, "NaN, lengths and limits")
  const __mmask16 live = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q);
  vf t = x * LOG2E;
  t = t < 127.0f ? t : vset(127.0f);
  const __m512 xm = (__m512)t;
  // (the zero-masking form with an all-ones mask: the plain one trips GCC 12's
  // -Wmaybe-uninitialized inside its own header)
  const __m512 n = _mm512_maskz_roundscale_ps(static_cast<__mmask16>(0xFFFF), xm,
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(xm, n);
  vf p = vset(1.535336188319500E-4f);
  p = p * f + 1.339887440266574E-3f;
  p = p * f + 9.618437357674640E-3f;
  p = p * f + 5.550332471162809E-2f;
  p = p * f + 2.402264791363012E-1f;
  p = p * f + 6.931472028550421E-1f;
  vf y = p * f + 1.0f;
  return (vf)_mm512_mask_mov_ps(_mm512_maskz_scalef_ps(live, (__m512)y, n), nan, (__m512)x);
}
#else
// x[0..U) = e^x[u], U exps a step each: one exp is a chain of ~15 dependent ops, and
// interleaving U of them step by step keeps the FP scheduler fed (U = 4 was ~17% faster
// than one after another on Zen 1).  For x <= 88 only (the softmax's x = s - max and
// s - lse are <= 0): lanes below -87 (and -inf) are set to 0 at the end, whatever the
// steps made of them (an exponent out of range, inf or NaN: never a denormal, as
// (n + 127) << 23 has zero mantissa bits).  NaN stays NaN.
template <int U>
static inline void vexp_n(vf* x) {
  const vf magic = vset(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  vi dead[U];
  vf t[U], tn[U], f[U], p[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    dead[u] = x[u] < -87.0f;
    t[u] = x[u] * LOG2E;
    tn[u] = t[u] + magic;  // n in the low mantissa bits
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    f[u] = t[u] - (tn[u] - magic);
    p[u] = f[u] * 1.535336188319500E-4f + 1.339887440266574E-3f;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 9.618437357674640E-3f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 5.550332471162809E-2f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 2.402264791363012E-1f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 6.931472028550421E-1f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const vf y = p[u] * f[u] + 1.0f;
    // 2^n: the bits of tn are those of magic (0x4B400000) + n, and 0x4B400000 << 23 wraps
    // to 0, so (bits(tn) + 127) << 23 is (n + 127) << 23 without a float -> int conversion
    const vi bits = ((vi)tn[u] + 127) << 23;
    x[u] = dead[u] ? vset(0.0f) : y * (vf)bits;  // GCC vector cast = bit cast
  }
}
static inline vf vexp(vf x) {
  vexp_n<1>(&x);
  return x;
}
#endif

// Horizontal max / sum of one vector as a shuffle tree (log2(VL) shuffles + ops; GCC turns
// a plain loop over the lanes into a serial chain of VL - 1 scalar ops, which was a fifth
// of the softmax's time).  swap_halves(v, w) swaps neighbouring groups of w lanes.
static inline vf swap_halves(vf v, int w) {
#if ZM_VBYTES == 64
  switch (w) {
    case 8: return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
#elif ZM_VBYTES == 32
  switch (w) {
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  }
#else
  switch (w) {
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2);
  }
#endif
}
static inline float hmax(vf v) {
  for (int w = VL / 2; w >= 1; w /= 2) {
    const vf u = swap_halves(v, w);
    v = u > v ? u : v;
  }
  return v[0];
}
static inline float hsum(vf v) {
  for (int w = VL / 2; w >= 1; w /= 2) v += swap_halves(v, w);
  return v[0];
}

// Register blocking of the microkernel: MR rows x NVP vectors of accumulators.  With the
// 32 vector registers of AVX-512 (or AArch64) 6 x 4 = 24 accumulators + 4 B vectors + 1
// broadcast; with the 16 of AVX2 / SSE 6 x 2 = 12 + 2 + 1 (+ 1 product temporary without
// FMA).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int NVP = 4;
#else
constexpr int NVP = 2;
#endif

// C[MR x NV*VL] (+)= sum_t A(r, t) * B[t, :], A(r, t) = A[r * asr + t * ast].
// Per step t: NV vector loads of B, MR broadcasts of A, MR * NV FMAs into MR * NV register
// accumulators (at most MR x NVP, see above).  The empty asm pins each loaded B vector in a
// register: otherwise GCC folds the load into every FMA that uses it (MR loads of the same
// vector per step), and the kernel becomes bound by loads, not FMAs.
//
// With `bias` (the scores epilogue of Q K^T): C = A B + bias[col] and, with `rowmax` too,
// the running maxima of C's rows, while C is still in registers: with AVX-512 rowmax[r] =
// max(rowmax[r], max of row r); otherwise per lane, RMW = VL floats a row (rowmax[r * VL +
// lane]), left to the caller to reduce once per tile (a shuffle tree per row and panel was
// a tenth of the Q K^T product's time on AVX2).
#ifdef __AVX512F__
constexpr int RMW = 1;
#else
constexpr int RMW = VL;
#endif
template <int MR, int NV, bool ACC>
static inline void micro(int64_t K, const float* __restrict A, int64_t asr, int64_t ast,
                         const float* __restrict B, int64_t ldb, float* __restrict C,
                         int64_t ldc, const float* __restrict bias = nullptr,
                         float* __restrict rowmax = nullptr) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? vload(C + r * ldc + v * VL) : vset(0.f);
  for (int64_t t = 0; t < K; ++t) {
    vf b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      b[v] = vload(B + t * ldb + v * VL);
#ifdef __AVX512F__  // one vf is one zmm register
      asm("" : "+v"(b[v]));
#elif defined(__x86_64__) || defined(__i386__)  // one ymm (AVX) or xmm (SSE) register
      asm("" : "+x"(b[v]));
#endif
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf a = vset(A[r * asr + t * ast]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  if (bias) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const vf bv = vload(bias + v * VL);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][v] += bv;
    }
  }
  if (rowmax) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      vf mx = acc[r][0];
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) mx = acc[r][v] > mx ? acc[r][v] : mx;
#ifdef __AVX512F__
      rowmax[r] = std::max(rowmax[r], hmax(mx));
#else
      float* rv = rowmax + r * VL;
      const vf cur = vload(rv);
      vstore(rv, mx > cur ? mx : cur);
#endif
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * VL, acc[r][v]);
}

// One MR-row strip of C: every NVP-vector panel, then the tail of fewer vectors.
template <int MR, bool ACC>
static inline void strip(int64_t N, int64_t K, const float* A, int64_t asr, int64_t ast,
                         const float* B, int64_t ldb, float* C, int64_t ldc,
                         const float* bias, float* rowmax) {
  int64_t n = 0;
  auto bn = [&](int64_t n) { return bias ? bias + n : nullptr; };
  for (; n + NVP * VL <= N; n += NVP * VL)
    micro<MR, NVP, ACC>(K, A, asr, ast, B + n, ldb, C + n, ldc, bn(n), rowmax);
  switch ((N - n) / VL) {
    case 3:
      if constexpr (NVP > 3) micro<MR, 3, ACC>(K, A, asr, ast, B + n, ldb, C + n, ldc, bn(n), rowmax);
      break;
    case 2:
      if constexpr (NVP > 2) micro<MR, 2, ACC>(K, A, asr, ast, B + n, ldb, C + n, ldc, bn(n), rowmax);
      break;
    case 1: micro<MR, 1, ACC>(K, A, asr, ast, B + n, ldb, C + n, ldc, bn(n), rowmax); break;
    default: break;
  }
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Causal trimming of a product over one BQ x BK tile, whose row r (query) may use tile
// columns (keys) j < diag + r + 1: gemm then skips the work no row of a strip needs.
//   NCOLS:  C's columns (S = Q K^T, dP = dO V^T): strip [m, m + MR) computes the columns
//           below strip_cols(diag, m + MR, N) only;
//   KEND:   the K range (O += P V, dQ += dS K): t < diag + m + MR;
//   KSTART: rows are keys, K runs over queries (dV += P^T dO, dK += dS^T Q): t >= m - diag.
// Skipped terms are exact zeros (P = 0 past the diagonal), so results are the same.
enum Trim { NONE, NCOLS, KEND, KSTART };
static inline int64_t strip_cols(int64_t diag, int64_t strip_end, int64_t N) {
  return std::min(N, round_up(std::max<int64_t>(0, diag + strip_end), VL));
}
// The end of the strip gemm puts row r of an M-row product in (6-row strips, then 4 or 2).
static inline int64_t strip_end(int64_t r, int64_t M) {
  return r < M / 6 * 6 ? (r / 6 + 1) * 6 : M;
}

// C (M x N) (+)= A (M x K) B (K x N); M % 2 == 0, N % VL == 0.  Strips of 6 rows, then
// one of 4 or 2 for the rest.  bias (length N) and rowmax (length M * RMW), each optional:
// see micro; TRIM and diag: see Trim.
// (not inlined into the attention loops: there GCC spills the microkernel's B registers)
template <bool ACC, Trim TRIM = NONE>
__attribute__((noinline)) static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t asr, int64_t ast,
                 const float* B, int64_t ldb, float* C, int64_t ldc,
                 const float* bias = nullptr, float* rowmax = nullptr, int64_t diag = 0) {
  auto rm = [&](int64_t m) { return rowmax ? rowmax + m * RMW : nullptr; };
  auto run = [&](auto mr, int64_t m) {
    constexpr int MR = decltype(mr)::value;
    int64_t n = N, k0 = 0, k1 = K;
    if constexpr (TRIM == NCOLS) n = strip_cols(diag, m + MR, N);
    if constexpr (TRIM == KEND) k1 = std::min(K, std::max<int64_t>(0, diag + m + MR));
    if constexpr (TRIM == KSTART) k0 = std::min(K, std::max<int64_t>(0, m - diag));
    if (ACC && k1 <= k0) return;  // nothing to add
    strip<MR, ACC>(n, k1 - k0, A + m * asr + k0 * ast, asr, ast, B + k0 * ldb, ldb,
                   C + m * ldc, ldc, bias, rm(m));
  };
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) run(std::integral_constant<int, 6>{}, m);
  if (M - m == 4)
    run(std::integral_constant<int, 4>{}, m);
  else if (M - m == 2)
    run(std::integral_constant<int, 2>{}, m);
}

// Scratch buffers on 64-byte boundaries (glibc's malloc gives 16): with rows that are whole
// cache lines, no vector load or store of the kernels straddles two lines.
constexpr std::size_t ALIGN = 64;
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(ALIGN)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(ALIGN)); }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};
using fvec = std::vector<float, AlignedAlloc<float>>;  // zero-filled, like std::vector
struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(ALIGN)); }
};
using fbuf = std::unique_ptr<float[], AlignedDelete>;  // not initialised
static fbuf new_fbuf(int64_t n) {
  return fbuf(new (std::align_val_t(ALIGN)) float[std::max<int64_t>(n, 1)]);
}

// ---------------------------------------------------------------------------------------
// rotary
// ---------------------------------------------------------------------------------------
struct RotTable {
  // (B, L, R/2) each; empty when there is no rotary on that side.
  std::vector<float> cs, sn, dpdt;
  int64_t L = 0, half = 0;
  bool on = false;
  const float* c(int64_t b, int64_t t) const { return cs.data() + (b * L + t) * half; }
  const float* s(int64_t b, int64_t t) const { return sn.data() + (b * L + t) * half; }
  const float* d(int64_t b, int64_t t) const { return dpdt.data() + (b * L + t) * half; }
};

// phi_i = pos * theta^(-2i/R); dphi_i/dtheta = -pos * (2i/R) * w_i / theta.  In double.
static RotTable make_table(const std::optional<at::Tensor>& theta,
                           const std::optional<at::Tensor>& pos, int64_t B, int64_t L,
                           int64_t R, bool need_grad) {
  // (theta, pos: float32 (B, L) contiguous, both or neither: zm_args checked them)
  RotTable t;
  if (!theta.has_value()) return t;
  t.on = true;
  t.L = L;
  t.half = R / 2;
  const int64_t half = R / 2;
  t.cs.resize(B * L * half);
  t.sn.resize(B * L * half);
  if (need_grad) t.dpdt.resize(B * L * half);
  const float* th = theta->data_ptr<float>();
  const float* ps = pos->data_ptr<float>();
  constexpr double HALF_PI = 1.570796326794896619231;
  // Chunks of >= 16k angles (~0.1 ms): smaller tables stay serial, as a parallel region's
  // thread wake-up would cost more than it saves; at L = 2048, D = 64 the table (~0.4 ms
  // serial) was most of the standalone rotary op's time.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(half, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> wv(half), y(half);
    std::vector<int32_t> quad(half);
    for (int64_t row = lo; row < hi; ++row) {
      // w_i = theta^(-2i/R) = ratio^i, by repeated multiplication in double (error ~ i ulp
      // of a double); phi = pos * w_i reduced in double to y in [-pi/4, pi/4] and its
      // quadrant, then sin and cos of y by their Taylor series to y^13 / y^14 in double
      // (truncation < 1e-13) rounded once to float: as accurate as libm's sinf/cosf, in
      // loops GCC vectorises (libm's scalar cosf + sinf took ~6 ns an angle).
      const double ratio = std::exp(-2.0 / static_cast<double>(R) * std::log(static_cast<double>(th[row])));
      const double p = ps[row];
      double w = 1.0;
      for (int64_t i = 0; i < half; ++i, w *= ratio) wv[i] = w;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const double phi = p * wv[i];
        const double k = std::nearbyint(phi * (1.0 / HALF_PI));
        y[i] = phi - HALF_PI * k;
        // k mod 4 in [0, 4), exactly ((int64) k & 3, without a vector int64 conversion)
        quad[i] = static_cast<int32_t>(k - 4.0 * std::floor(k * 0.25));
      }
      float* cs = t.cs.data() + row * half;
      float* sn = t.sn.data() + row * half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const double x = y[i], z = x * x;
        const double sp = x * (1.0 + z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (
            1.0 / 362880 + z * (-1.0 / 39916800 + z * (1.0 / 6227020800.0)))))));
        const double cp = 1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (
            1.0 / 40320 + z * (-1.0 / 3628800 + z * (1.0 / 479001600 + z * (
            -1.0 / 87178291200.0)))))));
        const int32_t q = quad[i];  // phi = y + q pi/2 (mod 2 pi)
        const double sv = (q & 1) ? cp : sp, cv = (q & 1) ? sp : cp;
        sn[i] = static_cast<float>((q & 2) ? -sv : sv);
        cs[i] = static_cast<float>(((q + 1) & 2) ? -cv : cv);
      }
      if (need_grad) {
        float* dp = t.dpdt.data() + row * half;
        const double th_r = th[row];
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const double e = -2.0 * static_cast<double>(i) / static_cast<double>(R);
          dp[i] = static_cast<float>(p * e * wv[i] / th_r);
        }
      }
    }
  });
  return t;
}

// The rotary pairs of a row are (x[i], x[i + R/2]) (ST = 1, halves) or (x[2i], x[2i + 1])
// (ST = 2, interleaved), i < R/2.  The loops below are one per layout and radius / no
// radius, without branches inside, so GCC vectorises them.

// y = rot(x) (one row of D); dims >= R copied.  y may not alias x.
template <int ST, bool RHO>
static inline void rot_pairs(const float* __restrict xa, const float* __restrict xb,
                             float* __restrict ya, float* __restrict yb, int64_t half,
                             const float* __restrict c, const float* __restrict s,
                             const float* __restrict rho) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = xa[i * ST], b = xb[i * ST];
    const float u = a * c[i] - b * s[i], w = a * s[i] + b * c[i];
    ya[i * ST] = RHO ? rho[i] * u : u;
    yb[i * ST] = RHO ? rho[i] * w : w;
  }
}
static inline void rot_row(const float* x, float* y, int64_t D, int64_t R, bool inter,
                           const float* c, const float* s, const float* rho) {
  const int64_t half = R / 2;
  if (inter) {
    if (rho) rot_pairs<2, true>(x, x + 1, y, y + 1, half, c, s, rho);
    else rot_pairs<2, false>(x, x + 1, y, y + 1, half, c, s, rho);
  } else {
    if (rho) rot_pairs<1, true>(x, x + half, y, y + half, half, c, s, rho);
    else rot_pairs<1, false>(x, x + half, y, y + half, half, c, s, rho);
  }
  for (int64_t d = R; d < D; ++d) y[d] = x[d];
}

// Given x and dy = dL/d rot(x): dx, returns dL/dtheta for this row, adds dL/drho (double
// sums; the dtheta one in SIMD lanes, i.e. reassociated, at double precision).
template <int ST, bool RHO>
static inline double rot_pairs_bwd(const float* __restrict xa, const float* __restrict xb,
                                   const float* __restrict ga, const float* __restrict gb,
                                   float* __restrict dxa, float* __restrict dxb, int64_t half,
                                   const float* __restrict c, const float* __restrict s,
                                   const float* __restrict dpdt, const float* __restrict rho,
                                   double* __restrict drho) {
  double dth = 0.0;
#pragma omp simd reduction(+ : dth)
  for (int64_t i = 0; i < half; ++i) {
    const float a = xa[i * ST], b = xb[i * ST], r = RHO ? rho[i] : 1.0f;
    const float ya = a * c[i] - b * s[i], yb = a * s[i] + b * c[i];
    const float g0 = ga[i * ST], g1 = gb[i * ST];
    const float u = g0 * c[i] + g1 * s[i], w = g1 * c[i] - g0 * s[i];
    dxa[i * ST] = RHO ? r * u : u;
    dxb[i * ST] = RHO ? r * w : w;
    const double dphi = static_cast<double>(r) * (static_cast<double>(g1) * ya -
                                                  static_cast<double>(g0) * yb);
    dth += dphi * dpdt[i];
    if (RHO) drho[i] += static_cast<double>(g0) * ya + static_cast<double>(g1) * yb;
  }
  return dth;
}
// rho and drho: both or neither.
static inline double rot_row_bwd(const float* x, const float* dy, float* dx, int64_t D,
                                 int64_t R, bool inter, const float* c, const float* s,
                                 const float* dpdt, const float* rho, double* drho) {
  TORCH_CHECK(!rho == !drho, "zeromask: rot_row_bwd needs rho and drho together");
  const int64_t half = R / 2;
  double dth;
  if (inter) {
    dth = rho ? rot_pairs_bwd<2, true>(x, x + 1, dy, dy + 1, dx, dx + 1, half, c, s, dpdt, rho, drho)
              : rot_pairs_bwd<2, false>(x, x + 1, dy, dy + 1, dx, dx + 1, half, c, s, dpdt, rho, drho);
  } else {
    dth = rho ? rot_pairs_bwd<1, true>(x, x + half, dy, dy + half, dx, dx + half, half, c, s,
                                       dpdt, rho, drho)
              : rot_pairs_bwd<1, false>(x, x + half, dy, dy + half, dx, dx + half, half, c, s,
                                        dpdt, rho, drho);
  }
  for (int64_t d = R; d < D; ++d) dx[d] = dy[d];
  return dth;
}

template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
static inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// ---------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------
struct Attn {
  int64_t B, Hq, Hkv, Lq, Lk, D, R, Dp, Lkp, ldt, grp;
  bool score, causal, inter, has_zero;
  bool hard;                // prob mode with s = 0 (ln s = -inf): zero keys hard-masked
  float sm_scale, zs;
  const bool* key_zero;
  const int32_t* seqlens;
  const float* radius;
  RotTable tq, tk;
  fvec bias;                // (B, Lkp): ln s (prob mode zero keys), -inf beyond length/pad
  std::vector<float> gk;    // (B, Lk): score-mode key factor (s or 1)
  fvec zf;                  // (B, Lkp): 1 on zero keys (prob mode), else 0
  std::vector<int64_t> first_ok;  // (B,): the first key not hard-masked (klen if none)

  int64_t klen(int64_t b) const {
    return seqlens ? std::min<int64_t>(Lk, std::max<int32_t>(seqlens[b], 0)) : Lk;
  }
  // keys [0, kend) can be unmasked for query rows [i0, i1)
  int64_t kend(int64_t b, int64_t i1) const {
    int64_t e = klen(b);
    if (causal) e = std::min<int64_t>(e, std::max<int64_t>(0, i1 - 1 + (Lk - Lq) + 1));
    return e;
  }
};

// Row pitch (floats) of the transposed key/value packs (D rows of Lkp keys).  A pitch that
// is a multiple of 4 KiB puts every row of a key tile in the same L1 set (4 KiB aliasing),
// so a Q K^T tile, which reads D rows, would thrash L1: pad to an odd multiple of 64 bytes
// (whole cache lines, so no vector load of a row straddles two).
static int64_t transposed_pitch(int64_t lkp) {
  constexpr int64_t LINE = 16;  // floats in 64 bytes
  int64_t p = round_up(lkp, LINE);
  if ((p / LINE) % 2 == 0) p += LINE;
  return p;
}

static constexpr int64_t BQ = 64;
static constexpr int64_t BK = 128;

static void setup_attn(Attn& a, const zm_args::AttentionArgs& x, bool need_grad) {
  a.B = x.B; a.Hq = x.Hq; a.Lq = x.Lq; a.D = x.D; a.Hkv = x.Hkv; a.Lk = x.Lk;
  a.grp = a.Hq / a.Hkv;
  a.R = x.rotary_dim;
  a.Dp = round_up(a.D, VL);
  a.Lkp = round_up(std::max<int64_t>(a.Lk, 1), VL);
  a.ldt = transposed_pitch(a.Lkp);
  a.score = x.score; a.causal = x.causal; a.inter = x.interleaved;
  a.hard = x.hard;
  a.sm_scale = static_cast<float>(x.sm_scale);
  a.zs = x.zero_scale.item<float>();
  a.has_zero = x.key_zero.has_value();
  a.key_zero = a.has_zero ? x.key_zero->data_ptr<bool>() : nullptr;
  a.seqlens = x.seqlens_k.has_value() ? x.seqlens_k->data_ptr<int32_t>() : nullptr;
  a.radius = x.radius.has_value() ? x.radius->data_ptr<float>() : nullptr;
  const auto& theta_q = x.theta_q;
  const auto& theta_k = x.theta_k;
  const auto& pos_q = x.pos_q;
  const auto& pos_k = x.pos_k;
  a.tq = make_table(theta_q, pos_q, a.B, a.Lq, a.R, need_grad);
  // self-attention usually passes the same theta and positions for both sides: reuse
  if (a.tq.on && a.Lq == a.Lk && theta_k.has_value() &&
      std::memcmp(theta_q->data_ptr<float>(), theta_k->data_ptr<float>(), a.B * a.Lk * sizeof(float)) == 0 &&
      std::memcmp(pos_q->data_ptr<float>(), pos_k->data_ptr<float>(), a.B * a.Lk * sizeof(float)) == 0) {
    a.tk = a.tq;
  } else {
    a.tk = make_table(theta_k, pos_k, a.B, a.Lk, a.R, need_grad);
  }
  // zero_mode "hard": zero keys are hard-masked like keys past seqlens_k (bias -inf, no
  // d/ds), and a row that sees no other key is empty
  const float lns = a.hard ? NEG_INF : std::log(a.zs);
  a.bias.assign(a.B * a.Lkp, 0.f);
  a.gk.assign(a.B * a.Lk, 1.f);
  a.zf.assign(a.B * a.Lkp, 0.f);
  a.first_ok.assign(a.B, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t n = a.klen(b);
    int64_t first = n;
    for (int64_t j = 0; j < a.Lkp; ++j) {
      float v = 0.f;
      if (j >= n) v = NEG_INF;
      else if (a.has_zero && a.key_zero[b * a.Lk + j]) {
        if (a.score) a.gk[b * a.Lk + j] = a.zs;
        else if (a.hard) v = NEG_INF;
        else { v = lns; a.zf[b * a.Lkp + j] = 1.f; }
      }
      if (j < n && v != NEG_INF && first == n) first = j;
      a.bias[b * a.Lkp + j] = v;
    }
    a.first_ok[b] = a.hard ? first : 0;
  }
}

// dst[d * ld + jj] = src[jj * sp + d] for jj < 4, d < D: four rows into four columns, by
// 4 x 4 blocks in registers (scalar stores at the column stride were a tenth of the
// backward's own loops at D = 24).
typedef float v4f __attribute__((vector_size(16)));
typedef float v4fu __attribute__((vector_size(16), aligned(4)));
static inline void transpose4(const float* src, int64_t sp, int64_t D, float* dst, int64_t ld) {
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const v4f r0 = *reinterpret_cast<const v4fu*>(src + d);
    const v4f r1 = *reinterpret_cast<const v4fu*>(src + sp + d);
    const v4f r2 = *reinterpret_cast<const v4fu*>(src + 2 * sp + d);
    const v4f r3 = *reinterpret_cast<const v4fu*>(src + 3 * sp + d);
    const v4f t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5);
    const v4f t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
    const v4f t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5);
    const v4f t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
    *reinterpret_cast<v4fu*>(dst + d * ld) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    *reinterpret_cast<v4fu*>(dst + (d + 1) * ld) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    *reinterpret_cast<v4fu*>(dst + (d + 2) * ld) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    *reinterpret_cast<v4fu*>(dst + (d + 3) * ld) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
  }
  for (; d < D; ++d)
    for (int64_t jj = 0; jj < 4; ++jj) dst[d * ld + jj] = src[jj * sp + d];
}

// Pack rotated (and score-scaled) keys and values for one (b, hkv): Kt (D x Lkp), Kr (Lkp x
// Dp) optional, V (Lkp x Dp) or Vt (D x Lkp).  Keys in groups of 4 (Lkp is a multiple of
// VL >= 4), staged row-major and written to the transposed packs by transpose4.
template <typename T>
static void pack_kv(const Attn& a, const at::Tensor& k, const at::Tensor& v, int64_t b,
                    int64_t h, float* Kt, float* Kr, float* Vr, float* Vt) {
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  std::vector<float> x(a.D), ys(4 * a.Dp, 0.f), vs(4 * a.Dp, 0.f);
  const int64_t n = a.klen(b);  // slots past seqlens_k are garbage by contract: never read
  for (int64_t j0 = 0; j0 < a.Lkp; j0 += 4) {
    for (int64_t jj = 0; jj < 4; ++jj) {
      const int64_t j = j0 + jj;
      float* y = ys.data() + jj * a.Dp;
      float* vv = vs.data() + jj * a.Dp;
      if (j < n) {
        load_row(kp + b * ks0 + h * ks1 + j * ks2, x.data(), a.D);
        if (a.tk.on) rot_row(x.data(), y, a.D, a.R, a.inter, a.tk.c(b, j), a.tk.s(b, j), a.radius);
        else std::copy(x.begin(), x.end(), y);
        const float g = a.gk[b * a.Lk + j];
        if (g != 1.f) for (int64_t d = 0; d < a.D; ++d) y[d] *= g;
        load_row(vp + b * vs0 + h * vs1 + j * vs2, vv, a.D);
      } else {
        std::fill(y, y + a.Dp, 0.f);
        std::fill(vv, vv + a.Dp, 0.f);
      }
      if (Kr) std::copy(y, y + a.Dp, Kr + j * a.Dp);
      if (Vr) std::copy(vv, vv + a.Dp, Vr + j * a.Dp);
    }
    transpose4(ys.data(), a.Dp, a.D, Kt + j0, a.ldt);
    if (Vt) transpose4(vs.data(), a.Dp, a.D, Vt + j0, a.ldt);
  }
}

// Qs rows [0, Mp): sm_scale * rot(q) for rows < rows, zeros after.  Stride Dp.
template <typename T>
static void load_q(const Attn& a, const at::Tensor& q, int64_t b, int64_t h, int64_t i0,
                   int64_t rows, int64_t Mp, float* Qs) {
  const T* qp = q.data_ptr<T>();
  const int64_t s0 = q.stride(0), s1 = q.stride(1), s2 = q.stride(2);
  std::vector<float> x(a.D);
  std::fill(Qs, Qs + Mp * a.Dp, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* y = Qs + r * a.Dp;
    load_row(qp + b * s0 + h * s1 + i * s2, x.data(), a.D);
    if (a.tq.on) rot_row(x.data(), y, a.D, a.R, a.inter, a.tq.c(b, i), a.tq.s(b, i), a.radius);
    else std::copy(x.begin(), x.end(), y);
    for (int64_t d = 0; d < a.D; ++d) y[d] *= a.sm_scale;
  }
}

// Causal: the entries of the S tile (Mp x wp, stride BK) past the diagonal to -inf and,
// with tmax (the row maxima the scores epilogue took over the whole tile), each crossing
// row's maximum recomputed without them.  Nothing to do for a tile below the diagonal.
static inline void causal_tile(const Attn& a, int64_t i0, int64_t Mp, int64_t j0, int64_t wp,
                               float* S, float* tmax) {
  const int64_t off = a.Lk - a.Lq;
  if (!a.causal || i0 + off + 1 - j0 >= wp) return;
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t first = std::max<int64_t>(0, i0 + r + off + 1 - j0);  // first masked col
    if (first >= wp) continue;
    float* row = S + r * BK;
    for (int64_t j = first; j < wp; ++j) row[j] = NEG_INF;
    if (tmax) {
      float mx = NEG_INF;
      for (int64_t j = 0; j < first; ++j) mx = std::max(mx, row[j]);
      tmax[r] = mx;
    }
  }
}

template <typename T>
static void attn_fwd_impl(const Attn& a, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  const int64_t nqb = (a.Lq + BQ - 1) / BQ;
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  // One parallel region over tasks = (b, q head, q block), handed out dynamically in
  // chunks of consecutive q blocks (a whole head when there are enough heads), so a thread
  // that gets less CPU (a shared machine) simply takes fewer chunks.  Each thread
  // rotates/packs the keys and values of each (b, kv head) it meets once into its own
  // scratch (a head split between threads is packed by each), which then stays hot in its
  // cache for every q block of the chunk.
  const int64_t ntask = a.B * a.Hq * nqb;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(nqb, ntask / (4 * nth)));
  const int64_t nchunk = (ntask + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min(nth, nchunk), 1, [&](int64_t, int64_t) {
    fvec Qs(BQ * a.Dp), O(BQ * a.Dp), S(BQ * BK), m(BQ), l(BQ), tmax(BQ), tmaxv(BQ * RMW);
    fbuf Kt = new_fbuf(a.D * a.ldt), Vr = new_fbuf(a.Lkp * a.Dp);
    int64_t packed = -1;
    for (int64_t c = next_chunk.fetch_add(1); c < nchunk; c = next_chunk.fetch_add(1))
    for (int64_t task = c * chunk; task < std::min(ntask, (c + 1) * chunk); ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, b = bh / a.Hq, h = bh % a.Hq;
      const int64_t hk = h / a.grp, i0 = qb * BQ, rows = std::min(BQ, a.Lq - i0);
      const int64_t Mp = round_up(rows, 2);  // gemm takes strips of 6, 4 or 2 rows
      if (packed != b * a.Hkv + hk) {  // every element is written: no zero-fill needed
        pack_kv<T>(a, k, v, b, hk, Kt.get(), nullptr, Vr.get(), nullptr);
        packed = b * a.Hkv + hk;
      }
      const float* kt = Kt.get();
      const float* vr = Vr.get();
      load_q<T>(a, q, b, h, i0, rows, Mp, Qs.data());
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t ke = a.kend(b, i0 + rows);
      const float* bias = a.bias.data() + b * a.Lkp;
      for (int64_t j0 = 0; j0 < ke; j0 += BK) {
        // wk keys, wp = wk padded to whole vectors (the padding keys' P is 0; P V skips them)
        const int64_t wk = std::min(BK, ke - j0), wp = round_up(wk, VL);
        // a tile the causal diagonal crosses: each strip of rows stops at its last key
        const int64_t diag = i0 + (a.Lk - a.Lq) - j0;
        const bool trim = a.causal && diag + 1 < wp;
        // S = Qs K'^T + bias, and each row's maximum, in one pass over the tile
        float* tm = RMW == 1 ? tmax.data() : tmaxv.data();
        std::fill(tm, tm + Mp * RMW, NEG_INF);
        if (trim)
          gemm<false, NCOLS>(Mp, wp, a.D, Qs.data(), a.Dp, 1, kt + j0, a.ldt, S.data(), BK,
                             bias + j0, tm, diag);
        else
          gemm<false>(Mp, wp, a.D, Qs.data(), a.Dp, 1, kt + j0, a.ldt, S.data(), BK,
                      bias + j0, tm);
        if constexpr (RMW > 1)
          for (int64_t r = 0; r < Mp; ++r) tmax[r] = hmax(vload(tm + r * RMW));
        causal_tile(a, i0, Mp, j0, wp, S.data(), tmax.data());
        for (int64_t r = 0; r < Mp; ++r) {
          float* row = S.data() + r * BK;
          // the columns P V reads (past the diagonal, exactly 0 each)
          const int64_t we = trim ? strip_cols(diag, strip_end(r, Mp), wp) : wp;
          const float mnew = std::max(m[r], tmax[r]);
          const float ms = (mnew == NEG_INF) ? 0.f : mnew;
          // (exp(-inf) = 0 without a libm call: the first key block of every row)
          const float alpha = (m[r] == NEG_INF) ? 0.f : std::exp(m[r] - ms);
          const vf msv = vset(ms);
          vf sum = vset(0.f);
          int64_t j = 0;
#ifndef __AVX512F__
          // four exps a step, interleaved (see vexp_n); summed in order
          for (; j + 4 * VL <= we; j += 4 * VL) {
            vf p[4];
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) p[u] = vload(row + j + u * VL) - msv;
            vexp_n<4>(p);
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
              vstore(row + j + u * VL, p[u]);
              sum += p[u];
            }
          }
#endif
          for (; j < we; j += VL) {
            vf p = vexp(vload(row + j) - msv);
            vstore(row + j, p);
            sum += p;
          }
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = mnew;
          if (alpha != 1.f) {
            float* o = O.data() + r * a.Dp;
            for (int64_t d = 0; d < a.Dp; d += VL) vstore(o + d, vload(o + d) * alpha);
          }
        }
        if (trim)
          gemm<true, KEND>(Mp, a.Dp, wk, S.data(), BK, 1, vr + j0 * a.Dp, a.Dp, O.data(), a.Dp,
                           nullptr, nullptr, diag);
        else
          gemm<true>(Mp, a.Dp, wk, S.data(), BK, 1, vr + j0 * a.Dp, a.Dp, O.data(), a.Dp);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        T* dst = op + ((b * a.Hq + h) * a.Lq + i) * a.D;
        float* o = O.data() + r * a.Dp;
        if (l[r] > 0.f) {
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(o[d] * inv);
          lp[(b * a.Hq + h) * a.Lq + i] = m[r] + std::log(l[r]);
        } else if (l[r] != 0.f || a.kend(b, i + 1) > a.first_ok[b]) {
          // NaN: a NaN score, or +inf (inf - inf); or 0 although the row has keys: its
          // logits all overflowed to -inf.  Only a row with every key hard-masked is empty
          // (hard mode: it sees no key before the first one that is not a zero token).
          for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(NAN_F);
          lp[(b * a.Hq + h) * a.Lq + i] = NAN_F;
        } else {
          for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(0.f);
          lp[(b * a.Hq + h) * a.Lq + i] = NEG_INF;
        }
      }
    }
  });
}

// Backward partial sums (reduced in Python): theta_q per (b, q head, row); theta_k per
// (b, kv head, key); radius and zero_scale per phase-1 task and per (b, kv head).
struct BwdParts {
  float* dtq;       // (B, Hq, Lq) or null
  float* dtk;       // (B, Hkv, Lk) or null
  double* drad;     // (ntask + B * Hkv, R/2) or null
  double* dzs;      // (ntask + B * Hkv) or null
};

// Work split for the backward: phase 1 runs one task per (batch, kv head, slice of the
// GQA group's q heads), accumulating that slice's dK'/dV in fp32 buffers; phase 2 sums the
// slices per (batch, kv head) and finishes dk/dv.  The group is sliced only as far as
// needed to give every thread work, so the buffers stay at most ~ threads x one head.
static int64_t bwd_splits(int64_t B, int64_t Hkv, int64_t grp) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nkv = std::max<int64_t>(1, B * Hkv);
  if (nkv >= threads) return 1;
  return std::min<int64_t>(grp, (threads + nkv - 1) / nkv);
}

template <typename T>
static void attn_bwd_impl(const Attn& a, int64_t nsplit, const at::Tensor& dout,
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv, const BwdParts& parts) {
  const int64_t nkv = a.B * a.Hkv;
  const int64_t ntask = nkv * nsplit;
  const int64_t half = a.R / 2;
  const int64_t nqb = (a.Lq + BQ - 1) / BQ;
  const int64_t slab = a.Lkp * a.Dp;
  const T* dop = dout.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  // dk = rot^T(g_j dK'_j) (dK' summed over the nsplit slices at dKb, dVb, stride slab),
  // score-mode dzs, dv; partial sums at row ntask + kv.
  auto finish_kv = [&](int64_t kv, const float* dKb, const float* dVb) {
    std::vector<float> x(a.Dp), y(a.Dp), gk(a.Dp), gv(a.Dp), gx(a.Dp);
    std::vector<double> drho(std::max<int64_t>(half, 1), 0.0);
    const int64_t b = kv / a.Hkv, hk = kv % a.Hkv;
    const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
    double dzs = 0.0;
    const int64_t n = a.klen(b);
    for (int64_t j = n; j < a.Lk; ++j) {  // past seqlens_k: exactly 0, k/v never read
      std::fill_n(dkp + ((b * a.Hkv + hk) * a.Lk + j) * a.D, a.D, static_cast<T>(0.f));
      std::fill_n(dvp + ((b * a.Hkv + hk) * a.Lk + j) * a.D, a.D, static_cast<T>(0.f));
      if (a.tk.on) parts.dtk[kv * a.Lk + j] = 0.f;
    }
    for (int64_t j = 0; j < n; ++j) {
      std::copy(dKb + j * a.Dp, dKb + j * a.Dp + a.D, gk.begin());
      std::copy(dVb + j * a.Dp, dVb + j * a.Dp + a.D, gv.begin());
      for (int64_t sp = 1; sp < nsplit; ++sp) {
        const float* dk_s = dKb + sp * slab + j * a.Dp;
        const float* dv_s = dVb + sp * slab + j * a.Dp;
        for (int64_t d = 0; d < a.D; ++d) { gk[d] += dk_s[d]; gv[d] += dv_s[d]; }
      }
      const bool z = a.has_zero && a.key_zero[b * a.Lk + j];
      T* dst = dkp + ((b * a.Hkv + hk) * a.Lk + j) * a.D;
      load_row(kp + b * s0 + hk * s1 + j * s2, x.data(), a.D);
      if (z && a.score) {
        // dL/ds = kr_j . dK'_j, kr = rot(k) (unscaled)
        if (a.tk.on) rot_row(x.data(), y.data(), a.D, a.R, a.inter, a.tk.c(b, j), a.tk.s(b, j), a.radius);
        else std::copy(x.begin(), x.begin() + a.D, y.begin());
        double dot = 0.0;
        for (int64_t d = 0; d < a.D; ++d) dot += static_cast<double>(y[d]) * gk[d];
        dzs += dot;
        for (int64_t d = 0; d < a.D; ++d) gk[d] *= a.zs;
      }
      if (a.tk.on) {
        const double dth = rot_row_bwd(x.data(), gk.data(), gx.data(), a.D, a.R, a.inter,
                                       a.tk.c(b, j), a.tk.s(b, j), a.tk.d(b, j), a.radius,
                                       a.radius ? drho.data() : nullptr);
        parts.dtk[kv * a.Lk + j] = static_cast<float>(dth);
        store_row(gx.data(), dst, a.D);
      } else {
        store_row(gk.data(), dst, a.D);
      }
      store_row(gv.data(), dvp + ((b * a.Hkv + hk) * a.Lk + j) * a.D, a.D);
    }
    if (parts.drad)
      for (int64_t i = 0; i < half; ++i) parts.drad[(ntask + kv) * half + i] = drho[i];
    if (parts.dzs) parts.dzs[ntask + kv] = dzs;
  };
  // One slice per (b, kv head): each task finishes its own keys (one parallel region, and
  // the dK'/dV buffers are per thread); sliced groups keep every slice until phase 2.
  const bool fused = nsplit == 1;
  fbuf dKs = fused ? fbuf() : new_fbuf(ntask * slab);
  fbuf dVs = fused ? fbuf() : new_fbuf(ntask * slab);
  // ---- phase 1: (b, hk, slice of q heads) ----
  at::parallel_for(0, ntask, 1, [&](int64_t lo, int64_t hi) {
    fvec Kt(a.D * a.ldt), Kr(slab), Vt(a.D * a.ldt);
    std::vector<double> rzs(BQ), rns(BQ), rzp(BQ), rnp(BQ);
    fvec Qs(BQ * a.Dp), dO(BQ * a.Dp), dQ(BQ * a.Dp), P(BQ * BK), dS(BQ * BK);
    std::vector<float> delta(BQ), lrow(BQ), x(a.Dp), gx(a.Dp);
    std::vector<double> drho(std::max<int64_t>(half, 1));
    fvec own_dK(fused ? slab : 0), own_dV(fused ? slab : 0);
    int64_t packed = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t kv = task / nsplit, sp = task % nsplit;
      const int64_t b = kv / a.Hkv, hk = kv % a.Hkv;
      if (packed != kv) {  // consecutive slices of one kv head share the packed keys
        pack_kv<T>(a, k, v, b, hk, Kt.data(), Kr.data(), nullptr, Vt.data());
        packed = kv;
      }
      float* dK = fused ? own_dK.data() : dKs.get() + task * slab;
      float* dV = fused ? own_dV.data() : dVs.get() + task * slab;
      std::fill(dK, dK + slab, 0.f);
      std::fill(dV, dV + slab, 0.f);
      std::fill(drho.begin(), drho.end(), 0.0);
      double dlns = 0.0;
      const int64_t h_begin = hk * a.grp + (sp * a.grp) / nsplit;
      const int64_t h_end = hk * a.grp + ((sp + 1) * a.grp) / nsplit;
      for (int64_t h = h_begin; h < h_end; ++h) {
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BQ, rows = std::min(BQ, a.Lq - i0);
          const int64_t Mp = round_up(rows, 2);  // gemm takes strips of 6, 4 or 2 rows
          load_q<T>(a, q, b, h, i0, rows, Mp, Qs.data());
          std::fill(dO.begin(), dO.end(), 0.f);
          std::fill(dQ.begin(), dQ.end(), 0.f);
          for (int64_t r = 0; r < Mp; ++r) {
            if (r < rows) {
              const int64_t row = (b * a.Hq + h) * a.Lq + i0 + r;
              // Delta = dO . O in double, four partial sums (a single chain of dependent
              // double adds was a tenth of this loop nest's time at D = 24)
              float* go = dO.data() + r * a.Dp;
              const T* orow = op + row * a.D;
              load_row(dop + row * a.D, go, a.D);
              double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
              int64_t d = 0;
              for (; d + 4 <= a.D; d += 4) {
                s0 += static_cast<double>(go[d]) * static_cast<float>(orow[d]);
                s1 += static_cast<double>(go[d + 1]) * static_cast<float>(orow[d + 1]);
                s2 += static_cast<double>(go[d + 2]) * static_cast<float>(orow[d + 2]);
                s3 += static_cast<double>(go[d + 3]) * static_cast<float>(orow[d + 3]);
              }
              for (; d < a.D; ++d) s0 += static_cast<double>(go[d]) * static_cast<float>(orow[d]);
              delta[r] = static_cast<float>((s0 + s1) + (s2 + s3));
              const float L = lp[row];
              lrow[r] = (L == NEG_INF) ? POS_INF : L;  // empty row: P = exp(-inf) = 0
            } else {
              delta[r] = 0.f;
              lrow[r] = POS_INF;
            }
          }
          std::fill(rzs.begin(), rzs.end(), 0.0); std::fill(rns.begin(), rns.end(), 0.0);
          std::fill(rzp.begin(), rzp.end(), 0.0); std::fill(rnp.begin(), rnp.end(), 0.0);
          const bool zsum = a.has_zero && !a.score;
          const int64_t ke = a.kend(b, i0 + rows);
          for (int64_t j0 = 0; j0 < ke; j0 += BK) {
            // wk keys, wp padded to whole vectors; the products with P or dS skip the padding
            // (wkr: rows of dV / dK, a multiple of 2 for gemm)
            const int64_t wk = std::min(BK, ke - j0), wp = round_up(wk, VL), wkr = round_up(wk, 2);
            // a tile the causal diagonal crosses: see Trim (and the forward)
            const int64_t diag = i0 + (a.Lk - a.Lq) - j0;
            const bool trim = a.causal && diag + 1 < wp;
            const float* bias = a.bias.data() + b * a.Lkp + j0;
            if (trim) {  // the forward's S, bitwise
              gemm<false, NCOLS>(Mp, wp, a.D, Qs.data(), a.Dp, 1, Kt.data() + j0, a.ldt,
                                 P.data(), BK, bias, nullptr, diag);
              causal_tile(a, i0, Mp, j0, wp, P.data(), nullptr);
              gemm<false, NCOLS>(Mp, wp, a.D, dO.data(), a.Dp, 1, Vt.data() + j0, a.ldt,
                                 dS.data(), BK, nullptr, nullptr, diag);
            } else {
              gemm<false>(Mp, wp, a.D, Qs.data(), a.Dp, 1, Kt.data() + j0, a.ldt, P.data(), BK,
                          bias);
              causal_tile(a, i0, Mp, j0, wp, P.data(), nullptr);
              gemm<false>(Mp, wp, a.D, dO.data(), a.Dp, 1, Vt.data() + j0, a.ldt, dS.data(), BK);
            }
            const float* zf = a.zf.data() + b * a.Lkp + j0;
            for (int64_t r = 0; r < Mp; ++r) {
              float* pr = P.data() + r * BK;
              float* sr = dS.data() + r * BK;
              // the columns with scores (past the diagonal, P = dS = 0 exactly)
              const int64_t we = trim ? strip_cols(diag, strip_end(r, Mp), wp) : wp;
              const vf lv = vset(lrow[r]), dl = vset(delta[r]);
              vf azs = vset(0.f), ans = vset(0.f), azp = vset(0.f), anp = vset(0.f);
              // p = exp(S - lse) into P, dS = P (dP - Delta) in place of dP
              auto step = [&](int64_t j, vf p) {
                vstore(pr + j, p);
                const vf ds = p * (vload(sr + j) - dl);
                vstore(sr + j, ds);
                if (zsum) {  // per side, sums of P (dP - Delta) and of P (see dlns below)
                  // (selects, not products with 0/1: a NaN on one side stays on that side)
                  const vi z = vload(zf + j) != 0.0f;
                  const vf zero = vset(0.f);
                  azs += z ? ds : zero; ans += z ? zero : ds;
                  azp += z ? p : zero; anp += z ? zero : p;
                }
              };
              int64_t j = 0;
#ifndef __AVX512F__
              // four independent exps a step, as in the forward; the sums in order
              for (; j + 4 * VL <= we; j += 4 * VL) {
                vf p[4];
#pragma GCC unroll 4
                for (int u = 0; u < 4; ++u) p[u] = vload(pr + j + u * VL) - lv;
                vexp_n<4>(p);
#pragma GCC unroll 4
                for (int u = 0; u < 4; ++u) step(j + u * VL, p[u]);
              }
#endif
              for (; j < we; j += VL) step(j, vexp(vload(pr + j) - lv));
              for (; j < wp; j += VL) {  // dV and dK read these
                vstore(pr + j, vset(0.f));
                vstore(sr + j, vset(0.f));
              }
              if (zsum) {
                rzs[r] += hsum(azs); rns[r] += hsum(ans); rzp[r] += hsum(azp); rnp[r] += hsum(anp);
              }
            }
            // dV += P^T dO ; dK' += dS^T Qs ; dQs += dS K'
            if (trim) {
              gemm<true, KSTART>(wkr, a.Dp, Mp, P.data(), 1, BK, dO.data(), a.Dp,
                                 dV + j0 * a.Dp, a.Dp, nullptr, nullptr, diag);
              gemm<true, KSTART>(wkr, a.Dp, Mp, dS.data(), 1, BK, Qs.data(), a.Dp,
                                 dK + j0 * a.Dp, a.Dp, nullptr, nullptr, diag);
              gemm<true, KEND>(Mp, a.Dp, wk, dS.data(), BK, 1, Kr.data() + j0 * a.Dp, a.Dp,
                               dQ.data(), a.Dp, nullptr, nullptr, diag);
            } else {
              gemm<true>(wkr, a.Dp, Mp, P.data(), 1, BK, dO.data(), a.Dp, dV + j0 * a.Dp, a.Dp);
              gemm<true>(wkr, a.Dp, Mp, dS.data(), 1, BK, Qs.data(), a.Dp, dK + j0 * a.Dp, a.Dp);
              gemm<true>(Mp, a.Dp, wk, dS.data(), BK, 1, Kr.data() + j0 * a.Dp, a.Dp, dQ.data(),
                         a.Dp);
            }
          }
          // prob mode: dL/d ln s = sum over zero keys of dS' = sum_z P (dP - Delta).  With
          // the row's own sums (z: zero keys, n: the others; A = sum P dP, M = sum P) and
          // Delta = (A_z + A_n) / (M_z + M_n), that is (A_z M_n - A_n M_z) / (M_z + M_n): the
          // softmax backward of the recomputed P itself, so the rounding of Delta (from
          // dO . O) does not enter the small difference this sum cancels to.  The same holds
          // with dP - Delta' for dP, any Delta' (the terms Delta' P cancel exactly), so the
          // kernel sums B = P (dP - Delta') = dS, Delta' the float Delta: terms that are
          // small where dP is near Delta, so their float sums carry far less rounding than
          // those of P dP would (in double from there on).
          if (zsum)
            for (int64_t r = 0; r < rows; ++r) {
              const double mass = rzp[r] + rnp[r];
              // (no zero-key terms: nothing to add, even on a NaN row; mass = 0: an empty
              // row; NaN propagates otherwise)
              if ((rzs[r] != 0.0 || rzp[r] != 0.0) && mass != 0.0)
                dlns += (rzs[r] * rnp[r] - rns[r] * rzp[r]) / mass;
            }
          // dq = rot^T(sm_scale * dQs)
          const int64_t s0 = q.stride(0), s1 = q.stride(1), s2 = q.stride(2);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            float* gq = dQ.data() + r * a.Dp;
            for (int64_t d = 0; d < a.D; ++d) gq[d] *= a.sm_scale;
            T* dst = dqp + ((b * a.Hq + h) * a.Lq + i) * a.D;
            if (a.tq.on) {
              load_row(qp + b * s0 + h * s1 + i * s2, x.data(), a.D);
              const double dth = rot_row_bwd(x.data(), gq, gx.data(), a.D, a.R, a.inter,
                                             a.tq.c(b, i), a.tq.s(b, i), a.tq.d(b, i),
                                             a.radius, a.radius ? drho.data() : nullptr);
              parts.dtq[(b * a.Hq + h) * a.Lq + i] = static_cast<float>(dth);
              store_row(gx.data(), dst, a.D);
            } else {
              store_row(gq, dst, a.D);
            }
          }
        }
      }
      if (parts.drad) for (int64_t i = 0; i < half; ++i) parts.drad[task * half + i] = drho[i];
      if (parts.dzs) parts.dzs[task] = (a.score || a.hard) ? 0.0 : dlns / a.zs;
      if (fused) finish_kv(kv, dK, dV);
    }
  });
  // ---- phase 2 (only when the group was sliced): (b, hk) sums its slices ----
  if (!fused) {
    at::parallel_for(0, nkv, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t kv = lo; kv < hi; ++kv)
        finish_kv(kv, dKs.get() + kv * nsplit * slab, dVs.get() + kv * nsplit * slab);
    });
  }
}

template <typename F>
static void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "zeromask cpp backend: dtype ", st, " is not supported "
                                "(float32, bfloat16, float16)");
  }
}

// The binding-facing entry points (csrc/include/zeromask_args.h reads and checks the record).

void attention_forward(const zm_args::AttentionArgs& x, at::Tensor out, at::Tensor lse) {
  zm_args::check_like_q(out, x, at::kCPU, "cpp", "out");
  zm_args::check_rows(lse, x, at::kCPU, "cpp", "lse");
  Attn a;
  setup_attn(a, x, false);
  if (a.B * a.Hq * a.Lq == 0) return;
  dispatch_dtype(x.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    attn_fwd_impl<T>(a, x.q, x.k, x.v, out, lse);
  });
}

// Returns the partial sums (dtheta_q (B, Hq, Lq), dtheta_k (B, Hkv, Lk), dradius (n, R/2),
// dzero_scale (n,)), each an empty tensor when not needed; zeromask/backends/cpp.py reduces
// them into the outputs.  dq, dk, dv are written in full.
std::vector<at::Tensor> attention_backward(const zm_args::AttentionArgs& x,
                                           const at::Tensor& dout, const at::Tensor& out,
                                           const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                                           at::Tensor dv) {
  zm_args::check_like_q(dout, x, at::kCPU, "cpp", "dout");
  zm_args::check_like_q(out, x, at::kCPU, "cpp", "out");
  zm_args::check_rows(lse, x, at::kCPU, "cpp", "lse");
  zm_args::check_like_q(dq, x, at::kCPU, "cpp", "dq");
  zm_args::check_dense(dk, x.k.sizes(), x.q.scalar_type(), at::kCPU, "cpp", "dk");
  zm_args::check_dense(dv, x.v.sizes(), x.q.scalar_type(), at::kCPU, "cpp", "dv");
  Attn a;
  setup_attn(a, x, true);
  // torch.use_deterministic_algorithms(True): never slice a GQA group across threads, so
  // every sum runs in one fixed order and the gradients are bitwise the same for any
  // thread count (slices are summed in phase 2 in an order that depends on nsplit)
  const int64_t nsplit = at::globalContext().deterministicAlgorithms()
                             ? 1 : bwd_splits(a.B, a.Hkv, a.grp);
  const int64_t nrows = a.B * a.Hkv * nsplit + a.B * a.Hkv;
  auto f32 = x.q.options().dtype(at::kFloat);
  auto f64 = x.q.options().dtype(at::kDouble);
  at::Tensor dtq = a.tq.on ? at::empty({a.B, a.Hq, a.Lq}, f32) : at::empty({0}, f32);
  at::Tensor dtk = a.tk.on ? at::empty({a.B, a.Hkv, a.Lk}, f32) : at::empty({0}, f32);
  at::Tensor drad = a.radius ? at::empty({nrows, a.R / 2}, f64) : at::empty({0}, f64);
  at::Tensor dzs = a.has_zero ? at::empty({nrows}, f64) : at::empty({0}, f64);
  BwdParts parts{a.tq.on ? dtq.data_ptr<float>() : nullptr,
                 a.tk.on ? dtk.data_ptr<float>() : nullptr,
                 a.radius ? drad.data_ptr<double>() : nullptr,
                 a.has_zero ? dzs.data_ptr<double>() : nullptr};
  if (a.B * a.Hkv > 0) {
    dispatch_dtype(x.q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      attn_bwd_impl<T>(a, nsplit, dout, x.q, x.k, x.v, out, lse, dq, dk, dv, parts);
    });
  }
  return {dtq, dtk, drad, dzs};
}

// ---------------------------------------------------------------------------------------
// standalone rotary op
// ---------------------------------------------------------------------------------------
void rotary_forward(const zm_args::RotaryArgs& r, at::Tensor y) {
  zm_args::check_dense(y, r.x.sizes(), r.x.scalar_type(), at::kCPU, "cpp", "y");
  const int64_t B = r.B, H = r.H, L = r.L, D = r.D, R = r.rotary_dim;
  const bool interleaved = r.interleaved;
  const float* rho = r.radius.has_value() ? r.radius->data_ptr<float>() : nullptr;
  RotTable t = make_table(r.theta, r.positions, B, L, R, false);
  const at::Tensor& x = r.x;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    at::parallel_for(0, B * H * L, 64, [&](int64_t lo, int64_t hi) {
      std::vector<float> a(D), o(D);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t l = row % L, h = (row / L) % H, b = row / (L * H);
        load_row(xp + b * s0 + h * s1 + l * s2, a.data(), D);
        rot_row(a.data(), o.data(), D, R, interleaved, t.c(b, l), t.s(b, l), rho);
        store_row(o.data(), yp + row * D, D);
      }
    });
  });
}

// dx (like x, contiguous), dtheta (B, L) float32, drad_part (B*L, R/2) float64 or None.
void rotary_backward(const zm_args::RotaryArgs& r, const at::Tensor& dy, at::Tensor dx,
                     at::Tensor dtheta, std::optional<at::Tensor> drad_part) {
  const at::Tensor& x = r.x;
  zm_args::check_dense(dy, x.sizes(), x.scalar_type(), at::kCPU, "cpp", "dy");
  zm_args::check_dense(dx, x.sizes(), x.scalar_type(), at::kCPU, "cpp", "dx");
  zm_args::check_dense(dtheta, r.theta.sizes(), at::kFloat, at::kCPU, "cpp", "dtheta");
  const int64_t B = r.B, H = r.H, L = r.L, D = r.D, R = r.rotary_dim;
  const bool interleaved = r.interleaved;
  const float* rho = nullptr;
  double* drp = nullptr;
  const int64_t half = R / 2;
  if (r.radius.has_value()) {
    rho = r.radius->data_ptr<float>();
    TORCH_CHECK(drad_part.has_value(), "zeromask cpp backend: drad_part missing");
    zm_args::check_dense(*drad_part, {B * L, half}, at::kDouble, at::kCPU, "cpp", "drad_part");
    drp = drad_part->data_ptr<double>();
  }
  RotTable t = make_table(r.theta, r.positions, B, L, R, true);
  float* dtp = dtheta.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* dyp = dy.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    at::parallel_for(0, B * L, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> a(D), g(D), o(D);
      std::vector<double> dr(std::max<int64_t>(half, 1));
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / L, l = row % L;
        std::fill(dr.begin(), dr.end(), 0.0);
        double dth = 0.0;
        for (int64_t h = 0; h < H; ++h) {
          load_row(xp + b * s0 + h * s1 + l * s2, a.data(), D);
          load_row(dyp + ((b * H + h) * L + l) * D, g.data(), D);
          dth += rot_row_bwd(a.data(), g.data(), o.data(), D, R, interleaved, t.c(b, l),
                             t.s(b, l), t.d(b, l), rho, rho ? dr.data() : nullptr);
          store_row(o.data(), dxp + ((b * H + h) * L + l) * D, D);
        }
        dtp[row] = static_cast<float>(dth);
        if (drp) for (int64_t i = 0; i < half; ++i) drp[row * half + i] = dr[i];
      }
    });
  });
}

}  // namespace zm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeromask CPU kernels: fused f0 rotary + zero-soft attention, f0 rotary";
  // each takes the call's record (zeromask.backends.AttentionArgs / RotaryArgs) first
  m.def("attention_fwd", [](const py::object& args, at::Tensor out, at::Tensor lse) {
    zm::attention_forward(zm_args::attention_args(args, at::kCPU, "cpp"), out, lse);
  }, "fused attention forward (writes out, lse)");
  m.def("attention_bwd", [](const py::object& args, const at::Tensor& dout,
                            const at::Tensor& out, const at::Tensor& lse, at::Tensor dq,
                            at::Tensor dk, at::Tensor dv) {
    return zm::attention_backward(zm_args::attention_args(args, at::kCPU, "cpp"), dout, out,
                                  lse, dq, dk, dv);
  }, "fused attention backward (writes dq, dk, dv; returns the partial sums)");
  m.def("rotary_fwd", [](const py::object& args, at::Tensor y) {
    zm::rotary_forward(zm_args::rotary_args(args, at::kCPU, "cpp"), y);
  }, "f0 rotary forward (writes y)");
  m.def("rotary_bwd", [](const py::object& args, const at::Tensor& dy, at::Tensor dx,
                         at::Tensor dtheta, std::optional<at::Tensor> drad_part) {
    zm::rotary_backward(zm_args::rotary_args(args, at::kCPU, "cpp"), dy, dx, dtheta, drad_part);
  }, "f0 rotary backward (writes dx, dtheta, drad_part)");
}
