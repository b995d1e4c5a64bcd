// The attention forward on the CPU: one task per (batch, q head, query block), online
// softmax over key blocks (see attention.h for the structure).
#include "attention.h"
#include "kernels.h"

namespace zm {

// Row i of head h of batch b from its unnormalised output o, running max m and sum l.
template <typename T>
static inline void write_row(const Attn& a, int64_t b, int64_t h, int64_t i, const float* o,
                             float m, float l, T* op, float* lp) {
  T* dst = op + ((b * a.Hq + h) * a.Lq + i) * a.D;
  float* lse = lp + (b * a.Hq + h) * a.Lq + i;
  if (l > 0.f) {
    const float inv = 1.0f / l;
    for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    *lse = m + std::log(l);
  } else if (l != 0.f || a.kend(b, i + 1) > a.first_ok[b]) {
    // NaN: a NaN score, or +inf (inf - inf); or 0 although the row has keys: its logits
    // all overflowed to -inf.  Only a row with every key hard-masked is empty (hard mode:
    // it sees no key before the first one that is not a zero token).
    for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(NAN_F);
    *lse = NAN_F;
  } else {
    for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<T>(0.f);
    *lse = NEG_INF;
  }
}

// The task loop of the tiled forwards (attn_fwd_impl, attn_fwd_t): one parallel region over
// tasks = (b, q head, q block of BQ), handed out dynamically in chunks of consecutive q
// blocks (a whole head when there are enough heads), so a thread that gets less CPU (a
// shared machine) simply takes fewer chunks.  make_scratch() runs once per thread; each
// kernel packs the keys and values of each (b, kv head) a thread meets once into that
// scratch (a head split between threads is packed by each), which then stays hot in its
// cache for every q block of the chunk.  body(scratch, b, h, i0, rows) runs per task.
template <typename MakeScratch, typename Body>
static void for_each_q_block(const Attn& a, MakeScratch&& make_scratch, Body&& body) {
  const int64_t nqb = (a.Lq + BQ - 1) / BQ;
  const int64_t ntask = a.B * a.Hq * nqb;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(nqb, ntask / (4 * nth)));
  const int64_t nchunk = (ntask + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min(nth, nchunk), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t c = next_chunk.fetch_add(1); c < nchunk; c = next_chunk.fetch_add(1))
      for (int64_t task = c * chunk; task < std::min(ntask, (c + 1) * chunk); ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, i0 = qb * BQ;
        body(scratch, bh / a.Hq, bh % a.Hq, i0, std::min(BQ, a.Lq - i0));
      }
  });
}

template <typename T>
static void attn_fwd_impl(const Attn& a, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  struct Scratch {
    fvec Qs, O, S, m, l, tmax, tmaxv;
    fbuf Kt, Vr;
    int64_t packed;
  };
  auto make_scratch = [&] {
    return Scratch{fvec(BQ * a.Dp), fvec(BQ * a.Dp), fvec(BQ * BK), fvec(BQ), fvec(BQ),
                   fvec(BQ), fvec(BQ * RMW), new_fbuf(a.D * a.ldt), new_fbuf(a.Lkp * a.Dp), -1};
  };
  for_each_q_block(a, make_scratch, [&](Scratch& scr, int64_t b, int64_t h, int64_t i0,
                                        int64_t rows) {
      auto& [Qs, O, S, m, l, tmax, tmaxv, Kt, Vr, packed] = scr;
      const int64_t hk = h / a.grp;
      const int64_t Mp = round_up(rows, 2);  // gemm takes strips of 6, 4 or 2 rows
      if (packed != b * a.Hkv + hk) {  // every element is written: no zero-fill needed
        pack_kv<T>(a, k, v, b, hk, Kt.get(), nullptr, Vr.get(), nullptr);
        packed = b * a.Hkv + hk;
      }
      const float* kt = Kt.get();
      const float* vr = Vr.get();
      load_q<T>(a, q, b, h, i0, rows, Mp, Qs.data());
      std::fill_n(O.data(), Mp * a.Dp, 0.f);  // the rows P V accumulates (not all BQ)
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
      for (int64_t r = 0; r < rows; ++r)
        write_row(a, b, h, i0 + r, O.data() + r * a.Dp, m[r], l[r], op, lp);
  });
}

// The transposed forward, for head dims that are not a multiple of the vector width (the
// speech model's D = 24, 40, 80): every product keeps the queries on the vector lanes, so
// no product pads D to whole vectors (P V with D = 24 in 2 zmm a row wastes a quarter of its
// FMAs) and the online softmax is vertical (each query's max, sum and rescale are lanes of
// a vector, with no horizontal reduction per row):
//   S^T (keys x queries) = [g k | bias] . [sm_scale rot(q) ; 1]  (the key bias as one more
//                          term of the product: K's column D is the bias, Q^T's row D ones)
//   O^T (D x queries)   += V^T . P^T
// Per task (b, q head, block of BQ queries); keys and values packed once per (b, kv head)
// a thread meets, as K_aug (Lkp x (D + 1), rows past the keys: zeros, bias -inf) and V
// (Lkp x Dp).  Not causal (attn_fwd_impl trims the diagonal tiles; measured, it stays the
// faster at the model's causal shapes).  Results equal attn_fwd_impl's up to summation
// order.  Chosen where padding D to whole vectors wastes >= 1/4 of them (D = 24 with
// AVX-512, D = 12 with AVX2): at B16 H4 D24 on an AVX-512 Xeon the model suite's forward
// went from 1.40x to 1.32x SDPA's time at L = 128, 1.19x to 1.02x at L = 400, and
// cross-attention Lq 40 x Lk 200 from 1.29x to 1.07x
// (benchmarks/results/cpu-intel-xeon-avx512-1t/transposed-forward); at D = 40, 64 or 80 it
// was not faster.
template <typename T>
static void attn_fwd_t(const Attn& a, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  TORCH_CHECK(!a.causal, "zeromask: attn_fwd_t has no causal mask");
  const int64_t D = a.D, D1 = a.D + 1, Dm = round_up(a.D, 2), Dp = a.Dp;
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  // QT: (D + 1) x BQ; ST: BK x BQ; OT: Dm x BQ (row Dm - 1 >= D stays 0: V's column D is 0);
  // Qs: BQ x Dp (load_q's layout); Ka: [g rot(k) | bias] rows of D + 1; Vr: V rows of Dp
  struct Scratch {
    fvec QT, ST, OT, Qs, m, l, orow, Ka, Vr;
    std::vector<float> x;
    int64_t packed;
  };
  auto make_scratch = [&] {
    return Scratch{fvec(D1 * BQ), fvec(BK * BQ), fvec(Dm * BQ), fvec(BQ * Dp), fvec(BQ),
                   fvec(BQ), fvec(Dp), fvec(a.Lkp * D1), fvec(a.Lkp * Dp, 0.f),
                   std::vector<float>(D), -1};
  };
  for_each_q_block(a, make_scratch, [&](Scratch& scr, int64_t b, int64_t h, int64_t i0,
                                        int64_t rows) {
      auto& [QT, ST, OT, Qs, m, l, orow, Ka, Vr, x, packed] = scr;
      const int64_t hk = h / a.grp;
      const int64_t Mq = round_up(rows, VL);  // queries on the lanes
      if (packed != b * a.Hkv + hk) {
        const float* bias = a.bias.data() + b * a.Lkp;
        const int64_t n = a.klen(b);  // slots past seqlens_k: never read
        for (int64_t j = 0; j < a.Lkp; ++j) {
          float* kr = Ka.data() + j * D1;
          float* vr = Vr.data() + j * Dp;
          if (j < n) {
            load_row(kp + b * ks0 + hk * ks1 + j * ks2, x.data(), D);
            const float g = a.gk[b * a.Lk + j];  // (applied by rot_row: see pack_kv)
            if (a.tk.on) rot_row(x.data(), kr, D, a.R, a.inter, a.tk.c(b, j), a.tk.s(b, j), a.radius, g);
            else for (int64_t d = 0; d < D; ++d) kr[d] = x[d] * g;
            load_row(vp + b * vs0 + hk * vs1 + j * vs2, vr, D);
          } else {
            std::fill(kr, kr + D, 0.f);
            std::fill(vr, vr + D, 0.f);
          }
          kr[D] = bias[j];  // -inf past the keys
        }
        packed = b * a.Hkv + hk;
      }
      load_q<T>(a, q, b, h, i0, rows, Mq, Qs.data());  // rows >= rows: zeros
      // (Mq is a multiple of VL >= 4; a column store per element was a third of this loop
      // nest's own time at L = 32)
      for (int64_t i = 0; i < Mq; i += 4) transpose4(Qs.data() + i * a.Dp, a.Dp, D, QT.data() + i, Mq);
      // row D of ones, padding queries too (0 * -inf would be NaN)
      std::fill(QT.begin() + D * Mq, QT.begin() + (D + 1) * Mq, 1.f);
      std::fill(OT.begin(), OT.begin() + Dm * Mq, 0.f);
      std::fill(m.begin(), m.begin() + Mq, NEG_INF);
      std::fill(l.begin(), l.begin() + Mq, 0.f);
      const int64_t ke = a.kend(b, i0 + rows);
      for (int64_t j0 = 0; j0 < ke; j0 += BK) {
        const int64_t wk = std::min(BK, ke - j0), w2 = round_up(wk, 2);
        // (row wk of an odd tile: within Lkp, its score is never read)
        gemm<false>(w2, Mq, D1, Ka.data() + j0 * D1, D1, 1, QT.data(), Mq, ST.data(), Mq);
        for (int64_t c0 = 0; c0 < Mq; c0 += VL) {
          // four independent max chains (one chain waits on each max's latency); a NaN
          // score is not the max (its exp is NaN below, and so is the row)
          vf mx4[4] = {vset(NEG_INF), vset(NEG_INF), vset(NEG_INF), vset(NEG_INF)};
          int64_t jj = 0;
          for (; jj + 4 <= wk; jj += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
              const vf sc = vload(ST.data() + (jj + u) * Mq + c0);
              mx4[u] = sc > mx4[u] ? sc : mx4[u];
            }
          for (; jj < wk; ++jj) {
            const vf sc = vload(ST.data() + jj * Mq + c0);
            mx4[0] = sc > mx4[0] ? sc : mx4[0];
          }
          const vf m01 = mx4[1] > mx4[0] ? mx4[1] : mx4[0];
          const vf m23 = mx4[3] > mx4[2] ? mx4[3] : mx4[2];
          const vf mx = m23 > m01 ? m23 : m01;
          const vf mold = vload(m.data() + c0);
          const vf mnew = mx > mold ? mx : mold;
          const vf ms = mnew == vset(NEG_INF) ? vset(0.f) : mnew;
          const vf alpha = vexp(mold - ms);  // (m = -inf: exp(-inf) = 0)
          vf sum0 = vset(0.f), sum1 = vset(0.f);
          for (jj = 0; jj + 2 <= wk; jj += 2) {
            float* p = ST.data() + jj * Mq + c0;
            const vf e0 = vexp(vload(p) - ms), e1 = vexp(vload(p + Mq) - ms);
            vstore(p, e0);
            vstore(p + Mq, e1);
            sum0 += e0;
            sum1 += e1;
          }
          if (jj < wk) {
            float* p = ST.data() + jj * Mq + c0;
            const vf e = vexp(vload(p) - ms);
            vstore(p, e);
            sum0 += e;
          }
          const vf sum = sum0 + sum1;
          vstore(l.data() + c0, vload(l.data() + c0) * alpha + sum);
          vstore(m.data() + c0, mnew);
          for (int64_t d = 0; d < Dm; ++d) {
            float* o = OT.data() + d * Mq + c0;
            vstore(o, vload(o) * alpha);
          }
        }
        gemm<true>(Dm, Mq, wk, Vr.data() + j0 * Dp, 1, Dp, ST.data(), Mq, OT.data(), Mq);
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < D; ++d) orow[d] = OT[d * Mq + r];
        write_row(a, b, h, i0 + r, orow.data(), m[r], l[r], op, lp);
      }
  });
}

// The small-query path: for each (b, kv head), the <= SMALL_ROWS query rows of its group
// (decoding steps: one query against a KV cache): no packs of the whole head, no 64-row
// tiles (at Lq = 1 the packing and the padded tiles of attn_fwd_impl cost more than the
// products).  Keys VL at a time: transposed (transpose4), rotated in the transposed block
// with the keys' table laid out by frequency (VL keys a vector op, where a row of D = 24 is
// 12 pairs: not a whole vector), scores q . rot(k) as D broadcast FMAs (no horizontal sum
// per key), + bias, causal cut; then the softmax's exp VL at a time, and its weights times
// v, VL value rows at a time.
constexpr int64_t SMALL_ROWS = 4;

template <typename T>
static void attn_fwd_small(const Attn& a, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t nr = a.grp * a.Lq, off = a.Lk - a.Lq, half = a.R / 2;
  const int64_t D = a.D, Dk = round_up(D, 4);
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t lo, int64_t hi) {
    // Kr: a block of VL key rows (stride Dk, rows past the block's keys zero); KT: the
    // block transposed (D x VL), then rotated in place, pair by pair, VL keys at a time
    fvec Q(nr * a.Dp), O(nr * a.Dp), S(nr * a.Lkp), Kr(VL * Dk, 0.f), KT(Dk * VL, 0.f),
        Vr(VL * a.Dp, 0.f);
    vf lane = vset(0.f);
    for (int jj = 0; jj < VL; ++jj) lane[jj] = static_cast<float>(jj);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / a.Hkv, hk = task % a.Hkv;
      // row r: head hk * grp + r / Lq, query r % Lq; it sees keys [0, lim[r])
      int64_t lim[SMALL_ROWS];
      vf mv[SMALL_ROWS];
      const int64_t ke = a.kend(b, a.Lq);
      int64_t lim_max = 0;
      for (int64_t r = 0; r < nr; ++r) {
        load_q<T>(a, q, b, hk * a.grp + r / a.Lq, r % a.Lq, 1, 1, Q.data() + r * a.Dp);
        lim[r] = a.causal ? std::min<int64_t>(ke, r % a.Lq + off + 1) : ke;
        lim_max = std::max(lim_max, lim[r]);
        mv[r] = vset(NEG_INF);
      }
      const float* bias = a.bias.data() + b * a.Lkp;
      const float* gk = a.gk.data() + b * a.Lk;
      for (int64_t j0 = 0; j0 < lim_max; j0 += VL) {
        const int64_t w = std::min<int64_t>(VL, lim_max - j0), w4 = round_up(w, 4);
        for (int64_t jj = 0; jj < w; ++jj)
          load_row(kp + b * ks0 + hk * ks1 + (j0 + jj) * ks2, Kr.data() + jj * Dk, D);
        std::fill(Kr.begin() + w * Dk, Kr.begin() + w4 * Dk, 0.f);
        for (int64_t jj = 0; jj < w4; jj += 4)
          transpose4(Kr.data() + jj * Dk, Dk, D, KT.data() + jj, VL);
        if (a.tk.on) {
          for (int64_t i = 0; i < half; ++i) {
            float* ka = KT.data() + (a.inter ? 2 * i : i) * VL;
            float* kb = KT.data() + (a.inter ? 2 * i + 1 : i + half) * VL;
            const vf c = vload(a.tk.cf(b, i) + j0), sn = vload(a.tk.sf(b, i) + j0);
            const vf ya = vload(ka), yb = vload(kb);
            vf u = ya * c - yb * sn, t = ya * sn + yb * c;
            if (a.radius) {
              u *= a.radius[i];
              t *= a.radius[i];
            }
            vstore(ka, u);
            vstore(kb, t);
          }
        }
        // lanes past the block's keys hold earlier keys (or zeros): masked to -inf below
        vf g = vset(1.f);  // score mode: the zero key's logit times s
        if (a.score)
          for (int64_t jj = 0; jj < w; ++jj) g[jj] = gk[j0 + jj];
        const vf bv = vload(bias + j0), idx = lane + static_cast<float>(j0);
        for (int64_t r = 0; r < nr; ++r) {  // (Q rows are zero past D)
          const float* qr = Q.data() + r * a.Dp;
          vf acc0 = vset(0.f), acc1 = vset(0.f);
          int64_t d = 0;
          for (; d + 2 <= D; d += 2) {
            acc0 += vset(qr[d]) * vload(KT.data() + d * VL);
            acc1 += vset(qr[d + 1]) * vload(KT.data() + (d + 1) * VL);
          }
          if (d < D) acc0 += vset(qr[d]) * vload(KT.data() + d * VL);
          vf sc = g * (acc0 + acc1) + bv;
          sc = idx < static_cast<float>(lim[r]) ? sc : vset(NEG_INF);
          vstore(S.data() + r * a.Lkp + j0, sc);
          mv[r] = sc > mv[r] ? sc : mv[r];
        }
      }
      float m[SMALL_ROWS], l[SMALL_ROWS];
      for (int64_t r = 0; r < nr; ++r) {
        float* row = S.data() + r * a.Lkp;
        m[r] = hmax(mv[r]);  // (a NaN score: its exp is NaN, so are l and the row)
        const float ms = m[r] == NEG_INF ? 0.f : m[r];
        vf sum = vset(0.f);
        for (int64_t j0 = 0; j0 < lim[r]; j0 += VL) {
          const vf e = vexp(vload(row + j0) - ms);
          vstore(row + j0, e);
          sum += e;
        }
        l[r] = hsum(sum);
      }
      // P V, values VL rows at a time (staged as float rows of Dp, zero past D), each
      // output vector accumulated in registers over the block's keys (a store per key made
      // a store-to-load chain that was a third of the step)
      std::fill(O.begin(), O.end(), 0.f);
      for (int64_t j0 = 0; j0 < lim_max; j0 += VL) {
        const int64_t w = std::min<int64_t>(VL, lim_max - j0);
        for (int64_t jj = 0; jj < w; ++jj)
          load_row(vp + b * vs0 + hk * vs1 + (j0 + jj) * vs2, Vr.data() + jj * a.Dp, D);
        for (int64_t r = 0; r < nr; ++r) {
          // (past a row's causal diagonal: not read, as attn_fwd_impl's trimmed tiles do not)
          const int64_t n = std::min<int64_t>(w, lim[r] - j0);
          const float* p = S.data() + r * a.Lkp + j0;
          for (int64_t d = 0; d < a.Dp; d += VL) {
            vf acc0 = vload(O.data() + r * a.Dp + d), acc1 = vset(0.f);
            int64_t jj = 0;
            for (; jj + 2 <= n; jj += 2) {
              acc0 += vset(p[jj]) * vload(Vr.data() + jj * a.Dp + d);
              acc1 += vset(p[jj + 1]) * vload(Vr.data() + (jj + 1) * a.Dp + d);
            }
            if (jj < n) acc0 += vset(p[jj]) * vload(Vr.data() + jj * a.Dp + d);
            vstore(O.data() + r * a.Dp + d, acc0 + acc1);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r)
        write_row(a, b, hk * a.grp + r / a.Lq, r % a.Lq, O.data() + r * a.Dp, m[r], l[r],
                  op, lp);
    }
  });
}

void attention_forward(const zm_args::AttentionArgs& x, at::Tensor out, at::Tensor lse) {
  zm_args::check_forward_outputs(x, out, lse, at::kCPU, "cpp");
  Attn a;
  const bool small = (x.Hq / x.Hkv) * x.Lq <= SMALL_ROWS;
  setup_attn(a, x, false, small);
  if (a.B * a.Hq * a.Lq == 0) return;
  const bool transposed = !a.causal && (a.Dp - a.D) * 4 >= a.Dp;
  dispatch_dtype(x.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (small)
      attn_fwd_small<T>(a, x.q, x.k, x.v, out, lse);
    else if (transposed)
      attn_fwd_t<T>(a, x.q, x.k, x.v, out, lse);
    else
      attn_fwd_impl<T>(a, x.q, x.k, x.v, out, lse);
  });
}

}  // namespace zm
