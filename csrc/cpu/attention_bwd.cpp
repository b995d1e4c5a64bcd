// The attention backward on the CPU: dq, dk, dv and the partial sums of the theta, radius
// and zero-scale gradients (see attention.h for the structure).
#include "attention.h"
#include "kernels.h"

namespace zm {

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
  // dK'^T and dV^T (head dims x keys, pitch ldt): their products have the keys, a whole
  // number of vectors, on the vector lanes, so a head dim like 24 is not padded to 32
  const int64_t Dr = round_up(a.D, 2);  // rows: gemm takes strips of 6, 4 or 2
  const int64_t tslab = Dr * a.ldt;
  const T* dop = dout.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  // dk = rot^T(g_j dK'_j) (dK'^T summed over the nsplit slices at dKb, dVb, stride tslab),
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
      for (int64_t d = 0; d < a.D; ++d) { gk[d] = dKb[d * a.ldt + j]; gv[d] = dVb[d * a.ldt + j]; }
      for (int64_t sp = 1; sp < nsplit; ++sp) {
        const float* dk_s = dKb + sp * tslab + j;
        const float* dv_s = dVb + sp * tslab + j;
        for (int64_t d = 0; d < a.D; ++d) { gk[d] += dk_s[d * a.ldt]; gv[d] += dv_s[d * a.ldt]; }
      }
      const bool z = a.has_zero && a.key_zero[b * a.Lk + j];
      T* dst = dkp + ((b * a.Hkv + hk) * a.Lk + j) * a.D;
      load_row(kp + b * s0 + hk * s1 + j * s2, x.data(), a.D);
      if (z && a.score) {
        if (parts.dzs) {  // dL/ds = kr_j . dK'_j, kr = rot(k) (unscaled)
          if (a.tk.on) rot_row(x.data(), y.data(), a.D, a.R, a.inter, a.tk.c(b, j), a.tk.s(b, j), a.radius);
          else std::copy(x.begin(), x.begin() + a.D, y.begin());
          double dot = 0.0;
          for (int64_t d = 0; d < a.D; ++d) dot += static_cast<double>(y[d]) * gk[d];
          dzs += dot;
        }
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
  fbuf dKs = fused ? fbuf() : new_fbuf(ntask * tslab);
  fbuf dVs = fused ? fbuf() : new_fbuf(ntask * tslab);
  // ---- phase 1: (b, hk, slice of q heads) ----
  at::parallel_for(0, ntask, 1, [&](int64_t lo, int64_t hi) {
    fvec Kt(a.D * a.ldt), Kr(slab), Vt(a.D * a.ldt);
    std::vector<double> rzs(BQ), rns(BQ), rzp(BQ), rnp(BQ);
    fvec Qs(BQ * a.Dp), dO(BQ * a.Dp), dQ(BQ * a.Dp), P(BQ * BK), dS(BQ * BK);
    std::vector<float> delta(BQ), lrow(BQ), x(a.Dp), gx(a.Dp);
    std::vector<double> drho(std::max<int64_t>(half, 1));
    fvec own_dK(fused ? tslab : 0), own_dV(fused ? tslab : 0);
    int64_t packed = -1;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t kv = task / nsplit, sp = task % nsplit;
      const int64_t b = kv / a.Hkv, hk = kv % a.Hkv;
      if (packed != kv) {  // consecutive slices of one kv head share the packed keys
        pack_kv<T>(a, k, v, b, hk, Kt.data(), Kr.data(), nullptr, Vt.data());
        packed = kv;
      }
      float* dK = fused ? own_dK.data() : dKs.get() + task * tslab;
      float* dV = fused ? own_dV.data() : dVs.get() + task * tslab;
      std::fill(dK, dK + tslab, 0.f);
      std::fill(dV, dV + tslab, 0.f);
      std::fill(drho.begin(), drho.end(), 0.0);
      double dlns = 0.0;
      const int64_t h_begin = hk * a.grp + (sp * a.grp) / nsplit;
      const int64_t h_end = hk * a.grp + ((sp + 1) * a.grp) / nsplit;
      for (int64_t h = h_begin; h < h_end; ++h) {
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BQ, rows = std::min(BQ, a.Lq - i0);
          const int64_t Mp = round_up(rows, 2);  // gemm takes strips of 6, 4 or 2 rows
          load_q<T>(a, q, b, h, i0, rows, Mp, Qs.data());
          // (only the Mp rows the products read and write: a short block, L = 20 say,
          // would otherwise clear all BQ = 64 rows of both)
          std::fill_n(dO.data(), Mp * a.Dp, 0.f);
          std::fill_n(dQ.data(), Mp * a.Dp, 0.f);
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
          const bool zsum = a.has_zero && !a.score && parts.dzs;  // (prob mode's d ln s)
          const int64_t ke = a.kend(b, i0 + rows);
          for (int64_t j0 = 0; j0 < ke; j0 += BK) {
            // wk keys, wp padded to whole vectors (P and dS are 0 on the padding)
            const int64_t wk = std::min(BK, ke - j0), wp = round_up(wk, VL);
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
            // dV^T += dO^T P ; dK'^T += Qs^T dS ; dQs += dS K'
            if (trim) {
              gemm<true, KSTEPS>(Dr, wp, Mp, dO.data(), 1, a.Dp, P.data(), BK, dV + j0, a.ldt,
                                 nullptr, nullptr, diag);
              gemm<true, KSTEPS>(Dr, wp, Mp, Qs.data(), 1, a.Dp, dS.data(), BK, dK + j0, a.ldt,
                                 nullptr, nullptr, diag);
              gemm<true, KEND>(Mp, a.Dp, wk, dS.data(), BK, 1, Kr.data() + j0 * a.Dp, a.Dp,
                               dQ.data(), a.Dp, nullptr, nullptr, diag);
            } else {
              gemm<true>(Dr, wp, Mp, dO.data(), 1, a.Dp, P.data(), BK, dV + j0, a.ldt);
              gemm<true>(Dr, wp, Mp, Qs.data(), 1, a.Dp, dS.data(), BK, dK + j0, a.ldt);
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
        finish_kv(kv, dKs.get() + kv * nsplit * tslab, dVs.get() + kv * nsplit * tslab);
    });
  }
}

std::vector<at::Tensor> attention_backward(const zm_args::AttentionArgs& x,
                                           const at::Tensor& dout, const at::Tensor& out,
                                           const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                                           at::Tensor dv, bool need_dzero_scale) {
  zm_args::check_backward_buffers(x, dout, out, lse, dq, dk, dv, at::kCPU, "cpp");
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
  const bool with_dzs = a.has_zero && need_dzero_scale;
  at::Tensor dzs = with_dzs ? at::empty({nrows}, f64) : at::empty({0}, f64);
  BwdParts parts{a.tq.on ? dtq.data_ptr<float>() : nullptr,
                 a.tk.on ? dtk.data_ptr<float>() : nullptr,
                 a.radius ? drad.data_ptr<double>() : nullptr,
                 with_dzs ? dzs.data_ptr<double>() : nullptr};
  if (a.B * a.Hkv > 0) {
    dispatch_dtype(x.q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      attn_bwd_impl<T>(a, nsplit, dout, x.q, x.k, x.v, out, lse, dq, dk, dv, parts);
    });
  }
  // the partial sums (per head for theta, per task for radius and zero_scale; no atomics)
  // reduced into the gradients: float32 head sums, float64 task sums rounded once
  return {a.tq.on ? dtq.sum(1) : at::Tensor(), a.tk.on ? dtk.sum(1) : at::Tensor(),
          a.radius ? drad.sum(0).to(at::kFloat) : at::Tensor(),
          with_dzs ? dzs.sum().to(at::kFloat) : at::Tensor()};
}

}  // namespace zm
