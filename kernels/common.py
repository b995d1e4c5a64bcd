"""Pieces shared by the Triton kernels: rotary angles, pair-wise tile loads, interpreter flags.

The f0 rotary (docs/design.md 3.1) is applied to a tile by loading its rotary dims as two
``(rows, R/2)`` halves ``a``/``b`` (NeoX: columns ``i`` and ``i + R/2``; interleaved:
columns ``2i`` and ``2i + 1``, strided offsets) plus the pass-through dims ``>= R`` as a third
tile, so a rotation is two element-wise products and never a gather or a shuffle.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from zeromask.outputs import new_output

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: compiled (GPU) kernels take w, cos and sin from libdevice (powf, cosf, sinf: a few ulp,
#: full range reduction); the interpreter, which does not run libdevice, computes w in
#: float64 and cos/sin with numpy's float32 functions. Fixed when this module is imported,
#: like TRITON_INTERPRET itself.
USE_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


def alloc(shape, dtype, device):
    """A kernel output from :func:`zeromask.outputs.new_output` (NaN-poisoned in tests)."""
    return new_output(shape, dtype=dtype, device=device)


def pow2(n: int, minimum: int = 16) -> int:
    """The tile width for ``n`` columns: the next power of two, at least ``minimum``."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def pair_columns(offs_i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Column indices of the two members of rotary pair ``i``."""
    if INTERLEAVED:
        col_a = 2 * offs_i
        col_b = 2 * offs_i + 1
    else:
        col_a = offs_i
        col_b = offs_i + HALF
    return col_a, col_b


@triton.jit
def load_split(base, offs_l, mask_l, stride_l, offs_i, offs_r,
               HALF: tl.constexpr, R: tl.constexpr, REST: tl.constexpr,
               INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr):
    """Load rows ``offs_l`` of a (L, D) slab as (a, b, rest) tiles, masked, as fp32."""
    col_a, col_b = pair_columns(offs_i, HALF, INTERLEAVED)
    row = base + offs_l[:, None] * stride_l
    mask_a = mask_l[:, None] & (offs_i < HALF)[None, :]
    a = tl.load(row + col_a[None, :], mask=mask_a, other=0.0).to(tl.float32)
    b = tl.load(row + col_b[None, :], mask=mask_a, other=0.0).to(tl.float32)
    if HAS_REST:
        mask_r = mask_l[:, None] & (offs_r < REST)[None, :]
        r = tl.load(row + R + offs_r[None, :], mask=mask_r, other=0.0).to(tl.float32)
    else:
        r = tl.zeros((offs_l.shape[0], offs_r.shape[0]), dtype=tl.float32)
    return a, b, r


@triton.jit
def store_split(base, offs_l, mask_l, stride_l, offs_i, offs_r, a, b, r,
                HALF: tl.constexpr, R: tl.constexpr, REST: tl.constexpr,
                INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr):
    """Store (a, b, rest) tiles back to rows ``offs_l`` of a (L, D) slab (in its dtype)."""
    col_a, col_b = pair_columns(offs_i, HALF, INTERLEAVED)
    row = base + offs_l[:, None] * stride_l
    mask_a = mask_l[:, None] & (offs_i < HALF)[None, :]
    ty = base.dtype.element_ty
    tl.store(row + col_a[None, :], a.to(ty), mask=mask_a)
    tl.store(row + col_b[None, :], b.to(ty), mask=mask_a)
    if HAS_REST:
        mask_r = mask_l[:, None] & (offs_r < REST)[None, :]
        tl.store(row + R + offs_r[None, :], r.to(ty), mask=mask_r)


@triton.jit
def angles(theta_ptr, pos_ptr, offs_l, mask_l, offs_i, R: tl.constexpr):
    """cos, sin of phi_i = pos * theta ** (-2i/R) for rows offs_l, and dphi/dtheta.

    Returns (cos, sin, dphi_dtheta), each (rows, HALF_P) fp32;
    dphi/dtheta = -pos * (2i/R) * w_i / theta = phi * (-2i/R) / theta.
    """
    th = tl.load(theta_ptr + offs_l, mask=mask_l, other=2.0)
    ps = tl.load(pos_ptr + offs_l, mask=mask_l, other=0.0)
    expo = offs_i.to(tl.float32) * (-2.0 / R)
    # w = theta ** expo to ~1 ulp: exp2(expo * log2(theta)) in fp32 loses ~4 bits (the
    # rounding of log2(theta) ~ 11 is scaled into w), which pos up to thousands amplifies
    if USE_LIBDEVICE:
        w = libdevice.pow(th[:, None], expo[None, :])
        phi = ps[:, None] * w
        c = libdevice.cos(phi)
        s = libdevice.sin(phi)
    else:
        lt = tl.log2(th.to(tl.float64))
        w = tl.exp2(lt[:, None] * expo.to(tl.float64)[None, :]).to(tl.float32)
        phi = ps[:, None] * w
        c = tl.cos(phi)
        s = tl.sin(phi)
    dphi = phi * expo[None, :] / th[:, None]
    return c, s, dphi


@triton.jit
def mm(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation.

    DOT_F32 upcasts both operands first (exact for already-rounded fp16/bf16 values): the
    Triton interpreter's bf16 ``tl.dot`` returns garbage, so interpreted bf16 runs go here.
    """
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def exp_e(x, ACCURATE: tl.constexpr):
    """e**x as exp2(x * log2 e); finite x only (callers mask -inf themselves).

    ACCURATE (fp32 inputs) recovers the rounding of the product x * log2(e) with an fma,
    which otherwise costs |x| * 2**-24 of relative error (1e-6 at x = -20); half-precision
    inputs skip it since P is rounded to 16 bits for the PV product anyway.
    """
    LOG2E_HI: tl.constexpr = 1.4426950216293335  # float32(log2 e)
    LOG2E_LO: tl.constexpr = 1.925963033500011e-08  # log2 e - LOG2E_HI
    LN2: tl.constexpr = 0.6931471805599453
    y = x * LOG2E_HI
    if ACCURATE:
        err = tl.fma(x, LOG2E_HI, -y) + x * LOG2E_LO
        e = tl.exp2(y)
        return tl.fma(e, err * LN2, e)
    else:
        return tl.exp2(y)
