"""One-pass f0-rotary + zero-soft attention (docs/design.md 3.3): Triton forward and backward.

Forward: one program per (query block, batch x q head). Q and K tiles are loaded as rotary
halves (see :mod:`zeromask.kernels.common`), rotated in registers with cos/sin computed from
theta and the position, and multiplied; zero keys get ``+ ln s`` (prob) or ``* s`` (score);
causal (bottom-right) and ``seqlens_k`` masks are ``-inf``; online softmax in base 2 with
fp32 accumulation; the row logsumexp (natural log) is saved. Nothing L x L, no rotated copy
and no cos/sin table is written.

Backward (flash-attention 2 style, no atomics, so always deterministic):

* ``delta = rowsum(dO * O)`` (host, (B, Hq, Lq));
* the dk/dv kernel: one program per (key block, batch x kv head) loops over the q heads of
  its GQA group and the query blocks, recomputing P from the saved lse; it also yields
  dtheta_k (per kv head, summed over heads on the host) and the k side of dradius;
* the dq kernel: one program per (query block, batch x q head) loops over key blocks and
  yields dq, dtheta_q (per q head), the q side of dradius and, in prob and score mode, the
  dzero_scale partials (per row, where it sees every key: see the comment there).

The three kernels share their per-program setup and tile loads as ``@triton.jit`` helpers
(``_radius``, ``_key_len``, ``_key_end``, ``_rotated_rows``, ``_rows``, ``_zero_keys``,
``_saved_rows``, ``_probs``, ``_unrotate``), which Triton inlines: one source for each
piece, the same code as written out per kernel.

Every cross-program sum (over heads, blocks) goes through a per-program partial buffer
reduced on the host, so results are bitwise reproducible; there is no atomic anywhere and
hence no separate "deterministic" switch.

Accuracy notes: the online softmax keeps its running max in natural units and takes
``exp(x)`` as ``exp2(x * log2 e)`` with the product's rounding recovered by an fma for fp32
inputs (:func:`zeromask.kernels.common.exp_e`); the rotary angles use libdevice
``pow``/``cos``/``sin`` when compiled (see :func:`zeromask.kernels.common.angles`).

The rotary gradient is taken in the rotated frame and rotated back by ``-phi``:
``dx = rho * R(-phi) dx'``; ``dphi = rho * (dx'_b * u_a - dx'_a * u_b)`` with ``u`` the
rotated, unscaled pair; ``drho = dx'_a * u_a + dx'_b * u_b``;
``dtheta = sum_i dphi_i * (-pos * (2i/R) * w_i / theta)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .common import alloc, angles, exp_e, interpreting, load_split, mm, pow2, store_split

# --------------------------------------------------------------------------------------
# shared jit helpers (inlined into each kernel: the three kernels' per-program setup and
# tile loads are written once, here)
# --------------------------------------------------------------------------------------
@triton.jit
def _radius(RAD, offs_i, HALF: tl.constexpr, HALF_P: tl.constexpr, HAS_RAD: tl.constexpr):
    """The rotary's per-pair scale rho as a (1, HALF_P) row; ones without a radius."""
    if HAS_RAD:
        return tl.load(RAD + offs_i, mask=offs_i < HALF, other=0.0)[None, :]
    else:
        return tl.full((1, HALF_P), 1.0, tl.float32)


@triton.jit
def _key_len(SEQK, b, Lk, HAS_SEQ: tl.constexpr):
    """Batch b's keys [0, kv_len) exist: seqlens_k[b] (at most Lk), else Lk."""
    kv_len = Lk
    if HAS_SEQ:
        kv_len = tl.minimum(tl.load(SEQK + b), Lk)
    return kv_len


@triton.jit
def _key_end(kv_len, pid_m, Lq, Lk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The end of the keys query block pid_m can see (causal: bottom-right aligned)."""
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + Lk - Lq)
    return hi


@triton.jit
def _rotate(a, b, theta_ptr, pos_ptr, offs_l, mask_l, offs_i, rho,
            R: tl.constexpr, ROT: tl.constexpr):
    """(rho * u_a, rho * u_b, u_a, u_b, cos, sin, dphi/dtheta); identity when not ROT."""
    if ROT:
        c, s, dth = angles(theta_ptr, pos_ptr, offs_l, mask_l, offs_i, R)
        ua = a * c - b * s
        ub = a * s + b * c
        return rho * ua, rho * ub, ua, ub, c, s, dth
    else:
        return a, b, a, b, a, b, a


@triton.jit
def _rotated_rows(base, offs_l, mask_l, stride_l, offs_i, offs_r, theta_ptr, pos_ptr, rho,
                  HALF: tl.constexpr, R: tl.constexpr, REST: tl.constexpr,
                  INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr, ROT: tl.constexpr):
    """Rows offs_l of a q or k slab as rotary halves, rotated and scaled by rho in fp32 and
    cast to the slab's dtype: (a, b, rest, u_a, u_b, cos, sin, dphi/dtheta), the last five
    fp32 for the rotary's backward."""
    ty = base.dtype.element_ty
    a, b, r = load_split(base, offs_l, mask_l, stride_l, offs_i, offs_r,
                         HALF, R, REST, INTERLEAVED, HAS_REST)
    a, b, ua, ub, c, s, dth = _rotate(a, b, theta_ptr, pos_ptr, offs_l, mask_l, offs_i, rho,
                                      R, ROT)
    return a.to(ty), b.to(ty), r.to(ty), ua, ub, c, s, dth


@triton.jit
def _rows(base, offs_l, mask_l, stride_l, offs_d, mask_d):
    """Rows offs_l of a v, o or dO slab, (rows, BLOCK_D), zero where masked."""
    return tl.load(base + offs_l[:, None] * stride_l + offs_d[None, :],
                   mask=mask_l[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _zero_keys(KZ, b, Lk, offs_n, key_ok, HAS_KZ: tl.constexpr):
    """Which keys offs_n of batch b are zero tokens (key_ok, unused, without key_zero)."""
    if HAS_KZ:
        return tl.load(KZ + b * Lk + offs_n, mask=key_ok, other=0) != 0
    else:
        return key_ok


@triton.jit
def _scores(qa, qb, qr, ka, kb, kr, kz, zs, ln_zs, sm_scale,
            HAS_REST: tl.constexpr, HAS_KZ: tl.constexpr, ZERO_PROB: tl.constexpr,
            DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """(S' with the zero-token rule, S before it), fp32 (BLOCK_M, BLOCK_N), natural units."""
    s = mm(qa, tl.trans(ka), DOT_F32, PREC) + mm(qb, tl.trans(kb), DOT_F32, PREC)
    if HAS_REST:
        s += mm(qr, tl.trans(kr), DOT_F32, PREC)
    s = s * sm_scale
    raw = s
    if HAS_KZ:
        if ZERO_PROB:
            s = tl.where(kz[None, :], s + ln_zs, s)
        else:
            s = tl.where(kz[None, :], s * zs, s)
    return s, raw


@triton.jit
def _valid(offs_m, mask_m, offs_n, key_ok, kz, Lq, Lk, CAUSAL: tl.constexpr,
           ZERO_HARD: tl.constexpr):
    valid = mask_m[:, None] & key_ok[None, :]
    if ZERO_HARD:  # hard mode: zero-token keys are masked like keys past seqlens_k
        valid = valid & (kz == 0)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return valid


@triton.jit
def _saved_rows(LSE, DELTA, bh, Lq, offs_m, mask_m):
    """The forward's row logsumexp (0 on an empty row, whose P is 0 anyway) and delta."""
    lse = tl.load(LSE + bh * Lq + offs_m, mask=mask_m, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=mask_m, other=0.0)
    return lse, delta


@triton.jit
def _probs(s, valid, lse, EXACT_EXP: tl.constexpr):
    """P recomputed from the saved row logsumexp, 0 where not valid."""
    return tl.where(valid, exp_e(tl.where(valid, s, 0.0) - lse[:, None], EXACT_EXP), 0.0)


@triton.jit
def _unrotate(da, db, c, s, ua, ub, dth, rho):
    """The rotary's backward for one tile, from the gradient (da, db) of its rotated,
    scaled halves: (dx_a, dx_b, dtheta per row, drho per pair, summed over the rows)."""
    ga = rho * (da * c + db * s)
    gb = rho * (db * c - da * s)
    dphi = rho * (db * ua - da * ub)
    return ga, gb, tl.sum(dphi * dth, 1), tl.sum(da * ua + db * ub, 0)


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KZ, ZS, TQ, TK, PQ, PK, RAD, SEQK,
                     sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                     Hq, Lq, Lk, GROUP, sm_scale, TUNE_LQ, TUNE_LK,
                     D: tl.constexpr, R: tl.constexpr, HALF_P: tl.constexpr,
                     REST_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_KZ: tl.constexpr, ZERO_PROB: tl.constexpr, ZERO_HARD: tl.constexpr,
                     CAUSAL: tl.constexpr,
                     HAS_SEQ: tl.constexpr, ROT_Q: tl.constexpr, ROT_K: tl.constexpr,
                     HAS_RAD: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr, EXACT_EXP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = R // 2
    REST: tl.constexpr = D - R
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    dt = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Lq
    offs_i = tl.arange(0, HALF_P)
    offs_r = tl.arange(0, REST_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rho = _radius(RAD, offs_i, HALF, HALF_P, HAS_RAD)
    qa, qb, qr, _qua, _qub, _qc, _qs, _qd = _rotated_rows(
        Q + b * sqb + h * sqh, offs_m, mask_m, sql, offs_i, offs_r, TQ + b * Lq, PQ + b * Lq,
        rho, HALF, R, REST, INTERLEAVED, HAS_REST, ROT_Q)
    kv_len = _key_len(SEQK, b, Lk, HAS_SEQ)
    hi = _key_end(kv_len, pid_m, Lq, Lk, BLOCK_M, CAUSAL)
    zs = tl.load(ZS)
    ln_zs = tl.log(zs)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < kv_len
        ka, kb, kr, _kua, _kub, _kc, _ks, _kd = _rotated_rows(
            k_base, offs_n, key_ok, skl, offs_i, offs_r, TK + b * Lk, PK + b * Lk, rho,
            HALF, R, REST, INTERLEAVED, HAS_REST, ROT_K)
        kz = _zero_keys(KZ, b, Lk, offs_n, key_ok, HAS_KZ)
        s, _raw = _scores(qa, qb, qr, ka, kb, kr, kz, zs, ln_zs, sm_scale,
                          HAS_REST, HAS_KZ, ZERO_PROB, DOT_F32, PREC)
        valid = _valid(offs_m, mask_m, offs_n, key_ok, kz, Lq, Lk, CAUSAL, ZERO_HARD)
        # the running max stays in natural units (an exact logit), so lse = m + ln(l) has
        # a single rounding; exp(x) is taken as exp2(x * log2(e)) (see exp_e)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(valid, exp_e(tl.where(valid, s, 0.0) - m_safe[:, None], EXACT_EXP), 0.0)
        alpha = tl.where(m_i == float("-inf"), 0.0,
                         exp_e(tl.where(m_i == float("-inf"), 0.0, m_i) - m_safe, EXACT_EXP))
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(v_base, offs_n, key_ok, svl, offs_d, mask_d)
        acc = acc * alpha[:, None] + mm(p.to(dt), v, DOT_F32, PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptr = O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :]
    tl.store(o_ptr, out.to(dt), mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mask_m)


# --------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O)
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, sol, sdob, sdoh, sdol, Hq, Lq,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    o = _rows(O + b * sob + h * soh, offs_m, mask_m, sol, offs_d, mask_d).to(tl.float32)
    do = _rows(DO + b * sdob + h * sdoh, offs_m, mask_m, sdol, offs_d, mask_d).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=mask_m)


# --------------------------------------------------------------------------------------
# backward: dk, dv, dtheta_k, dradius (k side)
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KZ, ZS, TQ, TK, PQ, PK, RAD, SEQK,
                          DTK_PART, DRADK_PART,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
                          sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
                          Hq, Hkv, Lq, Lk, GROUP, sm_scale, n_nblocks, TUNE_LQ, TUNE_LK,
                          D: tl.constexpr, R: tl.constexpr, HALF_P: tl.constexpr,
                          REST_P: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_KZ: tl.constexpr, ZERO_PROB: tl.constexpr, ZERO_HARD: tl.constexpr,
                          CAUSAL: tl.constexpr,
                          HAS_SEQ: tl.constexpr, ROT_Q: tl.constexpr, ROT_K: tl.constexpr,
                          HAS_RAD: tl.constexpr, INTERLEAVED: tl.constexpr,
                          HAS_REST: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                          EXACT_EXP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = R // 2
    REST: tl.constexpr = D - R
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    dt = Q.dtype.element_ty

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Lk
    offs_i = tl.arange(0, HALF_P)
    offs_r = tl.arange(0, REST_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rho = _radius(RAD, offs_i, HALF, HALF_P, HAS_RAD)
    kv_len = _key_len(SEQK, b, Lk, HAS_SEQ)
    key_ok = offs_n < kv_len
    # slots past seqlens_k are garbage by contract (NaN allowed): loaded as 0, never read
    ka, kb, kr, ka_u, kb_u, kc, ks, kdth = _rotated_rows(
        K + b * skb + hk * skh, offs_n, key_ok, skl, offs_i, offs_r, TK + b * Lk, PK + b * Lk,
        rho, HALF, R, REST, INTERLEAVED, HAS_REST, ROT_K)
    v = _rows(V + b * svb + hk * svh, offs_n, key_ok, svl, offs_d, mask_d)
    kz = _zero_keys(KZ, b, Lk, offs_n, key_ok, HAS_KZ)
    zs = tl.load(ZS)
    ln_zs = tl.log(zs)

    dka = tl.zeros((BLOCK_N, HALF_P), dtype=tl.float32)
    dkb = tl.zeros((BLOCK_N, HALF_P), dtype=tl.float32)
    dkr = tl.zeros((BLOCK_N, REST_P), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - (Lk - Lq), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n < kv_len, Lq, 0)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Lq
            qa, qb, qr, _qua, _qub, _qc, _qs, _qd = _rotated_rows(
                q_base, offs_m, mask_m, sql, offs_i, offs_r, TQ + b * Lq, PQ + b * Lq, rho,
                HALF, R, REST, INTERLEAVED, HAS_REST, ROT_Q)
            do = _rows(do_base, offs_m, mask_m, sdol, offs_d, mask_d)
            lse, delta = _saved_rows(LSE, DELTA, bh, Lq, offs_m, mask_m)
            s, _raw = _scores(qa, qb, qr, ka, kb, kr, kz, zs, ln_zs, sm_scale,
                              HAS_REST, HAS_KZ, ZERO_PROB, DOT_F32, PREC)
            valid = _valid(offs_m, mask_m, offs_n, key_ok, kz, Lq, Lk, CAUSAL, ZERO_HARD)
            p = _probs(s, valid, lse, EXACT_EXP)
            dv += mm(tl.trans(p.to(dt)), do, DOT_F32, PREC)
            dp = mm(do, tl.trans(v), DOT_F32, PREC)
            ds = p * (dp - delta[:, None])
            if HAS_KZ:
                if not ZERO_PROB:
                    ds = tl.where(kz[None, :], ds * zs, ds)
            ds = (ds * sm_scale).to(dt)
            dst = tl.trans(ds)
            dka += mm(dst, qa, DOT_F32, PREC)
            dkb += mm(dst, qb, DOT_F32, PREC)
            if HAS_REST:
                dkr += mm(dst, qr, DOT_F32, PREC)

    if ROT_K:
        ga, gb, dtk, drad = _unrotate(dka, dkb, kc, ks, ka_u, kb_u, kdth, rho)
        tl.store(DTK_PART + pid_bh.to(tl.int64) * Lk + offs_n, dtk, mask=mask_n)
        if HAS_RAD:
            part = DRADK_PART + (pid_bh.to(tl.int64) * n_nblocks + pid_n) * HALF
            tl.store(part + offs_i, drad, mask=offs_i < HALF)
    else:
        ga = dka
        gb = dkb
    store_split(DK + b * sdkb + hk * sdkh, offs_n, mask_n, sdkl, offs_i, offs_r, ga, gb, dkr,
                HALF, R, REST, INTERLEAVED, HAS_REST)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvl + offs_d[None, :],
             dv.to(dt), mask=mask_n[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------
# backward: dq, dtheta_q, dradius (q side), dzero_scale
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KZ, ZS, TQ, TK, PQ, PK, RAD, SEQK,
                        DTQ_PART, DRADQ_PART, DZS_PART,
                        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
                        sdqb, sdqh, sdql,
                        Hq, Lq, Lk, GROUP, sm_scale, n_mblocks, TUNE_LQ, TUNE_LK,
                        D: tl.constexpr, R: tl.constexpr, HALF_P: tl.constexpr,
                        REST_P: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_KZ: tl.constexpr, ZERO_PROB: tl.constexpr, ZERO_HARD: tl.constexpr,
                        CAUSAL: tl.constexpr,
                        HAS_SEQ: tl.constexpr, ROT_Q: tl.constexpr, ROT_K: tl.constexpr,
                        HAS_RAD: tl.constexpr, INTERLEAVED: tl.constexpr,
                        HAS_REST: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                        EXACT_EXP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = R // 2
    REST: tl.constexpr = D - R
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    dt = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Lq
    offs_i = tl.arange(0, HALF_P)
    offs_r = tl.arange(0, REST_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rho = _radius(RAD, offs_i, HALF, HALF_P, HAS_RAD)
    qa, qb, qr, qa_u, qb_u, qc, qs, qdth = _rotated_rows(
        Q + b * sqb + h * sqh, offs_m, mask_m, sql, offs_i, offs_r, TQ + b * Lq, PQ + b * Lq,
        rho, HALF, R, REST, INTERLEAVED, HAS_REST, ROT_Q)
    do = _rows(DO + b * sdob + h * sdoh, offs_m, mask_m, sdol, offs_d, mask_d)
    bh = pid_bh.to(tl.int64)
    lse, delta = _saved_rows(LSE, DELTA, bh, Lq, offs_m, mask_m)
    kv_len = _key_len(SEQK, b, Lk, HAS_SEQ)
    hi = _key_end(kv_len, pid_m, Lq, Lk, BLOCK_M, CAUSAL)
    zs = tl.load(ZS)
    ln_zs = tl.log(zs)

    dqa = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    dqb = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    dqr = tl.zeros((BLOCK_M, REST_P), dtype=tl.float32)
    # dzero_scale, per row: sum over zero keys of dS' (prob: / s; score: * S), with
    # delta taken as sum_j p dp / sum_j p of the recomputed p (not rowsum(dO * O)), so
    # that rows whose keys are all zero tokens give exactly 0 in prob mode
    row_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < kv_len
        ka, kb, kr, _kua, _kub, _kc, _ks, _kd = _rotated_rows(
            k_base, offs_n, key_ok, skl, offs_i, offs_r, TK + b * Lk, PK + b * Lk, rho,
            HALF, R, REST, INTERLEAVED, HAS_REST, ROT_K)
        v = _rows(v_base, offs_n, key_ok, svl, offs_d, mask_d)
        kz = _zero_keys(KZ, b, Lk, offs_n, key_ok, HAS_KZ)
        s, raw = _scores(qa, qb, qr, ka, kb, kr, kz, zs, ln_zs, sm_scale,
                         HAS_REST, HAS_KZ, ZERO_PROB, DOT_F32, PREC)
        valid = _valid(offs_m, mask_m, offs_n, key_ok, kz, Lq, Lk, CAUSAL, ZERO_HARD)
        p = _probs(s, valid, lse, EXACT_EXP)
        dp = mm(do, tl.trans(v), DOT_F32, PREC)
        ds = p * (dp - delta[:, None])
        if HAS_KZ:
            if not ZERO_HARD:  # (hard mode's zero keys have no s to move)
                pdp = p * dp
                row_t += tl.sum(pdp, 1)
                row_p += tl.sum(p, 1)
                if ZERO_PROB:
                    row_a += tl.sum(tl.where(kz[None, :], pdp, 0.0), 1)
                    row_z += tl.sum(tl.where(kz[None, :], p, 0.0), 1)
                else:
                    row_a += tl.sum(tl.where(kz[None, :], pdp * raw, 0.0), 1)
                    row_z += tl.sum(tl.where(kz[None, :], p * raw, 0.0), 1)
                    ds = tl.where(kz[None, :], ds * zs, ds)
        ds = (ds * sm_scale).to(dt)
        dqa += mm(ds, ka, DOT_F32, PREC)
        dqb += mm(ds, kb, DOT_F32, PREC)
        if HAS_REST:
            dqr += mm(ds, kr, DOT_F32, PREC)

    if ROT_Q:
        ga, gb, dtq, drad = _unrotate(dqa, dqb, qc, qs, qa_u, qb_u, qdth, rho)
        tl.store(DTQ_PART + bh * Lq + offs_m, dtq, mask=mask_m)
        if HAS_RAD:
            part = DRADQ_PART + (bh * n_mblocks + pid_m) * HALF
            tl.store(part + offs_i, drad, mask=offs_i < HALF)
    else:
        ga = dqa
        gb = dqb
    store_split(DQ + b * sdqb + h * sdqh, offs_m, mask_m, sdql, offs_i, offs_r, ga, gb, dqr,
                HALF, R, REST, INTERLEAVED, HAS_REST)
    if HAS_KZ:
        if not ZERO_HARD:
            # dividing by sum_j p (= 1 up to the rounding of the saved lse) also cancels
            # the lse's rounding, which is common to a row and would otherwise add up
            p_safe = tl.where(row_p == 0.0, 1.0, row_p)
            d_ex = row_t / p_safe
            # a row with no zero-key terms adds nothing, even a NaN row (0 x NaN would)
            term = tl.where((row_a == 0.0) & (row_z == 0.0), 0.0,
                            (row_a - row_z * d_ex) / p_safe)
            total = tl.sum(term, 0)
            if ZERO_PROB:
                total = total / zs
            tl.store(DZS_PART + bh * n_mblocks + pid_m, total)


# --------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------
_TUNED = {}


def _kernel(kernel, backward: bool):
    """(callable, extra launch kwargs): autotuned on a GPU, one small config interpreted."""
    if autotune.use_autotune():
        if kernel not in _TUNED:
            _TUNED[kernel] = autotune.tuned(kernel, backward)
        return _TUNED[kernel], {}
    return kernel, dict(autotune.INTERPRET_CONFIG, num_warps=4)


def _flags(a):
    """The kernels' constexpr flags for the call ``a`` (:class:`AttentionArgs`)."""
    D = a.q.shape[-1]
    R = int(a.rotary_dim)
    return dict(
        D=D, R=R, HALF_P=pow2(R // 2), REST_P=pow2(D - R), BLOCK_D=pow2(D),
        HAS_KZ=a.key_zero is not None, ZERO_PROB=a.zero_mode in ("prob", "hard"),
        ZERO_HARD=a.zero_mode == "hard" and a.key_zero is not None, CAUSAL=bool(a.causal),
        HAS_SEQ=a.seqlens_k is not None, ROT_Q=a.theta_q is not None,
        ROT_K=a.theta_k is not None, HAS_RAD=a.radius is not None,
        INTERLEAVED=bool(a.interleaved), HAS_REST=D > R,
        DOT_F32=interpreting() and a.q.dtype == torch.bfloat16,
        PREC="ieee" if a.q.dtype == torch.float32 else "tf32",
        EXACT_EXP=a.q.dtype == torch.float32,
    )


def _ptrs(a):
    """The side inputs KZ, ZS, TQ, TK, PQ, PK, RAD, SEQK (a dummy pointer where absent)."""
    dummy = a.zero_scale

    def ptr(t):
        return t if t is not None else dummy
    kz = a.key_zero.view(torch.uint8) if a.key_zero is not None else dummy
    return (kz, a.zero_scale, ptr(a.theta_q), ptr(a.theta_k), ptr(a.pos_q), ptr(a.pos_k),
            ptr(a.radius), ptr(a.seqlens_k))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(a):
    """(out, lse) of the call ``a`` (:class:`zeromask.backends.AttentionArgs`)."""
    q, k, v = a.q, a.k, a.v
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = alloc((B, Hq, Lq, D), q.dtype, q.device)
    lse = alloc((B, Hq, Lq), torch.float32, q.device)
    if B * Hq * Lq == 0:
        return out, lse
    kernel, extra = _kernel(_attn_fwd_kernel, False)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    kernel[grid](
        q, k, v, out, lse, *_ptrs(a),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        Hq, Lq, Lk, Hq // Hkv, float(a.sm_scale), pow2(Lq), pow2(Lk),
        **_flags(a), **extra)
    return out, lse


def attention_backward(do, out, lse, a):
    """(dq, dk, dv, dtheta_q, dtheta_k, dradius, dzero_scale) of the call ``a``."""
    q, k, v = a.q, a.k, a.v
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    half = int(a.rotary_dim) // 2
    dq = alloc(q.shape, q.dtype, dev)
    dk = alloc(k.shape, k.dtype, dev)
    dv = alloc(v.shape, v.dtype, dev)
    rot_q, rot_k = a.theta_q is not None, a.theta_k is not None
    dtq_part = alloc((B, Hq, Lq), torch.float32, dev) if rot_q else None
    dtk_part = alloc((B, Hkv, Lk), torch.float32, dev) if rot_k else None
    flags = _flags(a)
    ptrs = _ptrs(a)
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)
    if Lq > 0:
        block = 16 if interpreting() else 64
        _attn_bwd_delta_kernel[(triton.cdiv(Lq, block), B * Hq)](
            out, do, delta, *_strides(out), *_strides(do), Hq, Lq, D=D, BLOCK_D=pow2(D),
            BLOCK_M=block, num_warps=4)
    scale = float(a.sm_scale)
    # per-program partials are sized for the smallest BLOCK of any config (16)
    min_block = 16
    n_nb = triton.cdiv(Lk, min_block)
    n_mb = triton.cdiv(Lq, min_block)
    dradk_part = dradq_part = dzs_part = None
    if a.radius is not None and rot_k:
        dradk_part = torch.zeros((B * Hkv * n_nb, half), dtype=torch.float32, device=dev)
    if a.radius is not None and rot_q:
        dradq_part = torch.zeros((B * Hq * n_mb, half), dtype=torch.float32, device=dev)
    if a.key_zero is not None:
        dzs_part = torch.zeros((B * Hq * n_mb,), dtype=torch.float32, device=dev)
    dummy = a.zero_scale

    if Lk > 0:
        kernel, extra = _kernel(_attn_bwd_dkdv_kernel, True)
        grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        kernel[grid](
            q, k, v, do, lse, delta, dk, dv, *ptrs,
            dtk_part if dtk_part is not None else dummy,
            dradk_part if dradk_part is not None else dummy,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
            *_strides(dv),
            Hq, Hkv, Lq, Lk, group, scale, n_nb, pow2(Lq), pow2(Lk),
            **flags, **extra)
    if Lq > 0:
        kernel, extra = _kernel(_attn_bwd_dq_kernel, True)
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        kernel[grid](
            q, k, v, do, lse, delta, dq, *ptrs,
            dtq_part if dtq_part is not None else dummy,
            dradq_part if dradq_part is not None else dummy,
            dzs_part if dzs_part is not None else dummy,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            Hq, Lq, Lk, group, scale, n_mb, pow2(Lq), pow2(Lk),
            **flags, **extra)

    dtheta_q = dtheta_k = dradius = dzero = None
    if rot_q:
        dtheta_q = alloc((B, Lq), torch.float32, dev)
        torch.sum(dtq_part, dim=1, out=dtheta_q)
    if rot_k:
        dtheta_k = alloc((B, Lk), torch.float32, dev)
        torch.sum(dtk_part, dim=1, out=dtheta_k)
    if a.radius is not None:
        dradius = alloc((half,), torch.float32, dev)
        dradius.zero_()
        if dradk_part is not None:
            dradius += dradk_part.sum(0)
        if dradq_part is not None:
            dradius += dradq_part.sum(0)
    if a.key_zero is not None:
        dzero = alloc((), torch.float32, dev)
        torch.sum(dzs_part, dim=0, out=dzero)
    return dq, dk, dv, dtheta_q, dtheta_k, dradius, dzero
