// zeromask CUDA kernels: fused f0 rotary + zero-soft attention (forward, backward) and the
// standalone f0 rotary op.  Plain CUDA C++ on raw pointers (no ATen / c10 headers), so nvcc
// compiles it on a machine whose torch is a CPU build.  docs/design.md 3.1 and 3.3.
//
// Layout: a block is 8 warps.  Forward and dQ: one warp per query row, key tiles of 32
// keys (rotated as they are loaded into shared memory, score-mode scale folded in), lane j
// of a warp scores key j of the tile, lanes own head dims d = lane + 32 c of the output.
// dK/dV: one warp per key row, query tiles of 32 (rotated as loaded) over every query head
// of the GQA group.  Online softmax in fp32 for every input dtype; memory O(L) (no L x L
// buffer, no rotated copy of q/k, no cos/sin table).  Rotary angles are formed in double
// precision (pos * theta^(-2i/R) reaches thousands of radians) and reduced before sincosf.
// theta / radius / zero_scale gradients are float atomics into zeroed buffers.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "zeromask_cuda.h"

namespace zmc {
namespace {

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int TK = 32;                 // keys (or queries) per shared tile
constexpr int MAXD = kMaxHeadDim;
constexpr int MAXC = MAXD / 32;        // head dims per lane
constexpr int SD = MAXD + 1;           // padded smem row stride (no bank conflicts)
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// cos/sin of phi_i = pos * theta^(-2i/R), and dphi/dtheta.
__device__ __forceinline__ void angle(float theta, float pos, int i, int R, float* c, float* s,
                                      float* dpdt) {
  const double th = theta, p = pos;
  const double e = -2.0 * static_cast<double>(i) / static_cast<double>(R);
  const double w = exp(e * log(th));
  const double phi = p * w;
  const double red = phi - 6.283185307179586 * rint(phi * 0.15915494309189535);
  sincosf(static_cast<float>(red), s, c);
  if (dpdt) *dpdt = static_cast<float>(p * e * w / th);
}

__device__ __forceinline__ void pair_idx(int i, int half, bool inter, int* a, int* b) {
  if (inter) { *a = 2 * i; *b = 2 * i + 1; } else { *a = i; *b = i + half; }
}

// The one rotation of the forward: pair i of row x (shared memory), in place, by
// phi_i = pos * theta^(-2i/R), scaled by rho[i] (rho may be null).
__device__ __forceinline__ void rotate_pair(float* x, int i, int R, bool inter, float theta,
                                            float pos, const float* rho) {
  int ia, ib;
  pair_idx(i, R / 2, inter, &ia, &ib);
  float c, s;
  angle(theta, pos, i, R, &c, &s, nullptr);
  const float r = rho ? rho[i] : 1.f;
  const float xa = x[ia], xb = x[ib];
  x[ia] = r * (xa * c - xb * s);
  x[ib] = r * (xa * s + xb * c);
}

// In place rotation of row x (D floats, shared memory) by `nthreads` threads (tid).
__device__ void rotate_row(float* x, int D, int R, bool inter, float theta, float pos,
                           const float* rho, int tid, int nthreads) {
  for (int i = tid; i < R / 2; i += nthreads) rotate_pair(x, i, R, inter, theta, pos, rho);
}

// Block-cooperative, in place: rows r < TK of a shared tile (row stride SD) at sequence
// positions t = t0 + r < len, each rotated by its theta[t], pos[t] (this batch row's).
__device__ void rotate_tile(float* tile, int t0, int len, const float* theta, const float* pos,
                            const AttnParams& p) {
  const int half = p.R / 2;
  for (int idx = threadIdx.x; idx < TK * half; idx += blockDim.x) {
    const int r = idx / half, i = idx % half, t = t0 + r;
    if (t < len) rotate_pair(tile + r * SD, i, p.R, p.interleaved, theta[t], pos[t], p.radius);
  }
  __syncthreads();
}

// Rotary backward for one row by one warp: g (dy, shared) and x (input, shared) ->
// dx written to g in place.  Returns dL/dtheta (warp-reduced, valid in every lane); adds
// dL/drho atomically.
__device__ float rotate_row_bwd(const float* x, float* g, int D, int R, bool inter, float theta,
                                float pos, const float* rho, float* drho, int lane) {
  const int half = R / 2;
  float dth = 0.f;
  for (int i = lane; i < half; i += 32) {
    int ia, ib;
    pair_idx(i, half, inter, &ia, &ib);
    float c, s, dp;
    angle(theta, pos, i, R, &c, &s, &dp);
    const float r = rho ? rho[i] : 1.f;
    const float xa = x[ia], xb = x[ib];
    const float ya = xa * c - xb * s, yb = xa * s + xb * c;
    const float ga = g[ia], gb = g[ib];
    g[ia] = r * (ga * c + gb * s);
    g[ib] = r * (gb * c - ga * s);
    dth += r * (gb * ya - ga * yb) * dp;
    if (drho) atomicAdd(drho + i, ga * ya + gb * yb);
  }
  __syncwarp();
  return warp_sum(dth);
}

// Load one (b, h, row) of a strided tensor into shared floats (zeros when !ok).
template <typename T>
__device__ __forceinline__ void load_row(const T* base, int64_t off, bool ok, float* dst, int D,
                                         int tid, int nthreads) {
  for (int d = tid; d < D; d += nthreads) dst[d] = ok ? ld(base + off + d) : 0.f;
}

__device__ __forceinline__ int key_len(const AttnParams& p, int b) {
  if (!p.seqlens) return p.Lk;
  const int n = p.seqlens[b];
  return n < 0 ? 0 : (n > p.Lk ? p.Lk : n);
}

// Block-cooperative: rows [r0, r0 + TK) of k (rotated, score-scaled: K' = g * rot(k)) and
// optionally v into shared tiles with stride SD.  Rows past the batch row's length
// (seqlens_k, or Lk) are zero: those slots are garbage by contract and never read, so a
// NaN there cannot reach a product with a masked P = 0.
template <typename T>
__device__ void load_key_tile(const AttnParams& p, int b, int hk, int j0, float* Ks, float* Vs) {
  const T* kp = static_cast<const T*>(p.k);
  const T* vp = static_cast<const T*>(p.v);
  const int D = p.D;
  const int klen = key_len(p, b);
  for (int idx = threadIdx.x; idx < TK * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, j = j0 + r;
    const bool ok = j < klen;
    Ks[r * SD + d] = ok ? ld(kp + b * p.ks0 + hk * p.ks1 + j * p.ks2 + d) : 0.f;
    if (Vs) Vs[r * SD + d] = ok ? ld(vp + b * p.vs0 + hk * p.vs1 + j * p.vs2 + d) : 0.f;
  }
  __syncthreads();
  if (p.theta_k) rotate_tile(Ks, j0, p.Lk, p.theta_k + b * p.Lk, p.pos_k + b * p.Lk, p);
  if (p.score && p.key_zero) {
    for (int idx = threadIdx.x; idx < TK * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D, j = j0 + r;
      if (j < p.Lk && p.key_zero[b * p.Lk + j]) Ks[r * SD + d] *= p.zs;
    }
    __syncthreads();
  }
}

// Block-cooperative: query rows [i0, i0 + TK) of head h, rotated and scaled by sm_scale, and
// the matching dO rows, lse (+inf for empty rows) and delta.
template <typename T>
__device__ void load_query_tile(const AttnParams& p, int b, int h, int i0, float* Qs, float* Ds,
                                float* lse_s, float* dl_s) {
  const T* qp = static_cast<const T*>(p.q);
  const T* dop = static_cast<const T*>(p.dout);
  const int D = p.D;
  for (int idx = threadIdx.x; idx < TK * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, i = i0 + r;
    const bool ok = i < p.Lq;
    Qs[r * SD + d] = ok ? ld(qp + b * p.qs0 + h * p.qs1 + i * p.qs2 + d) : 0.f;
    Ds[r * SD + d] = ok ? ld(dop + ((static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i) * D + d) : 0.f;
  }
  for (int r = threadIdx.x; r < TK; r += blockDim.x) {
    const int i = i0 + r;
    if (i < p.Lq) {
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i;
      const float L = p.lse_in[row];
      lse_s[r] = (L == neg_inf()) ? pos_inf() : L;
      dl_s[r] = p.delta[row];
    } else {
      lse_s[r] = pos_inf();
      dl_s[r] = 0.f;
    }
  }
  __syncthreads();
  if (p.theta_q) rotate_tile(Qs, i0, p.Lq, p.theta_q + b * p.Lq, p.pos_q + b * p.Lq, p);
  for (int idx = threadIdx.x; idx < TK * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    Qs[r * SD + d] *= p.sm_scale;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------
// forward: grid (ceil(Lq / WARPS), Hq, B), block THREADS
// ------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(THREADS) fwd_kernel(AttnParams p) {
  __shared__ float Ks[TK * SD];
  __shared__ float Vs[TK * SD];
  __shared__ float Qw[WARPS][MAXD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const int i = blockIdx.x * WARPS + warp;
  const bool row_ok = i < p.Lq;
  const int D = p.D, off = p.Lk - p.Lq;
  const T* qp = static_cast<const T*>(p.q);
  float* qw = Qw[warp];
  load_row(qp, b * p.qs0 + h * p.qs1 + static_cast<int64_t>(i) * p.qs2, row_ok, qw, D, lane, 32);
  __syncwarp();
  if (p.theta_q && row_ok)
    rotate_row(qw, D, p.R, p.interleaved, p.theta_q[b * p.Lq + i], p.pos_q[b * p.Lq + i],
               p.radius, lane, 32);
  __syncwarp();
  for (int d = lane; d < D; d += 32) qw[d] *= p.sm_scale;
  __syncwarp();

  const int klen = key_len(p, b);
  int last = blockIdx.x * WARPS + WARPS - 1;
  if (last >= p.Lq) last = p.Lq - 1;
  int kend = klen;
  if (p.causal) { const int e = last + off + 1; kend = e < kend ? (e < 0 ? 0 : e) : kend; }
  const float lns = logf(p.zs);

  float m = neg_inf(), l = 0.f;
  float o[MAXC];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) o[c] = 0.f;
  for (int j0 = 0; j0 < kend; j0 += TK) {
    __syncthreads();
    load_key_tile<T>(p, b, hk, j0, Ks, Vs);
    const int j = j0 + lane;
    float s = neg_inf();
    if (row_ok && j < klen && (!p.causal || j <= i + off)) {
      float acc = 0.f;
      const float* kr = Ks + lane * SD;
      for (int d = 0; d < D; ++d) acc += qw[d] * kr[d];
      if (!p.score && p.key_zero && p.key_zero[b * p.Lk + j]) acc += lns;
      s = acc;
    }
    const float mnew = fmaxf(m, warp_max(s));
    const float ms = (mnew == neg_inf()) ? 0.f : mnew;
    const float pj = expf(s - ms);
    const float alpha = expf(m - ms);
    l = l * alpha + warp_sum(pj);
    m = mnew;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) o[c] *= alpha;
    for (int jj = 0; jj < TK; ++jj) {
      const float pp = __shfl_sync(FULL, pj, jj);
      const float* vr = Vs + jj * SD;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int d = lane + 32 * c;
        if (d < D) o[c] += pp * vr[d];
      }
    }
  }
  if (row_ok) {
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i;
    T* op = static_cast<T*>(p.out) + row * D;
    // l > 0: a normal row.  l = 0 with no key left (every key hard-masked): an empty row,
    // out 0 / lse -inf.  Otherwise the row is NaN: a NaN score (fmaxf drops it from m,
    // expf keeps it in l), +inf (inf - inf), or logits that all overflowed to -inf although
    // the row has keys.  A kernel never hides a NaN.
    const int row_keys = p.causal ? min(klen, max(0, i + off + 1)) : klen;
    const bool empty = l == 0.f && row_keys == 0;
    const bool bad = !(l > 0.f) && !empty;
    const float inv = l > 0.f ? 1.f / l : (bad ? __int_as_float(0x7fc00000) : 0.f);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) st(op + d, bad ? inv : o[c] * inv);
    }
    if (lane == 0) p.lse[row] = l > 0.f ? m + logf(l) : (bad ? inv : neg_inf());
  }
}

// ------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------
// delta = rowsum(dO * O): grid (ceil(rows / WARPS)), one warp per row
template <typename T>
__global__ void __launch_bounds__(THREADS) delta_kernel(AttnParams p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* dop = static_cast<const T*>(p.dout) + row * p.D;
  const T* op = static_cast<const T*>(p.out_in) + row * p.D;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += ld(dop + d) * ld(op + d);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// dQ (+ dtheta_q, prob-mode dzero_scale): grid (ceil(Lq / WARPS), Hq, B)
template <typename T>
__global__ void __launch_bounds__(THREADS) dq_kernel(AttnParams p) {
  __shared__ float Ks[TK * SD];
  __shared__ float Vs[TK * SD];
  __shared__ float Qw[WARPS][MAXD];  // rotated scaled q; later the gradient row
  __shared__ float Dw[WARPS][MAXD];  // dO; later the raw q row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const int i = blockIdx.x * WARPS + warp;
  const bool row_ok = i < p.Lq;
  const int D = p.D, off = p.Lk - p.Lq;
  const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i;
  const T* qp = static_cast<const T*>(p.q);
  const T* dop = static_cast<const T*>(p.dout);
  float* qw = Qw[warp];
  float* dw = Dw[warp];
  load_row(qp, b * p.qs0 + h * p.qs1 + static_cast<int64_t>(i) * p.qs2, row_ok, qw, D, lane, 32);
  load_row(dop, row * D, row_ok, dw, D, lane, 32);
  __syncwarp();
  if (p.theta_q && row_ok)
    rotate_row(qw, D, p.R, p.interleaved, p.theta_q[b * p.Lq + i], p.pos_q[b * p.Lq + i],
               p.radius, lane, 32);
  __syncwarp();
  for (int d = lane; d < D; d += 32) qw[d] *= p.sm_scale;
  __syncwarp();
  float lse = row_ok ? p.lse_in[row] : pos_inf();
  if (lse == neg_inf()) lse = pos_inf();
  const float dl = row_ok ? p.delta[row] : 0.f;

  const int klen = key_len(p, b);
  int last = blockIdx.x * WARPS + WARPS - 1;
  if (last >= p.Lq) last = p.Lq - 1;
  int kend = klen;
  if (p.causal) { const int e = last + off + 1; kend = e < kend ? (e < 0 ? 0 : e) : kend; }
  const float lns = logf(p.zs);
  const bool zsum = p.key_zero && !p.score && p.dzs;

  float g[MAXC];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) g[c] = 0.f;
  float zs_ = 0.f, ns_ = 0.f, zp_ = 0.f, np_ = 0.f;
  for (int j0 = 0; j0 < kend; j0 += TK) {
    __syncthreads();
    load_key_tile<T>(p, b, hk, j0, Ks, Vs);
    const int j = j0 + lane;
    float ds = 0.f;
    if (row_ok && j < klen && (!p.causal || j <= i + off)) {
      const float* kr = Ks + lane * SD;
      const float* vr = Vs + lane * SD;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) { s += qw[d] * kr[d]; dp += dw[d] * vr[d]; }
      const bool z = p.key_zero && p.key_zero[b * p.Lk + j];
      if (!p.score && z) s += lns;
      const float pr = expf(s - lse);
      ds = pr * (dp - dl);
      if (zsum) { if (z) { zs_ += ds; zp_ += pr; } else { ns_ += ds; np_ += pr; } }
    }
    for (int jj = 0; jj < TK; ++jj) {
      const float dsj = __shfl_sync(FULL, ds, jj);
      const float* kr = Ks + jj * SD;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int d = lane + 32 * c;
        if (d < D) g[c] += dsj * kr[d];
      }
    }
  }
  if (zsum) {  // each row's dS' sums to 0: use the side with less probability mass
    zs_ = warp_sum(zs_); ns_ = warp_sum(ns_); zp_ = warp_sum(zp_); np_ = warp_sum(np_);
    // (a row with no zero-key terms adds nothing, even a NaN row)
    if (row_ok && lane == 0 && (zs_ != 0.f || zp_ != 0.f))
      atomicAdd(p.dzs, (zp_ <= np_ ? zs_ : -ns_) / p.zs);
  }
  // dq = rot^T(sm_scale * dQs)
  __syncwarp();
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int d = lane + 32 * c;
    if (d < D) qw[d] = g[c] * p.sm_scale;
  }
  load_row(qp, b * p.qs0 + h * p.qs1 + static_cast<int64_t>(i) * p.qs2, row_ok, dw, D, lane, 32);
  __syncwarp();
  if (p.theta_q && row_ok) {
    const float dth = rotate_row_bwd(dw, qw, D, p.R, p.interleaved, p.theta_q[b * p.Lq + i],
                                     p.pos_q[b * p.Lq + i], p.radius, p.dradius, lane);
    if (lane == 0) atomicAdd(p.dtheta_q + b * p.Lq + i, dth);
  }
  __syncwarp();
  if (row_ok) {
    T* dst = static_cast<T*>(p.dq) + row * D;
    for (int d = lane; d < D; d += 32) st(dst + d, qw[d]);
  }
}

// dK, dV (+ dtheta_k, score-mode dzero_scale): grid (ceil(Lk / WARPS), Hkv, B)
template <typename T>
__global__ void __launch_bounds__(THREADS) dkv_kernel(AttnParams p) {
  __shared__ float Qs[TK * SD];
  __shared__ float Ds[TK * SD];
  __shared__ float Kw[WARPS][MAXD];  // K' = g * rot(k); later the gradient row
  __shared__ float Vw[WARPS][MAXD];  // v; later the raw k row
  __shared__ float lse_s[TK], dl_s[TK];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, hk = blockIdx.y;
  const int j = blockIdx.x * WARPS + warp;
  const int D = p.D, off = p.Lk - p.Lq, grp = p.Hq / p.Hkv;
  const int klen = key_len(p, b);
  const bool key_ok = j < p.Lk;
  const bool live = j < klen;  // hard-masked keys get zero gradients
  const bool z = key_ok && p.key_zero && p.key_zero[b * p.Lk + j];
  const float g = (p.score && z) ? p.zs : 1.f;
  const T* kp = static_cast<const T*>(p.k);
  const T* vp = static_cast<const T*>(p.v);
  float* kw = Kw[warp];
  float* vw = Vw[warp];
  // slots past seqlens_k are never read (loaded as 0): their dk, dv, dtheta_k are exactly 0
  load_row(kp, b * p.ks0 + hk * p.ks1 + static_cast<int64_t>(j) * p.ks2, live, kw, D, lane, 32);
  load_row(vp, b * p.vs0 + hk * p.vs1 + static_cast<int64_t>(j) * p.vs2, live, vw, D, lane, 32);
  __syncwarp();
  if (p.theta_k && key_ok)
    rotate_row(kw, D, p.R, p.interleaved, p.theta_k[b * p.Lk + j], p.pos_k[b * p.Lk + j],
               p.radius, lane, 32);
  __syncwarp();
  for (int d = lane; d < D; d += 32) kw[d] *= g;
  __syncwarp();
  const float lns = logf(p.zs);
  // query rows that can see any key of this block: i >= first_key - off
  const int first_key = blockIdx.x * WARPS;
  int istart = first_key - off;
  if (!p.causal || istart < 0) istart = 0;
  istart = (istart / TK) * TK;
  int block_klen_ok = (first_key < klen);  // some key of this block is live

  float dkv[MAXC], dvv[MAXC];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) { dkv[c] = 0.f; dvv[c] = 0.f; }
  if (block_klen_ok) {
    for (int h = hk * grp; h < (hk + 1) * grp; ++h) {
      for (int i0 = istart; i0 < p.Lq; i0 += TK) {
        __syncthreads();
        load_query_tile<T>(p, b, h, i0, Qs, Ds, lse_s, dl_s);
        const int i = i0 + lane;
        float pr = 0.f, ds = 0.f;
        if (live && i < p.Lq && (!p.causal || j <= i + off)) {
          const float* qr = Qs + lane * SD;
          const float* dr = Ds + lane * SD;
          float s = 0.f, dp = 0.f;
          for (int d = 0; d < D; ++d) { s += qr[d] * kw[d]; dp += dr[d] * vw[d]; }
          if (!p.score && z) s += lns;
          pr = expf(s - lse_s[lane]);
          ds = pr * (dp - dl_s[lane]);
        }
        for (int ii = 0; ii < TK; ++ii) {
          const float pi = __shfl_sync(FULL, pr, ii);
          const float dsi = __shfl_sync(FULL, ds, ii);
          const float* qr = Qs + ii * SD;
          const float* dr = Ds + ii * SD;
#pragma unroll
          for (int c = 0; c < MAXC; ++c) {
            const int d = lane + 32 * c;
            if (d < D) { dvv[c] += pi * dr[d]; dkv[c] += dsi * qr[d]; }
          }
        }
      }
    }
  }
  // score mode: dL/ds = rot(k) . dK' (K' = s * rot(k)); then dk' -> g * dK'
  __syncwarp();
  if (p.score && z && p.dzs) {
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) dot += (kw[d] / g) * dkv[c];
    }
    dot = warp_sum(dot);
    if (lane == 0) atomicAdd(p.dzs, dot);
  }
  __syncwarp();
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int d = lane + 32 * c;
    if (d < D) kw[d] = g * dkv[c];
  }
  load_row(kp, b * p.ks0 + hk * p.ks1 + static_cast<int64_t>(j) * p.ks2, live, vw, D, lane, 32);
  __syncwarp();
  if (p.theta_k && key_ok) {
    const float dth = rotate_row_bwd(vw, kw, D, p.R, p.interleaved, p.theta_k[b * p.Lk + j],
                                     p.pos_k[b * p.Lk + j], p.radius, p.dradius, lane);
    if (lane == 0) atomicAdd(p.dtheta_k + b * p.Lk + j, dth);
  }
  __syncwarp();
  if (key_ok) {
    const int64_t row = (static_cast<int64_t>(b) * p.Hkv + hk) * p.Lk + j;
    T* dk = static_cast<T*>(p.dk) + row * D;
    T* dv = static_cast<T*>(p.dv) + row * D;
    for (int d = lane; d < D; d += 32) st(dk + d, kw[d]);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) st(dv + d, dvv[c]);
    }
  }
}

// ------------------------------------------------------------------------------------
// standalone rotary: one warp per (b, l) row over all heads
// ------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(THREADS) rotary_fwd_kernel(RotaryParams p) {
  const int64_t bl = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (bl >= static_cast<int64_t>(p.B) * p.L) return;
  const int b = static_cast<int>(bl / p.L), l = static_cast<int>(bl % p.L);
  const int half = p.R / 2;
  const T* xp = static_cast<const T*>(p.x);
  T* yp = static_cast<T*>(p.y);
  for (int i = lane; i < half; i += 32) {
    int ia, ib;
    pair_idx(i, half, p.interleaved, &ia, &ib);
    float c, s;
    angle(p.theta[bl], p.pos[bl], i, p.R, &c, &s, nullptr);
    const float r = p.radius ? p.radius[i] : 1.f;
    for (int h = 0; h < p.H; ++h) {
      const T* x = xp + b * p.xs0 + h * p.xs1 + static_cast<int64_t>(l) * p.xs2;
      T* y = yp + ((static_cast<int64_t>(b) * p.H + h) * p.L + l) * p.D;
      const float xa = ld(x + ia), xb = ld(x + ib);
      st(y + ia, r * (xa * c - xb * s));
      st(y + ib, r * (xa * s + xb * c));
    }
  }
  for (int h = 0; h < p.H; ++h) {
    const T* x = xp + b * p.xs0 + h * p.xs1 + static_cast<int64_t>(l) * p.xs2;
    T* y = yp + ((static_cast<int64_t>(b) * p.H + h) * p.L + l) * p.D;
    for (int d = p.R + lane; d < p.D; d += 32) y[d] = x[d];
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) rotary_bwd_kernel(RotaryParams p) {
  const int64_t bl = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (bl >= static_cast<int64_t>(p.B) * p.L) return;
  const int b = static_cast<int>(bl / p.L), l = static_cast<int>(bl % p.L);
  const int half = p.R / 2;
  const T* xp = static_cast<const T*>(p.x);
  const T* dyp = static_cast<const T*>(p.dy);
  T* dxp = static_cast<T*>(p.dx);
  float dth = 0.f;
  for (int i = lane; i < half; i += 32) {
    int ia, ib;
    pair_idx(i, half, p.interleaved, &ia, &ib);
    float c, s, dp;
    angle(p.theta[bl], p.pos[bl], i, p.R, &c, &s, &dp);
    const float r = p.radius ? p.radius[i] : 1.f;
    float drho = 0.f;
    for (int h = 0; h < p.H; ++h) {
      const T* x = xp + b * p.xs0 + h * p.xs1 + static_cast<int64_t>(l) * p.xs2;
      const int64_t o = ((static_cast<int64_t>(b) * p.H + h) * p.L + l) * p.D;
      const float xa = ld(x + ia), xb = ld(x + ib);
      const float ya = xa * c - xb * s, yb = xa * s + xb * c;
      const float ga = ld(dyp + o + ia), gb = ld(dyp + o + ib);
      st(dxp + o + ia, r * (ga * c + gb * s));
      st(dxp + o + ib, r * (gb * c - ga * s));
      dth += r * (gb * ya - ga * yb) * dp;
      drho += ga * ya + gb * yb;
    }
    if (p.dradius) atomicAdd(p.dradius + i, drho);
  }
  for (int h = 0; h < p.H; ++h) {
    const int64_t o = ((static_cast<int64_t>(b) * p.H + h) * p.L + l) * p.D;
    for (int d = p.R + lane; d < p.D; d += 32) dxp[o + d] = dyp[o + d];
  }
  dth = warp_sum(dth);
  if (lane == 0) p.dtheta[bl] = dth;
}

template <typename T>
int launch_fwd(const AttnParams& p, cudaStream_t st) {
  dim3 grid((p.Lq + WARPS - 1) / WARPS, p.Hq, p.B);
  fwd_kernel<T><<<grid, THREADS, 0, st>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const AttnParams& p, cudaStream_t st) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (rows > 0) {
    delta_kernel<T><<<static_cast<unsigned>((rows + WARPS - 1) / WARPS), THREADS, 0, st>>>(p, rows);
    dim3 gq((p.Lq + WARPS - 1) / WARPS, p.Hq, p.B);
    dq_kernel<T><<<gq, THREADS, 0, st>>>(p);
  }
  if (p.Lk > 0) {  // runs even when Lq == 0: dk and dv are then written as zeros
    dim3 gk((p.Lk + WARPS - 1) / WARPS, p.Hkv, p.B);
    dkv_kernel<T><<<gk, THREADS, 0, st>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_rot(const RotaryParams& p, bool backward, cudaStream_t st) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.L;
  const unsigned blocks = static_cast<unsigned>((rows + WARPS - 1) / WARPS);
  if (backward) rotary_bwd_kernel<T><<<blocks, THREADS, 0, st>>>(p);
  else rotary_fwd_kernel<T><<<blocks, THREADS, 0, st>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int attention_forward(const AttnParams& p, DType dtype, void* stream) {
  if (p.D > MAXD || p.B == 0 || p.Hq == 0 || p.Lq == 0) return p.D > MAXD ? 1 : 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_fwd<float>(p, st);
    case kF16: return launch_fwd<__half>(p, st);
    case kBF16: return launch_fwd<__nv_bfloat16>(p, st);
  }
  return 1;
}

int attention_backward(const AttnParams& p, DType dtype, void* stream) {
  if (p.D > MAXD) return 1;
  if (p.B == 0 || p.Hkv == 0 || (p.Lq == 0 && p.Lk == 0)) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_bwd<float>(p, st);
    case kF16: return launch_bwd<__half>(p, st);
    case kBF16: return launch_bwd<__nv_bfloat16>(p, st);
  }
  return 1;
}

int rotary_forward(const RotaryParams& p, DType dtype, void* stream) {
  if (static_cast<int64_t>(p.B) * p.L == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_rot<float>(p, false, st);
    case kF16: return launch_rot<__half>(p, false, st);
    case kBF16: return launch_rot<__nv_bfloat16>(p, false, st);
  }
  return 1;
}

int rotary_backward(const RotaryParams& p, DType dtype, void* stream) {
  if (static_cast<int64_t>(p.B) * p.L == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_rot<float>(p, true, st);
    case kF16: return launch_rot<__half>(p, true, st);
    case kBF16: return launch_rot<__nv_bfloat16>(p, true, st);
  }
  return 1;
}

const char* error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace zmc
