"""Triton kernels for fused linear log-probs: token_stats of z = hidden @ weight.T (+ bias) without the [N, V] logits.

Forward, per row with label y, z' = z / T:
    lse = logsumexp(z'),  logprob = z'[y] - lse,  entropy = lse - sum_v p_v z'_v,
    self_certainty = lse - mean(z') - log V.
Grid (cdiv(N, BLOCK_M), splits). A program owns BLOCK_M rows and a contiguous range of vocab tiles; for each
[BLOCK_M, BLOCK_N] tile it accumulates tl.dot over H in BLOCK_K chunks (fp32 accumulator), adds the bias, scales
by 1/T, and folds the tile into per-row online statistics (M, S = sum exp(z' - M), A = sum exp(z' - M)(z' - M),
Bsum = sum z') exactly as token_stats does, picking z'[y] where col == y. With one split the program finalizes its
rows; with several (too few row blocks to fill the GPU) it writes (M, S, A, Bsum, z'[y] or 0) per (row, split) to
a [N, splits, 5] fp32 workspace and a tiny merge kernel finalizes.
Memory traffic: weight is read cdiv(N, BLOCK_M) times (from L2 when row blocks run together), hidden once per
(row block, vocab tile) from L1/L2; writes are 4 floats per row. Flops 2 N V H, the same as the logits matmul.

Backward, with upstream g_lp, g_h, g_sc per row, p = exp(z' - lse), d = z' - lse, Hrow the saved entropy:
    dz_j = (g_lp [j == y] - p_j (g_lp - g_sc + g_h (d_j + Hrow)) - g_sc / V) / T   (fp32)
    d_hidden = dz @ weight,  d_weight = dz^T @ hidden,  d_bias = sum_rows dz.
Scheme: ONE kernel, grid (cdiv(N, BLOCK_M), cdiv(V, BLOCK_N)), fp32 atomics. Each program recomputes its logits
tile once (2 BM BN H flops), forms dz in registers, then for each BLOCK_K chunk of H atomically adds
dz @ W[tile] into an fp32 [N, H] buffer and dz^T @ h[tile] into an fp32 [V, H] buffer (and sum_rows dz into [V]).
Why: H (thousands) is far too wide to keep a [BLOCK_M, H] or [BLOCK_N, H] accumulator in registers, so every
atomic-free order must either recompute the logits tile once per H chunk (H / BLOCK_K times the forward) or run
two kernels with a logits recompute each; atomics cost 1 recompute (3 GEMMs of work in total instead of 4+).
Counts: 1 logits recompute per tile; atomic elements = N H cdiv(V, BLOCK_N) + V H cdiv(N, BLOCK_M) (+ V cdiv(N,
BLOCK_M) for the bias), i.e. N V H (1 / BLOCK_N + 1 / BLOCK_M). The float summation order of the atomics is not
deterministic run to run. Row blocks with no live row skip all work; with `filter_eps > 0` a tile whose
no live row reaches softmax probability filter_eps (nor holds its label) skips its H loop (cut-cross-entropy's
gradient filtering: an approximation, off by default).

Rows whose label is ignore_index give 0 outputs and contribute no gradient (their hidden rows are not even read);
labels outside [0, V) give NaN outputs and a NaN dz row (so NaN in that d_hidden row, d_weight and d_bias), never
an out-of-bounds read. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it);
the interpreter's tl.dot is wrong for bf16 / fp16 operands, so there both are upcast to fp32 first (UPCAST).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotloop.triton_kernels._common import (FLOAT_DTYPES, capability, check_row_vector, interpreting,
                                            vocab_splits)
from hotloop.triton_kernels.token_stats import _finalize_rows, _rescale_base


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, load_rows, cols, cmask, H, stride_h, stride_w, inv_t,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z' = (hidden[rows] @ weight[cols].T + bias[cols]) / T as a [BLOCK_M, BLOCK_N] fp32 tile; -inf past V.

    rows / cols are int64 so row * stride cannot wrap; rows outside load_rows read as 0 (ignored rows are not read).
    """
    h_base = hidden_ptr + rows * stride_h
    w_base = weight_ptr + cols * stride_w
    ks0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, H, BLOCK_K):
        ks = k + ks0
        kmask = ks < H
        h = tl.load(h_base[:, None] + ks[None, :], mask=load_rows[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base[:, None] + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(cmask[None, :], acc * inv_t, float("-inf"))


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _linear_token_stats_fwd_kernel(
    hidden_ptr,  # [N, H] fp32/bf16/fp16, unit stride along H, row stride stride_h
    weight_ptr,  # [V, H] same dtype, unit stride along H, row stride stride_w
    bias_ptr,  # [V] same dtype, contiguous (a dummy unless HAS_BIAS)
    labels_ptr,  # [N] int32/int64, contiguous
    lp_ptr,  # [N] fp32 out: logprobs (written only when not SPLIT)
    ent_ptr,  # [N] fp32 out: entropy (only when HAS_ENTROPY and not SPLIT; else a dummy)
    sc_ptr,  # [N] fp32 out: self-certainty (only when HAS_SC and not SPLIT; else a dummy)
    lse_ptr,  # [N] fp32 out: logsumexp(z'), saved for the backward (only when not SPLIT)
    ws_ptr,  # [N, num_splits, 5] fp32 out: partial (M, S, A, Bsum, z'[y] or 0) per split (only when SPLIT)
    N, V, H, stride_h, stride_w,
    inv_t, log_v, inv_v,  # 1 / temperature, log V, 1 / V (host floats: no per-shape recompiles)
    ignore_index, num_splits, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SC: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    # padding rows read as ignored, so they count as dead everywhere below
    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    live = valid & in_range

    n_tiles = tl.cdiv(V, BLOCK_N)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    # a block of only ignored / bad-label rows has its outputs fixed already: skip its matmul (padding is common)
    any_live = tl.max(live.to(tl.int32), axis=0) > 0
    tile_hi = tl.where(any_live, tile_hi, tile_lo)

    cols0 = tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    a = tl.zeros((BLOCK_M,), tl.float32)
    bsum = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = (tile * BLOCK_N + cols0).to(tl.int64)
        cmask = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, live, cols, cmask, H, stride_h, stride_w, inv_t,
                         BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, UPCAST, PRECISION)
        # the label column lies in exactly one tile of one split; elsewhere this adds 0
        zy += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        ref, c, shift = _rescale_base(m, m_new)
        d = z - ref[:, None]
        e = tl.exp(d)  # 0 on padding columns (-inf)
        if HAS_ENTROPY:
            # clamp before multiplying: e * d would be 0 * (-inf) = NaN on padding columns; NaN stays NaN
            d_c = tl.where(d < -200.0, -200.0, d)
            a = c * (a + s * shift) + tl.sum(e * d_c, axis=1)
        s = c * s + tl.sum(e, axis=1)
        if HAS_SC:
            bsum += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        m = m_new

    if SPLIT:
        base = ws_ptr + (rows * num_splits + split) * 5
        tl.store(base + 0, m, mask=rmask)
        tl.store(base + 1, s, mask=rmask)
        tl.store(base + 2, a, mask=rmask)
        tl.store(base + 3, bsum, mask=rmask)
        tl.store(base + 4, zy, mask=rmask)
    else:
        _finalize_rows(rows, rmask, m, s, a, bsum, zy, valid, in_range, log_v, inv_v,
                       lp_ptr, ent_ptr, sc_ptr, lse_ptr, HAS_ENTROPY, HAS_SC)


@triton.jit
def _linear_token_stats_merge_kernel(
    ws_ptr,  # [N, num_splits, 5] fp32 in: partial (M, S, A, Bsum, z'[y] or 0) of each vocab chunk
    labels_ptr,  # [N] int32/int64, contiguous
    lp_ptr,  # [N] fp32 out: logprobs
    ent_ptr,  # [N] fp32 out: entropy (a dummy unless HAS_ENTROPY)
    sc_ptr,  # [N] fp32 out: self-certainty (a dummy unless HAS_SC)
    lse_ptr,  # [N] fp32 out: logsumexp(z')
    N, V, log_v, inv_v, ignore_index, num_splits,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    k = tl.arange(0, BLOCK_S)
    mask = rmask[:, None] & (k < num_splits)[None, :]
    base = ws_ptr + (rows[:, None] * num_splits + k[None, :]) * 5
    # absent lanes read as an empty chunk (M = -inf, S = A = Bsum = z'[y] = 0), which the merge ignores
    m_k = tl.load(base + 0, mask=mask, other=float("-inf"))
    s_k = tl.load(base + 1, mask=mask, other=0.0)
    a_k = tl.load(base + 2, mask=mask, other=0.0)
    b_k = tl.load(base + 3, mask=mask, other=0.0)
    zy_k = tl.load(base + 4, mask=mask, other=0.0)
    m = tl.max(m_k, axis=1)
    _, c_k, shift_k = _rescale_base(m_k, m[:, None])
    s = tl.sum(c_k * s_k, axis=1)
    a = tl.sum(c_k * (a_k + s_k * shift_k), axis=1)
    bsum = tl.sum(b_k, axis=1)
    zy = tl.sum(zy_k, axis=1)
    _finalize_rows(rows, rmask, m, s, a, bsum, zy, valid, in_range, log_v, inv_v,
                   lp_ptr, ent_ptr, sc_ptr, lse_ptr, HAS_ENTROPY, HAS_SC)


@triton.jit
def _linear_token_stats_bwd_kernel(
    dh_ptr,  # [N, H] fp32 accumulator (zeroed), contiguous; atomically added to (a dummy unless NEED_H)
    dw_ptr,  # [V, H] fp32 accumulator (zeroed), contiguous; atomically added to (a dummy unless NEED_W)
    db_ptr,  # [V] fp32 accumulator (zeroed); atomically added to (a dummy unless NEED_B)
    hidden_ptr,  # [N, H] fp32/bf16/fp16, unit stride along H, row stride stride_h
    weight_ptr,  # [V, H] same dtype, unit stride along H, row stride stride_w
    bias_ptr,  # [V] same dtype, contiguous (a dummy unless HAS_BIAS)
    labels_ptr,  # [N] int32/int64, contiguous
    g_lp_ptr,  # [N] fp32 upstream d/d logprobs (a dummy unless HAS_GLP)
    g_h_ptr,  # [N] fp32 upstream d/d entropy (a dummy unless HAS_GH)
    g_sc_ptr,  # [N] fp32 upstream d/d self-certainty (a dummy unless HAS_GSC)
    lse_ptr,  # [N] fp32 logsumexp(z') from the forward
    ent_ptr,  # [N] fp32 entropy from the forward (a dummy unless HAS_GH)
    N, V, H, stride_h, stride_w,
    inv_t, inv_v, ignore_index, filter_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, HAS_GSC: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cmask = cols < V
    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    live = valid & in_range

    lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    g_lp = zero
    g_h = zero
    g_sc = zero
    hrow = zero
    if HAS_GLP:
        g_lp = tl.load(g_lp_ptr + rows, mask=live, other=0.0)
    if HAS_GH:
        g_h = tl.load(g_h_ptr + rows, mask=live, other=0.0)
        hrow = tl.load(ent_ptr + rows, mask=live, other=0.0)
    if HAS_GSC:
        g_sc = tl.load(g_sc_ptr + rows, mask=live, other=0.0)
    # the row-constant parts of dz_j = (g_lp [j == y] - p_j (coef + g_h d_j) - g_sc / V) / T
    coef = g_lp - g_sc + g_h * hrow
    const = g_sc * inv_v
    # ignored / padding rows: exact zeros; bad labels: NaN (as token_stats' backward)
    fill = tl.where(valid, tl.where(in_range, 0.0, float("nan")), 0.0)

    # only live rows' hidden is read: an ignored row may hold anything (even NaN) and must contribute nothing
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, live, cols, cmask, H, stride_h, stride_w, inv_t,
                     BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, UPCAST, PRECISION)
    d = z - lse[:, None]
    p = tl.exp(d)  # 0 on padding columns
    inner = coef[:, None]
    if HAS_GH:
        d_c = tl.where(d < -200.0, -200.0, d)  # p * d = 0 * (-inf) would be NaN on padding columns
        inner = coef[:, None] + g_h[:, None] * d_c
    dz = tl.where(cols[None, :] == label[:, None], g_lp[:, None], 0.0) - p * inner - const[:, None]
    dz = tl.where(live[:, None], dz * inv_t, fill[:, None])
    dz = tl.where(cmask[None, :], dz, 0.0)  # padding columns: no gradient (const would leak there)

    # which tiles do any work: a block with a valid row (live or NaN-filled), and with FILTER a large enough dz
    keep = tl.max(valid.to(tl.int32), axis=0) > 0
    if FILTER:
        # softmax probability >= filter_eps, the label, or NaN (a bad row must still spread its NaN)
        big = live[:, None] & ((p >= filter_eps) | (cols[None, :] == label[:, None])) | (dz != dz)
        keep = keep & (tl.max(tl.max(big.to(tl.int32), axis=1), axis=0) > 0)

    if NEED_B:
        # (the bound form of `cmask & keep`: the interpreter's atomics reject a mask broadcast from a scalar)
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=cols < tl.where(keep, V, 0), sem="relaxed")

    # the gradient GEMMs run in the inputs' dtype like the forward (tensor cores on GPU); the interpreter
    # still rounds dz to that dtype, then computes in fp32 (its bf16 dot is wrong)
    dz_lo = dz.to(hidden_ptr.dtype.element_ty)
    if UPCAST:
        dz_lo = dz_lo.to(tl.float32)
    h_base = hidden_ptr + rows * stride_h
    w_base = weight_ptr + cols * stride_w
    ks0 = tl.arange(0, BLOCK_K)
    k_hi = tl.where(keep, H, 0)
    for k in range(0, k_hi, BLOCK_K):
        ks = k + ks0
        kmask = ks < H
        if NEED_H:
            w = tl.load(w_base[:, None] + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz_lo, w, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K]
            # ignored rows have dz = 0: skip their atomics (fewer L2 transactions, and their rows stay exact 0)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh,
                          mask=valid[:, None] & kmask[None, :], sem="relaxed")
        if NEED_W:
            h = tl.load(h_base[:, None] + ks[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_lo), h, input_precision=PRECISION)  # [BLOCK_N, BLOCK_K]
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw,
                          mask=cmask[:, None] & kmask[None, :], sem="relaxed")


# -------------------------------------------------------------------------------------------------- launchers
def _block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    # tl.dot needs every tile dimension >= 16 on GPU
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def _blocks(N: int, V: int, H: int, itemsize: int, device: torch.device, block_m, block_n, block_k
            ) -> tuple[int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), the same for the forward and the backward."""
    if device.type == "cuda":
        # The largest tiles that compile without register spills under triton 3.6 and 3.9 on sm_80 and sm_90a
        # (scripts/triton_compile_matrix.py reads them): K chunks of 128 bytes per row (64 bf16 or 32 fp32).
        # 2-byte inputs: 128 x 128 over 16 warps on Hopper (8 warps spilled 20 B a thread in the forward with
        # entropy under 3.6; 16 warps spill 12 B with entropy, self-certainty and bias together, accepted in the
        # matrix), 64 x 128 over 8 warps on sm_80 (128 x 128 spilled 24 B forward, 400 B backward).
        # fp32 spills at any 128-wide tile (up to 600 B in the backward); 64 x 64 over 16 warps spills none under
        # 3.9 and 4 B (ieee, no tensor cores) under 3.6.
        if itemsize == 4:
            dm, dn, warps = 64, 64, 16
        elif capability(device) >= 90:
            dm, dn, warps = 128, 128, 16
        else:
            dm, dn, warps = 64, 128, 8
        dk = 128 // itemsize
        if N <= 64:
            dm = 64
    else:
        # the interpreter runs numpy per op: small tiles keep tests cheap and every loop exercised
        dm, dn, dk, warps = 16, 64, 32, 4
    np2 = triton.next_power_of_2
    dm = max(16, min(dm, np2(max(N, 1))))
    dn = max(16, min(dn, np2(max(V, 1))))
    dk = max(16, min(dk, np2(max(H, 1))))
    bm, bn, bk = _block("block_m", block_m, dm), _block("block_n", block_n, dn), _block("block_k", block_k, dk)
    # tiles shrunk to a small N / V, or chosen by the caller: >= 8 tile elements a thread and <= 4 warps per 16
    # rows (a 16 x 128 tile over 8 warps spilled on sm_80)
    return bm, bn, bk, max(1, min(warps, bm * bn // 256, bm // 4))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (ieee by default, like hidden @ weight.T would be);
    # for bf16 / fp16 the argument does nothing
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"triton linear_token_stats takes float32 / bfloat16 / float16 {name}, got {t.dtype}")
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name} must have unit stride along H, got strides {t.stride()}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[1]} (hidden's), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"triton linear_token_stats takes float32 / bfloat16 / float16 bias, got {bias.dtype}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.shape != (weight.shape[0],) or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous [V] = [{weight.shape[0]}], got {tuple(bias.shape)} "
                             f"with strides {bias.stride()}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.shape != (hidden.shape[0],) or not labels.is_contiguous():
        raise ValueError(f"labels must be contiguous [N] = [{hidden.shape[0]}], got {tuple(labels.shape)} "
                         f"with strides {labels.stride()}")
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} on {t.device}, hidden on {hidden.device}")


def linear_token_stats_fwd_triton(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                                  temperature: float, ignore_index: int, entropy: bool, self_certainty: bool, *,
                                  num_splits: int | None = None, block_m: int | None = None,
                                  block_n: int | None = None, block_k: int | None = None
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> (logprobs, entropy or [0],
    self_certainty or [0], lse), each [N] float32. `num_splits` / `block_*` override the heuristics."""
    _check_inputs(hidden, weight, bias, labels)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    lp = torch.empty((N,), dtype=torch.float32, device=dev)
    lse = torch.empty((N,), dtype=torch.float32, device=dev)
    ent = torch.empty((N,) if entropy else (0,), dtype=torch.float32, device=dev)
    sc = torch.empty((N,) if self_certainty else (0,), dtype=torch.float32, device=dev)
    if N == 0:
        return lp, ent, sc, lse

    bm, bn, bk, warps = _blocks(N, V, H, hidden.element_size(), dev, block_m, block_n, block_k)
    m_blocks = triton.cdiv(N, bm)
    splits, tiles_per_split = vocab_splits(m_blocks, triton.cdiv(V, bn), dev, num_splits)
    inv_t = 1.0 / float(temperature)
    log_v = math.log(V)
    inv_v = 1.0 / V
    ent_arg = ent if entropy else lse  # never written when the flag is off
    sc_arg = sc if self_certainty else lse
    common = dict(HAS_ENTROPY=bool(entropy), HAS_SC=bool(self_certainty))
    ws = torch.empty((N, splits, 5), dtype=torch.float32, device=dev) if splits > 1 else lse
    _linear_token_stats_fwd_kernel[(m_blocks, splits)](
        hidden, weight, hidden if bias is None else bias, labels, lp, ent_arg, sc_arg, lse, ws,
        N, V, H, hidden.stride(0), weight.stride(0), inv_t, log_v, inv_v, ignore_index, splits, tiles_per_split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        UPCAST=interpreting(), PRECISION=_precision(hidden.dtype), num_warps=warps, **common)
    if splits > 1:
        # a program merges BLOCK_R rows x BLOCK_S splits x 5 partials: 1024 (row, split) pairs over up to 4
        # warps, 40 values a thread, for the <= 4 x SMs splits the heuristic picks (16 rows x 512 splits on one
        # warp spilled 12 KiB a thread on sm_80); a num_splits override past 1024 gives one row a program
        block_s = max(2, triton.next_power_of_2(splits))
        block_r = max(1, min(16, 1024 // block_s))
        _linear_token_stats_merge_kernel[(triton.cdiv(N, block_r),)](
            ws, labels, lp, ent_arg, sc_arg, lse, N, V, log_v, inv_v, ignore_index, splits,
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=max(1, min(4, block_r * block_s // 256)), **common)
    return lp, ent, sc, lse


def linear_token_stats_bwd_triton(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                                  grad_self_certainty: Tensor | None, hidden: Tensor, weight: Tensor,
                                  bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                                  temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                                  need_bias: bool, *, block_m: int | None = None, block_n: int | None = None,
                                  block_k: int | None = None, filter_eps: float = 0.0
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's dtype, d_bias [V] in bias' dtype);
    each an empty [0] tensor when not needed. `filter_eps > 0` skips tiles where every p < filter_eps."""
    _check_inputs(hidden, weight, bias, labels)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if need_bias and bias is None:
        raise ValueError("need_bias without a bias")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    for name, t in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy),
                    ("grad_self_certainty", grad_self_certainty), ("lse", lse),
                    ("entropy", entropy if grad_entropy is not None else None)):
        check_row_vector(name, t, (N,), dev)

    f32 = torch.float32
    # fp32 accumulators (atomics), zeroed; fp32 outputs are returned as they are, others cast once at the end.
    # Gradients not asked for are empty [0] tensors of the dtype they would have had.
    dh = torch.zeros((N, H), dtype=f32, device=dev) if need_hidden else hidden.new_empty((0,))
    dw = torch.zeros((V, H), dtype=f32, device=dev) if need_weight else weight.new_empty((0,))
    db = torch.zeros((V,), dtype=f32, device=dev) if need_bias else (hidden if bias is None else bias).new_empty((0,))
    has_grad = any(g is not None for g in (grad_logprobs, grad_entropy, grad_self_certainty))
    if N > 0 and has_grad and (need_hidden or need_weight or need_bias):
        bm, bn, bk, warps = _blocks(N, V, H, hidden.element_size(), dev, block_m, block_n, block_k)
        dummy = lse
        _linear_token_stats_bwd_kernel[(triton.cdiv(N, bm), triton.cdiv(V, bn))](
            dh if need_hidden else dummy, dw if need_weight else dummy, db if need_bias else dummy,
            hidden, weight, hidden if bias is None else bias, labels,
            dummy if grad_logprobs is None else grad_logprobs,
            dummy if grad_entropy is None else grad_entropy,
            dummy if grad_self_certainty is None else grad_self_certainty,
            lse, dummy if grad_entropy is None else entropy,
            N, V, H, hidden.stride(0), weight.stride(0),
            1.0 / float(temperature), 1.0 / V, ignore_index, float(filter_eps),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None,
            HAS_GLP=grad_logprobs is not None, HAS_GH=grad_entropy is not None,
            HAS_GSC=grad_self_certainty is not None,
            NEED_H=bool(need_hidden), NEED_W=bool(need_weight), NEED_B=bool(need_bias), FILTER=filter_eps > 0,
            UPCAST=interpreting(), PRECISION=_precision(hidden.dtype), num_warps=warps)
    if need_hidden and hidden.dtype != f32:
        dh = dh.to(hidden.dtype)
    if need_weight and weight.dtype != f32:
        dw = dw.to(weight.dtype)
    if need_bias and bias.dtype != f32:
        db = db.to(bias.dtype)
    return dh, dw, db
