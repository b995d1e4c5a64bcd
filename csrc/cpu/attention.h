// Fused f0 rotary + zero-soft attention on the CPU: the per-call state (Attn), its setup
// from the binding's record, and the packing helpers shared by the forward
// (attention_fwd.cpp) and the backward (attention_bwd.cpp).  docs/design.md 3.3; the kernel
// contract is the docstring of zeromask/backends/__init__.py.
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
//     transposed (head dims x keys, keys on the vector lanes: no product pads the head dim)
//     in per-task fp32 buffers (no atomics), dQ per query block; each task then finishes
//     its keys (dk/dv), or, for a sliced group, phase 2 sums the slices per (batch, kv
//     head) and finishes them; theta/radius/zero_scale gradients are per-task partial
//     sums (no atomics), reduced at the end of attention_backward;
//   * forward with <= 4 query rows per kv head (decoding steps): no packs or 64-row tiles;
//     keys transposed and rotated VL at a time with a table laid out by frequency, scores
//     by broadcast FMAs, values streamed as they are (attn_fwd_small in attention_fwd.cpp);
//   * forward, not causal, with a head dim that whole vectors would pad by >= 1/4 (D = 24
//     with AVX-512): the transposed products S^T = [K | bias] [Q^T ; 1], O^T += V^T P^T,
//     queries on the vector lanes, softmax vertical (attn_fwd_t in attention_fwd.cpp);
//   * memory O(L * D) per thread / head: tiles are BQ x BK, no L x L buffer.
// Masked logits are -inf; the exp below maps anything below -87 to exactly 0, and a row
// whose keys are all hard-masked yields out 0 / lse -inf (backward: P = 0, finite grads).
#pragma once
#include "microkernel.h"
#include "rotary.h"
#include "zeromask_args.h"

namespace zm {

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

// keys_by_freq: the keys' rotary table laid out by frequency (make_table_by_freq), for the
// forward's small-query path.
static void setup_attn(Attn& a, const zm_args::AttentionArgs& x, bool need_grad,
                       bool keys_by_freq = false) {
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
  a.tq = make_table(x.theta_q, x.pos_q, a.B, a.Lq, a.R, need_grad);
  // self-attention usually passes the same theta and positions for both sides: reuse
  const size_t bytes = a.B * a.Lk * sizeof(float);
  if (keys_by_freq) {
    a.tk = make_table_by_freq(x.theta_k, x.pos_k, a.B, a.Lk, a.R);
  } else if (a.tq.on && a.Lq == a.Lk && x.theta_k.has_value() &&
      std::memcmp(x.theta_q->data_ptr<float>(), x.theta_k->data_ptr<float>(), bytes) == 0 &&
      std::memcmp(x.pos_q->data_ptr<float>(), x.pos_k->data_ptr<float>(), bytes) == 0) {
    a.tk = a.tq;
  } else {
    a.tk = make_table(x.theta_k, x.pos_k, a.B, a.Lk, a.R, need_grad);
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
static inline void transpose4(const float* src, int64_t sp, int64_t D, float* dst, int64_t ld) {
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const f4 r0 = ld4(src + d), r1 = ld4(src + sp + d);
    const f4 r2 = ld4(src + 2 * sp + d), r3 = ld4(src + 3 * sp + d);
    const f4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5);
    const f4 t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
    const f4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5);
    const f4 t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
    st4(dst + d * ld, __builtin_shufflevector(t0, t2, 0, 1, 4, 5));
    st4(dst + (d + 1) * ld, __builtin_shufflevector(t0, t2, 2, 3, 6, 7));
    st4(dst + (d + 2) * ld, __builtin_shufflevector(t1, t3, 0, 1, 4, 5));
    st4(dst + (d + 3) * ld, __builtin_shufflevector(t1, t3, 2, 3, 6, 7));
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
    // rotated keys straight into Kr's rows where there is Kr (its padding columns stay 0),
    // the score factor applied by rot_row: a wider vector load of what the rotation just
    // stored 4 floats at a time (a copy, a scaling) stalls on store forwarding
    float* kb = Kr ? Kr + j0 * a.Dp : ys.data();
    for (int64_t jj = 0; jj < 4; ++jj) {
      const int64_t j = j0 + jj;
      float* y = kb + jj * a.Dp;
      float* vv = vs.data() + jj * a.Dp;
      if (j < n) {
        load_row(kp + b * ks0 + h * ks1 + j * ks2, x.data(), a.D);
        const float g = a.gk[b * a.Lk + j];
        if (a.tk.on) rot_row(x.data(), y, a.D, a.R, a.inter, a.tk.c(b, j), a.tk.s(b, j), a.radius, g);
        else for (int64_t d = 0; d < a.D; ++d) y[d] = x[d] * g;
        load_row(vp + b * vs0 + h * vs1 + j * vs2, vv, a.D);
      } else {
        std::fill(y, y + a.Dp, 0.f);
        std::fill(vv, vv + a.Dp, 0.f);
      }
      if (Vr) std::copy(vv, vv + a.Dp, Vr + j * a.Dp);
    }
    transpose4(kb, a.Dp, a.D, Kt + j0, a.ldt);
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
    if (a.tq.on) rot_row(x.data(), y, a.D, a.R, a.inter, a.tq.c(b, i), a.tq.s(b, i), a.radius, a.sm_scale);
    else for (int64_t d = 0; d < a.D; ++d) y[d] = x[d] * a.sm_scale;
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

}  // namespace zm
