"""Triton kernels for the per-pair contracts of the preference losses (docs/preference_loss.md) and KTO.

The public ops reduce every kind to an elementwise map over pairs: per pair the loss and its derivatives w.r.t.
the policy's chosen / rejected sequence log-prob sums (and the chosen NLL for orpo). The math, outputs and
conventions are those of preference_pairs_ref / kto_items_ref in hotloop.reference.preference_loss.

One 1-D grid over blocks of BLOCK pairs; the kind is a compile-time switch. The per-pair losses are written out and
summed by the launcher's caller with torch (fixed order, no atomics, nothing read back on the host). Inputs and
outputs are float32 (callers convert), the math is float32, with log1p / expm1 written with Kahan's correction
(accurate to a few ulp, the interpreter and every GPU alike) so ORPO's log(1 - e^x) keeps its precision on both
sides of -ln 2. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotloop.contracts import LN2
from hotloop.contracts import PREFERENCE_KIND_IDS as KIND_IDS
from hotloop.triton_kernels._common import check_row_vector, float32_math

_BLOCK = 1024  # pairs per program
_LN2 = tl.constexpr(LN2)
# the kinds, as compile-time ids (the order of reference.preference_loss.KINDS)
_SIGMOID = tl.constexpr(KIND_IDS["sigmoid"])
_CDPO = tl.constexpr(KIND_IDS["cdpo"])
_ROBUST = tl.constexpr(KIND_IDS["robust"])
_HINGE = tl.constexpr(KIND_IDS["hinge"])
_IPO = tl.constexpr(KIND_IDS["ipo"])
_BCO = tl.constexpr(KIND_IDS["bco_pair"])
_SPPO = tl.constexpr(KIND_IDS["sppo_hard"])
_APO_ZERO = tl.constexpr(KIND_IDS["apo_zero"])
_APO_DOWN = tl.constexpr(KIND_IDS["apo_down"])
_SIMPO = tl.constexpr(KIND_IDS["simpo"])
_ORPO = tl.constexpr(KIND_IDS["orpo"])
_CREAM = tl.constexpr(KIND_IDS["cream"])


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _log1p(y):
    # Kahan: log(1 + y) = log(w) * y / (w - 1) with w = 1 + y rounded; exact y where w rounds to 1
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))


@triton.jit
def _expm1(x):
    # Kahan: e^x - 1 = (u - 1) * x / log(u) with u = e^x rounded; x itself where u rounds to 1
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


@triton.jit
def _log1mexp(x):
    # log(1 - e^x), x <= 0: log(-expm1(x)) above -ln 2, log1p(-exp(x)) below
    return tl.where(x > -_LN2, tl.log(-_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def _softplus(t):
    return tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))


@triton.jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _preference_pairs_kernel(
    xw_ptr, xl_ptr, rw_ptr, rl_ptr, lw_ptr, ll_ptr, c_ptr, nll_ptr,  # [B] float32 inputs
    loss_ptr, gw_ptr, gl_ptr, gnll_ptr,  # [B] float32 outputs
    B, beta, eps, gamma,
    BLOCK: tl.constexpr, KIND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    x_w = tl.load(xw_ptr + i, mask=inb, other=-1.0)
    x_l = tl.load(xl_ptr + i, mask=inb, other=-1.0)
    if KIND == _IPO or KIND == _SIMPO or KIND == _ORPO:
        inv_w = 1.0 / tl.load(lw_ptr + i, mask=inb, other=1.0)
        inv_l = 1.0 / tl.load(ll_ptr + i, mask=inb, other=1.0)
    else:
        inv_w = tl.zeros_like(x_w) + 1.0
        inv_l = tl.zeros_like(x_w) + 1.0
    if KIND == _SIMPO or KIND == _ORPO:
        u = x_w * inv_w
        v = x_l * inv_l
    else:
        u = (x_w - tl.load(rw_ptr + i, mask=inb, other=0.0)) * inv_w
        v = (x_l - tl.load(rl_ptr + i, mask=inb, other=0.0)) * inv_l
    z = beta * (u - v)
    g_nll = tl.zeros_like(x_w)
    if KIND == _SIGMOID or KIND == _CDPO or KIND == _CREAM or KIND == _SIMPO:
        if KIND == _CREAM:
            w_pos = tl.load(c_ptr + i, mask=inb, other=1.0)
        else:
            w_pos = tl.zeros_like(x_w) + (1.0 - eps)
        t = z
        if KIND == _SIMPO:
            t = z - gamma
        # w_pos * softplus(-t) + (1 - w_pos) * softplus(t)
        loss = w_pos * _softplus(-t) + (1.0 - w_pos) * _softplus(t)
        dz = -w_pos * _sigmoid(-t) + (1.0 - w_pos) * _sigmoid(t)
        du = beta * dz
        dv = -beta * dz
    elif KIND == _ROBUST:
        k = 1.0 / (1.0 - 2.0 * eps)
        loss = ((1.0 - eps) * _softplus(-z) - eps * _softplus(z)) * k
        dz = (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) * k
        du = beta * dz
        dv = -beta * dz
    elif KIND == _HINGE:
        m = 1.0 - z
        loss = tl.where(m > 0, m, 0.0)
        dz = tl.where(m > 0, -1.0, 0.0)
        du = beta * dz
        dv = -beta * dz
    elif KIND == _IPO:
        e = u - v - 1.0 / (2.0 * beta)
        loss = e * e
        du = 2.0 * e
        dv = -2.0 * e
    elif KIND == _BCO:
        loss = _softplus(-beta * u) + _softplus(beta * v)
        du = -beta * _sigmoid(-beta * u)
        dv = beta * _sigmoid(beta * v)
    elif KIND == _SPPO:
        ew = u - 0.5 / beta
        el = v + 0.5 / beta
        loss = ew * ew + el * el
        du = 2.0 * ew
        dv = 2.0 * el
    elif KIND == _APO_ZERO:
        sw = _sigmoid(beta * u)
        sl = _sigmoid(beta * v)
        loss = 1.0 - sw + sl
        du = -beta * sw * (1.0 - sw)
        dv = beta * sl * (1.0 - sl)
    elif KIND == _APO_DOWN:
        sw = _sigmoid(beta * u)
        sz = _sigmoid(z)
        loss = sw + 1.0 - sz
        dv = beta * sz * (1.0 - sz)
        du = beta * sw * (1.0 - sw) - dv
    else:  # ORPO
        lo = (u - v) - (_log1mexp(u) - _log1mexp(v))
        loss = tl.load(nll_ptr + i, mask=inb, other=0.0) + beta * _softplus(-lo)
        dlo = -beta * _sigmoid(-lo)
        du = -dlo / _expm1(u)  # d lo / du = -1 / expm1(u)
        dv = dlo / _expm1(v)
        g_nll = g_nll + 1.0
    tl.store(loss_ptr + i, loss, mask=inb)
    tl.store(gw_ptr + i, du * inv_w, mask=inb)
    tl.store(gl_ptr + i, dv * inv_l, mask=inb)
    tl.store(gnll_ptr + i, g_nll, mask=inb)


@triton.jit
def _kto_items_kernel(
    x_ptr, r_ptr, d_ptr, kl_ptr,  # [B] float32 inputs, kl [1]
    loss_ptr, g_ptr,  # [B] float32 outputs
    B, beta, w_des, w_und,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    h = tl.load(x_ptr + i, mask=inb, other=0.0) - tl.load(r_ptr + i, mask=inb, other=0.0)
    des = tl.load(d_ptr + i, mask=inb, other=0.0) > 0.5
    kl = tl.load(kl_ptr)
    t = tl.where(des, beta * (h - kl), beta * (kl - h))
    s = _sigmoid(t)
    w = tl.where(des, w_des, w_und)
    tl.store(loss_ptr + i, w * (1.0 - s), mask=inb)
    tl.store(g_ptr + i, -w * s * (1.0 - s) * beta * tl.where(des, 1.0, -1.0), mask=inb)


# ---------------------------------------------------------------------------------------------------- launchers
@float32_math
def preference_pairs_triton(x_w: Tensor, x_l: Tensor, r_w: Tensor, r_l: Tensor, len_w: Tensor, len_l: Tensor,
                            c: Tensor, nll: Tensor, kind: int, beta: float, label_smoothing: float, gamma: float
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """preference_pairs_ref on contiguous float32 [B] tensors -> (loss, g_w, g_l, g_nll), each [B] float32.
    kind: KIND_IDS value. Asynchronous: launches only, no device -> host copies."""
    if kind not in KIND_IDS.values():
        raise ValueError(f"kind must be one of {sorted(KIND_IDS.values())}, got {kind!r}")
    B, dev = x_w.numel(), x_w.device
    for name, t in dict(x_w=x_w, x_l=x_l, r_w=r_w, r_l=r_l, len_w=len_w, len_l=len_l, c=c, nll=nll).items():
        check_row_vector(name, t, (B,), dev)
    outs = [torch.empty(B, dtype=torch.float32, device=dev) for _ in range(4)]
    if B == 0:
        return tuple(outs)
    grid = (triton.cdiv(B, _BLOCK),)
    _preference_pairs_kernel[grid](x_w, x_l, r_w, r_l, len_w, len_l, c, nll, *outs, B, float(beta),
                                   float(label_smoothing), float(gamma), BLOCK=_BLOCK, KIND=kind)
    return tuple(outs)


@float32_math
def kto_items_triton(x: Tensor, r: Tensor, d: Tensor, kl: Tensor, beta: float, desirable_weight: float,
                     undesirable_weight: float) -> tuple[Tensor, Tensor]:
    """kto_items_ref on contiguous float32 [B] tensors (kl [1]) -> (loss [B], g [B]) float32. Asynchronous."""
    B, dev = x.numel(), x.device
    for name, t in dict(x=x, r=r, d=d).items():
        check_row_vector(name, t, (B,), dev)
    check_row_vector("kl", kl, (1,), dev)
    loss = torch.empty(B, dtype=torch.float32, device=dev)
    g = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return loss, g
    grid = (triton.cdiv(B, _BLOCK),)
    _kto_items_kernel[grid](x, r, d, kl, loss, g, B, float(beta), float(desirable_weight),
                            float(undesirable_weight), BLOCK=_BLOCK)
    return loss, g
