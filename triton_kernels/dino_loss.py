"""Triton kernels for the DINO loss (docs/dino_loss.md): per-row fused softmax / log-softmax over K prototypes.

    1. _dino_teacher_kernel   one program per teacher row: q = softmax((t - c) / tau_t) (online max / sum over
                              K tiles, then a write pass), float32 [n_global * B, K]
    2. _dino_student_kernel   one program per student row (crop v, image b): with r = sum of the q rows of image b
                              paired with v (all n_global but v itself), an online log-sum-exp of s' = s / tau_s
                              and the dot r . s' in one pass; the row's term m_v * lse - r . s' (m_v = the number
                              of paired teacher crops); then the gradient (m_v softmax(s') - r) * gscale in a
                              second pass, rounded once to the student's dtype
The loss is the sum of the row terms / (n_terms * B), a torch reduction on device (no host sync). Math in float32
(float64 for float64 inputs: the CPU interpreter only). Runs on CUDA tensors, or CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 2048


@triton.jit
def _dino_teacher_kernel(
    t_ptr,  # [n_global * B, K] teacher outputs, contiguous
    c_ptr,  # [K] centre, accumulation dtype
    q_ptr,  # [n_global * B, K] out: softmax((t - c) / tau_t), accumulation dtype
    K, inv_tau,
    BLOCK: tl.constexpr,
):
    acc = q_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    m = tl.full((BLOCK,), float("-inf"), acc)
    s = tl.zeros((BLOCK,), acc)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < K
        c = tl.load(c_ptr + k, mask=mask, other=0.0)
        x = (tl.load(t_ptr + base + k, mask=mask, other=0.0).to(acc) - c) * inv_tau
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, x)
        # lanes that saw only -inf (masked tail) shift by 0 instead: exp(-inf) = 0 keeps s = 0, no -inf - -inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    mx = tl.max(m, axis=0)
    tot = tl.sum(s * tl.exp(m - mx), axis=0)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < K
        c = tl.load(c_ptr + k, mask=mask, other=0.0)
        x = (tl.load(t_ptr + base + k, mask=mask, other=0.0).to(acc) - c) * inv_tau
        tl.store(q_ptr + base + k, tl.exp(x - mx) / tot, mask=mask)


@triton.jit
def _other_teachers(q_ptr, B, K, NG, v, b, k, mask, BLOCK: tl.constexpr, acc: tl.constexpr):
    """Σ over the global crops i != v of image b's teacher softmax at columns k (crop v's target mass)."""
    r = tl.zeros((BLOCK,), acc)
    for i in range(0, NG):
        if i != v:
            r += tl.load(q_ptr + (i * B + b) * K + k, mask=mask, other=0.0)
    return r


@triton.jit
def _dino_student_kernel(
    s_ptr,  # [n_crops * B, K] student outputs, contiguous
    q_ptr,  # [n_global * B, K] teacher softmaxes from _dino_teacher_kernel
    g_ptr,  # [n_crops * B, K] out: d loss / d student, student's dtype (unused without NEED_GRAD)
    terms_ptr,  # [n_crops * B] out: m_v * lse - r . s', accumulation dtype
    B, K, NG, inv_tau, gscale,
    BLOCK: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    acc = terms_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    v = row // B
    b = row - v * B
    base = row * K
    m_v = (NG - tl.where(v < NG, 1, 0)).to(acc)
    m = tl.full((BLOCK,), float("-inf"), acc)
    s = tl.zeros((BLOCK,), acc)
    dot = tl.zeros((BLOCK,), acc)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < K
        x = tl.load(s_ptr + base + k, mask=mask, other=0.0).to(acc) * inv_tau
        r = _other_teachers(q_ptr, B, K, NG, v, b, k, mask, BLOCK, acc)
        dot += r * x
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    tl.store(terms_ptr + row, m_v * lse - tl.sum(dot, axis=0))
    if NEED_GRAD:
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            mask = k < K
            x = tl.load(s_ptr + base + k, mask=mask, other=0.0).to(acc) * inv_tau
            r = _other_teachers(q_ptr, B, K, NG, v, b, k, mask, BLOCK, acc)
            g = (m_v * tl.exp(x - lse) - r) * gscale
            tl.store(g_ptr + base + k, g.to(g_ptr.dtype.element_ty), mask=mask)


def dino_loss_fwd_triton(student: Tensor, teacher: Tensor, center: Tensor, n_global: int, tau_s: float,
                         tau_t: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """Checked by hotloop.dino_loss: contiguous [n_crops*B, K] / [n_global*B, K], center [K] in the accumulation
    dtype. -> (loss [], grad [n_crops*B, K] in student's dtype or [0])."""
    acc = center.dtype
    K = student.shape[1]
    B = teacher.shape[0] // n_global
    n_crops = student.shape[0] // B
    n_terms = n_global * n_crops - min(n_global, n_crops)
    block = min(_BLOCK, triton.next_power_of_2(K))
    q = torch.empty(teacher.shape, dtype=acc, device=student.device)
    _dino_teacher_kernel[(teacher.shape[0],)](teacher, center, q, K, 1.0 / tau_t, BLOCK=block)
    terms = torch.empty(student.shape[0], dtype=acc, device=student.device)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    gscale = 1.0 / (tau_s * n_terms * B)
    _dino_student_kernel[(student.shape[0],)](student, q, grad if need_grad else student, terms, B, K, n_global,
                                              1.0 / tau_s, gscale, BLOCK=block, NEED_GRAD=need_grad)
    return terms.sum() / (n_terms * B), grad
