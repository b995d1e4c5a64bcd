"""f0 rotary (docs/design.md 3.1) as a Triton kernel: forward, backward, dtheta and dradius.

One program handles ``BLOCK_L`` positions of one batch row and loops over the heads, so the
angles are computed once per position and the backward sums dtheta over heads and pairs in
registers (no atomics: deterministic). dradius is reduced from per-program partials on the
host, also deterministically.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import alloc, angles, interpreting, load_split, pow2, store_split

@triton.jit
def _rotary_kernel(X, DY, Y, THETA, POS, RAD, DTHETA, DRAD_PART,
                   sxb, sxh, sxl, sdb, sdh, sdl, syb, syh, syl,
                   H, L, n_lblocks,
                   R: tl.constexpr, D: tl.constexpr,
                   HALF_P: tl.constexpr, REST_P: tl.constexpr, BLOCK_L: tl.constexpr,
                   INTERLEAVED: tl.constexpr, HAS_RAD: tl.constexpr, HAS_REST: tl.constexpr,
                   BACKWARD: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = R // 2
    REST: tl.constexpr = D - R
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_i = tl.arange(0, HALF_P)
    offs_r = tl.arange(0, REST_P)
    cos, sin, dphi_dth = angles(THETA + pid_b * L, POS + pid_b * L, offs_l, mask_l, offs_i, R)
    if HAS_RAD:
        rho = tl.load(RAD + offs_i, mask=offs_i < HALF, other=0.0)[None, :]
    else:
        rho = tl.full((1, HALF_P), 1.0, tl.float32)
    dphi_acc = tl.zeros((BLOCK_L, HALF_P), dtype=tl.float32)
    drho_acc = tl.zeros((BLOCK_L, HALF_P), dtype=tl.float32)
    # per-head base pointers advance by the head stride (64-bit pointer arithmetic)
    x_h = X + pid_b * sxb
    dy_h = DY + pid_b * sdb
    y_h = Y + pid_b * syb
    for _h in range(0, H):
        xa, xb, xr = load_split(x_h, offs_l, mask_l, sxl, offs_i, offs_r,
                                HALF, R, REST, INTERLEAVED, HAS_REST)
        # the rotated pair before the radius
        ua = xa * cos - xb * sin
        ub = xa * sin + xb * cos
        if BACKWARD:
            ga, gb, gr = load_split(dy_h, offs_l, mask_l, sdl, offs_i,
                                    offs_r, HALF, R, REST, INTERLEAVED, HAS_REST)
            # y = rho * rot(phi) x  ->  dx = rho * rot(-phi) dy
            ra = rho * (ga * cos + gb * sin)
            rb = rho * (gb * cos - ga * sin)
            # dphi = rho * (dy_a * (-u_b) + dy_b * u_a); drho = dy_a * u_a + dy_b * u_b
            dphi_acc += rho * (gb * ua - ga * ub)
            drho_acc += ga * ua + gb * ub
            rest = gr
        else:
            ra = rho * ua
            rb = rho * ub
            rest = xr
        store_split(y_h, offs_l, mask_l, syl, offs_i, offs_r, ra, rb, rest,
                    HALF, R, REST, INTERLEAVED, HAS_REST)
        x_h += sxh
        dy_h += sdh
        y_h += syh
    if BACKWARD:
        dth = tl.sum(dphi_acc * dphi_dth, axis=1)
        tl.store(DTHETA + pid_b * L + offs_l, dth, mask=mask_l)
        if HAS_RAD:
            part = DRAD_PART + (pid_b * n_lblocks + pid_l) * HALF
            tl.store(part + offs_i, tl.sum(drho_acc, axis=0), mask=offs_i < HALF)


def _block_l(B: int, L: int, D: int) -> int:
    if interpreting():
        return 16
    # keep a (BLOCK_L, D) fp32 working set per operand comfortably in registers, and give
    # the grid (L blocks x B) enough programs to fill the GPU
    block = 64 if D <= 64 else (32 if D <= 128 else 16)
    while block > 16 and triton.cdiv(L, block) * B < 256:
        block //= 2
    return block


def _launch(x, dy, theta, positions, radius, rotary_dim, interleaved, backward):
    B, H, L, D = x.shape
    R = int(rotary_dim)
    half = R // 2
    out = alloc((B, H, L, D), x.dtype, x.device)
    block_l = _block_l(B, L, D)
    n_lb = triton.cdiv(L, block_l)
    dtheta = drad_part = None
    if backward:
        dtheta = alloc((B, L), torch.float32, x.device)
        if radius is not None:
            drad_part = alloc((B * n_lb, half), torch.float32, x.device)
    src = dy if backward else x
    grid = (n_lb, B)
    if B * H * L > 0:
        _rotary_kernel[grid](
            x, src, out, theta, positions,
            radius if radius is not None else theta,
            dtheta if dtheta is not None else theta,
            drad_part if drad_part is not None else theta,
            x.stride(0), x.stride(1), x.stride(2),
            src.stride(0), src.stride(1), src.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, L, n_lb,
            R=R, D=D, HALF_P=pow2(half, 1), REST_P=pow2(D - R, 1), BLOCK_L=block_l,
            INTERLEAVED=bool(interleaved), HAS_RAD=radius is not None, HAS_REST=D > R,
            BACKWARD=bool(backward), num_warps=4 if D <= 128 else 8)
    elif backward:
        dtheta.zero_()
    if not backward:
        return out
    drad = None
    if radius is not None:
        drad = alloc((half,), torch.float32, x.device)
        if drad_part.shape[0]:
            torch.sum(drad_part, dim=0, out=drad)
        else:
            drad.zero_()
    return out, dtheta, drad


def rotary_forward(r):
    """y = rho * rot(phi) x on the rotary dims, pass-through beyond; y contiguous.
    ``r``: :class:`zeromask.backends.RotaryArgs`."""
    return _launch(r.x, None, r.theta, r.positions, r.radius, r.rotary_dim, r.interleaved,
                   False)


def rotary_backward(dy, r):
    """(dx, dtheta (B, L) fp32, dradius (R/2,) fp32 or None)."""
    return _launch(r.x, dy, r.theta, r.positions, r.radius, r.rotary_dim, r.interleaved, True)
