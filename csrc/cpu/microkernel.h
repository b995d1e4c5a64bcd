// The register-blocked microkernel every product of the attention kernels runs through
// (Q K^T, P V, dP, dV, dK, dQ), its causal trimming, and 64-byte aligned scratch buffers.
#pragma once
#include "vec.h"

namespace zm {

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
//   KSTEPS: rows are head dims, columns keys, K runs over queries (dV^T += dO^T P, dK'^T
//           += Qs^T dS): K in steps of VL queries, each over the columns its queries reach
//           (C is re-read per step: accumulating products only).
// Skipped terms are exact zeros (P = 0 past the diagonal), so results are the same.
enum Trim { NONE, NCOLS, KEND, KSTEPS };
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
    if constexpr (TRIM == KSTEPS) {
      static_assert(ACC, "KSTEPS accumulates");
      for (int64_t t0 = 0; t0 < K; t0 += VL) {
        const int64_t kt = std::min<int64_t>(VL, K - t0);
        const int64_t nt = strip_cols(diag, t0 + kt, N);  // keys j <= t + diag
        if (nt > 0)
          strip<MR, true>(nt, kt, A + m * asr + t0 * ast, asr, ast, B + t0 * ldb, ldb,
                          C + m * ldc, ldc, nullptr, nullptr);
      }
      return;
    }
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

}  // namespace zm
