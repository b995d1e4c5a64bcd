// The attention forward on the CPU: one task per (batch, q head, query block), online
// softmax over key blocks (see attention.h for the structure).
#include "attention.h"
#include "kernels.h"

namespace zm {

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

void attention_forward(const zm_args::AttentionArgs& x, at::Tensor out, at::Tensor lse) {
  zm_args::check_forward_outputs(x, out, lse, at::kCPU, "cpp");
  Attn a;
  setup_attn(a, x, false);
  if (a.B * a.Hq * a.Lq == 0) return;
  dispatch_dtype(x.q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    attn_fwd_impl<T>(a, x.q, x.k, x.v, out, lse);
  });
}

}  // namespace zm
