"""Triton kernels for per-token log-prob, entropy and self-certainty (docs/token_stats.md): one streaming pass over V.

Forward, per row z (V logits), z' = z / T: an online pass keeps the running max M, S = sum exp(z' - M),
A = sum exp(z' - M) * (z' - M) and Bsum = sum z', so that
    lse = M + log S,  logprob = z'[y] - lse,  entropy = log S - A / S,  self_certainty = lse - Bsum / V - log V.
The grid is (rows, splits). With one split a program owns a whole row and finalizes it; when there are too few
rows to fill the GPU the vocabulary is cut into `splits` chunks whose partial (M, S, A, Bsum) go to a small fp32
workspace, merged and finalized by a second, tiny kernel (the merge is the same rescale as the online update).

Backward, one pass, grid (rows, splits): with p = exp(z' - lse), d = z' - lse, H the saved entropy,
    dz_j = (g_lp [j == y] - p_j (g_lp - g_sc + g_h (d_j + H)) - g_sc / V) / T,
computed in fp32 and rounded once into the gradient's dtype. Every element is read and written by the same
program, so the gradient may overwrite the logits (in-place backward).

Rows whose label is ignore_index give 0 outputs and a 0 gradient; labels outside [0, V) give NaN (never an
out-of-bounds read). Masked vocabulary (-inf logits) contributes nothing and never makes a NaN; NaN logits do.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hotloop.triton_kernels._common import FLOAT_DTYPES, check_row_vector, vocab_splits


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    # row is int64, so b * stride_b cannot wrap for tensors past 2^31 elements
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _finalize_rows(rows, rmask, m, s, a, bsum, zy, valid, in_range, log_v, inv_v,
                   lp_ptr, ent_ptr, sc_ptr, lse_ptr, HAS_ENTROPY: tl.constexpr, HAS_SC: tl.constexpr):
    # one row (scalars) or a block of rows (vectors, rmask for the tail); zy is z'[y], already divided by T
    nan = float("nan")
    # rows whose loop was skipped have s = 0: give them a harmless (m, s) so no log(0) / 0 / 0 is evaluated
    live = valid & in_range
    m = tl.where(live, m, 0.0)
    s = tl.where(live, s, 1.0)
    log_s = tl.log(s)
    lse = m + log_s
    zero = tl.zeros_like(lse)
    # ignored rows: exact zeros (lse 0); labels outside [0, V): NaN in every output
    lp = tl.where(in_range, zy - lse, nan)
    tl.store(lp_ptr + rows, tl.where(valid, lp, zero), mask=rmask)
    tl.store(lse_ptr + rows, tl.where(valid, tl.where(in_range, lse, nan), zero), mask=rmask)
    if HAS_ENTROPY:
        ent = tl.where(in_range, log_s - a / s, nan)
        tl.store(ent_ptr + rows, tl.where(valid, ent, zero), mask=rmask)
    if HAS_SC:
        sc = tl.where(in_range, lse - bsum * inv_v - log_v, nan)
        tl.store(sc_ptr + rows, tl.where(valid, sc, zero), mask=rmask)


@triton.jit
def _rescale_base(m_old, m_new):
    # A finite reference for the rescale: while all seen is -inf (m_new == -inf) use 0, so exp(m_old - ref)
    # is 0 rather than exp(-inf + inf) = NaN. exp(x) of an fp32 x < -200 is 0, so clamping the shift there
    # changes nothing but keeps S * shift = 0 * (-inf) out of A.
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = m_old - ref
    shift_c = tl.where(shift < -200.0, -200.0, shift)
    return ref, tl.exp(shift), shift_c


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,  # [B, T, V] fp32/bf16/fp16, unit stride along V; leading strides stride_b, stride_t
    labels_ptr,  # [B * T] int32/int64, contiguous
    lp_ptr,  # [B * T] fp32 out: logprobs (written only when not SPLIT)
    ent_ptr,  # [B * T] fp32 out: entropy (only when HAS_ENTROPY and not SPLIT; else a dummy)
    sc_ptr,  # [B * T] fp32 out: self-certainty (only when HAS_SC and not SPLIT; else a dummy)
    lse_ptr,  # [B * T] fp32 out: logsumexp(z'), saved for the backward (only when not SPLIT)
    ws_ptr,  # [B * T, num_splits, 4] fp32 out: partial (M, S, A, Bsum) per split (only when SPLIT)
    T, V, stride_b, stride_t,
    inv_t, log_v, inv_v,  # 1 / temperature, log V, 1 / V (host floats: no per-shape recompiles)
    ignore_index, num_splits, tiles_per_split,
    BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SC: tl.constexpr, SPLIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    n_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    # ignored and bad-label rows have their outputs fixed already: skip their logits (padding is common)
    tile_hi = tl.where(valid & in_range, tile_hi, tile_lo)

    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    bsum = tl.zeros((), tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + cols0
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref, c, shift = _rescale_base(m, m_new)
        d = z - ref
        e = tl.exp(d)  # 0 for -inf logits and for padding lanes
        if HAS_ENTROPY:
            # clamp before multiplying: e * d would be 0 * (-inf) = NaN for masked vocab; NaN stays NaN
            d_c = tl.where(d < -200.0, -200.0, d)
            a = c * (a + s * shift) + tl.sum(e * d_c, axis=0)
        s = c * s + tl.sum(e, axis=0)
        if HAS_SC:
            bsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new

    if SPLIT:
        base = ws_ptr + (row * num_splits + split) * 4
        tl.store(base + 0, m)
        tl.store(base + 1, s)
        tl.store(base + 2, a)
        tl.store(base + 3, bsum)
    else:
        y = tl.where(in_range, label, 0)
        zy = tl.load(row_ptr + y, mask=in_range & valid, other=0.0).to(tl.float32)
        _finalize_rows(row, row >= 0, m, s, a, bsum, zy * inv_t, valid, in_range, log_v, inv_v,
                       lp_ptr, ent_ptr, sc_ptr, lse_ptr, HAS_ENTROPY, HAS_SC)


@triton.jit
def _token_stats_merge_kernel(
    ws_ptr,  # [B * T, num_splits, 4] fp32 in: partial (M, S, A, Bsum) of each vocab chunk
    logits_ptr,  # [B, T, V] in: read only at the label, for z'[y]
    labels_ptr,  # [B * T] int32/int64, contiguous
    lp_ptr,  # [B * T] fp32 out: logprobs
    ent_ptr,  # [B * T] fp32 out: entropy (a dummy unless HAS_ENTROPY)
    sc_ptr,  # [B * T] fp32 out: self-certainty (a dummy unless HAS_SC)
    lse_ptr,  # [B * T] fp32 out: logsumexp(z')
    T, V, stride_b, stride_t,
    inv_t, log_v, inv_v,
    ignore_index, num_splits,
    BLOCK_S: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    k = tl.arange(0, BLOCK_S)
    kmask = k < num_splits
    base = ws_ptr + row * num_splits * 4 + k * 4
    # absent lanes read as an empty chunk (M = -inf, S = A = Bsum = 0), which the merge ignores
    m_k = tl.load(base + 0, mask=kmask, other=float("-inf"))
    s_k = tl.load(base + 1, mask=kmask, other=0.0)
    a_k = tl.load(base + 2, mask=kmask, other=0.0)
    b_k = tl.load(base + 3, mask=kmask, other=0.0)
    m = tl.max(m_k, axis=0)
    _, c_k, shift_k = _rescale_base(m_k, m)
    s = tl.sum(c_k * s_k, axis=0)
    a = tl.sum(c_k * (a_k + s_k * shift_k), axis=0)
    bsum = tl.sum(b_k, axis=0)

    y = tl.where(in_range, label, 0)
    zy = tl.load(row_ptr + y, mask=in_range & valid, other=0.0).to(tl.float32)
    _finalize_rows(row, row >= 0, m, s, a, bsum, zy * inv_t, valid, in_range, log_v, inv_v,
                   lp_ptr, ent_ptr, sc_ptr, lse_ptr, HAS_ENTROPY, HAS_SC)


@triton.jit
def _token_stats_bwd_kernel(
    grad_ptr,  # [B, T, V] out, logits' dtype, unit stride along V; may be logits_ptr itself (in place)
    logits_ptr,  # [B, T, V] in, unit stride along V
    labels_ptr,  # [B * T] int32/int64, contiguous
    g_lp_ptr,  # [B * T] fp32 upstream d/d logprobs (a dummy unless HAS_GLP)
    g_h_ptr,  # [B * T] fp32 upstream d/d entropy (a dummy unless HAS_GH)
    g_sc_ptr,  # [B * T] fp32 upstream d/d self-certainty (a dummy unless HAS_GSC)
    lse_ptr,  # [B * T] fp32 logsumexp(z') from the forward
    ent_ptr,  # [B * T] fp32 entropy from the forward (a dummy unless HAS_GH)
    T, V, stride_b, stride_t, gstride_b, gstride_t,
    inv_t, inv_v,
    ignore_index, tiles_per_split,
    BLOCK_V: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, HAS_GSC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    grow_ptr = grad_ptr + _row_offset(row, T, gstride_b, gstride_t)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    live = valid & in_range

    lse = tl.load(lse_ptr + row)
    g_lp = tl.zeros_like(lse)
    g_h = tl.zeros_like(lse)
    g_sc = tl.zeros_like(lse)
    h = tl.zeros_like(lse)
    if HAS_GLP:
        g_lp = tl.load(g_lp_ptr + row)
    if HAS_GH:
        g_h = tl.load(g_h_ptr + row)
        h = tl.load(ent_ptr + row)
    if HAS_GSC:
        g_sc = tl.load(g_sc_ptr + row)
    # the row-constant parts of dz_j = (g_lp [j == y] - p_j (coef + g_h d_j) - g_sc / V) / T
    coef = g_lp - g_sc + g_h * h
    const = g_sc * inv_v
    # ignored rows get exact zeros, bad labels NaN; neither needs its logits read
    fill = tl.where(valid, tl.where(in_range, 0.0, float("nan")), 0.0)

    n_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    cols0 = tl.arange(0, BLOCK_V)
    v_read = tl.where(live, V, 0)  # ignored / bad-label rows: store without loading
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + cols0
        mask = cols < V
        # read before the store below: in place, this program is the only one touching these elements.
        # Lanes not read hold -inf (p = 0), so they compute a finite value that is then dropped or replaced.
        z = tl.load(row_ptr + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_t
        d = z - lse
        p = tl.exp(d)
        inner = coef
        if HAS_GH:
            # p = 0 for masked vocab, where d = -inf: clamp so p * d is 0, not NaN (NaN logits stay NaN)
            d_c = tl.where(d < -200.0, -200.0, d)
            inner = coef + g_h * d_c
        g = tl.where(cols == label, g_lp, 0.0) - p * inner - const
        g = tl.where(live, g * inv_t, fill)
        tl.store(grow_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------------- launchers
def _block_v(V: int, itemsize: int, device: torch.device, block_v: int | None) -> int:
    if block_v is not None:
        if block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v}")
        return block_v
    # GPU: 16-32 KiB of logits per tile keeps enough loads in flight per SM to stream at bandwidth; the
    # interpreter runs numpy per tile, where smaller tiles keep tests cheap and loops exercised
    cap = 1024 if device.type != "cuda" else (8192 if itemsize <= 2 else 4096)
    return max(16, min(triton.next_power_of_2(V), cap))


def _num_warps(block_v: int) -> int:
    # 16-32 elements per thread at the largest tiles (enough loads in flight), fewer warps for short rows
    return max(1, min(8, block_v // 512))


def _check_rows3d(name: str, t: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B, T, V], got shape {tuple(t.shape)}")
    if t.stride(2) != 1 and t.shape[2] > 1:
        raise ValueError(f"{name} must have unit stride along V, got strides {t.stride()}")


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    _check_rows3d("logits", logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"triton token_stats takes float32 / bfloat16 / float16 logits, got {logits.dtype}")
    if labels.shape != logits.shape[:2] or not labels.is_contiguous():
        raise ValueError(f"labels must be contiguous {tuple(logits.shape[:2])}, got {tuple(labels.shape)} "
                         f"with strides {labels.stride()}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device}, logits on {logits.device}")


def token_stats_fwd_triton(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, entropy: bool,
                           self_certainty: bool, *, num_splits: int | None = None, block_v: int | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, T, V], labels [B, T] -> (logprobs, entropy or [0], self_certainty or [0], lse), float32.

    `num_splits` / `block_v` override the heuristics (vocab chunks per row, tile width).
    """
    _check_logits_labels(logits, labels)
    B, T, V = logits.shape
    rows = B * T
    dev = logits.device
    lp = torch.empty((B, T), dtype=torch.float32, device=dev)
    lse = torch.empty((B, T), dtype=torch.float32, device=dev)
    ent = torch.empty((B, T) if entropy else (0,), dtype=torch.float32, device=dev)
    sc = torch.empty((B, T) if self_certainty else (0,), dtype=torch.float32, device=dev)
    if rows == 0:
        return lp, ent, sc, lse

    block = _block_v(V, logits.element_size(), dev, block_v)
    splits, tiles_per_split = vocab_splits(rows, max(1, triton.cdiv(V, block)), dev, num_splits)
    inv_t = 1.0 / float(temperature)
    log_v = math.log(V) if V > 0 else 0.0
    inv_v = 1.0 / V if V > 0 else 0.0
    ent_arg = ent if entropy else lse  # never written when the flag is off
    sc_arg = sc if self_certainty else lse
    lab = labels.view(-1)
    common = dict(HAS_ENTROPY=bool(entropy), HAS_SC=bool(self_certainty))
    if splits == 1:
        _token_stats_fwd_kernel[(rows, 1)](
            logits, lab, lp, ent_arg, sc_arg, lse, lse,
            T, V, logits.stride(0), logits.stride(1), inv_t, log_v, inv_v, ignore_index, 1, tiles_per_split,
            BLOCK_V=block, SPLIT=False, num_warps=_num_warps(block), **common)
        return lp, ent, sc, lse

    ws = torch.empty((rows, splits, 4), dtype=torch.float32, device=dev)
    _token_stats_fwd_kernel[(rows, splits)](
        logits, lab, lp, ent_arg, sc_arg, lse, ws,
        T, V, logits.stride(0), logits.stride(1), inv_t, log_v, inv_v, ignore_index, splits, tiles_per_split,
        BLOCK_V=block, SPLIT=True, num_warps=_num_warps(block), **common)
    _token_stats_merge_kernel[(rows,)](
        ws, logits, lab, lp, ent_arg, sc_arg, lse,
        T, V, logits.stride(0), logits.stride(1), inv_t, log_v, inv_v, ignore_index, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=1, **common)
    return lp, ent, sc, lse


def token_stats_bwd_triton(grad_logits: Tensor, grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                           grad_self_certainty: Tensor | None, logits: Tensor, labels: Tensor, lse: Tensor,
                           entropy: Tensor | None, temperature: float, ignore_index: int, *,
                           num_splits: int | None = None, block_v: int | None = None) -> None:
    """Writes d loss / d logits into grad_logits ([B, T, V], logits' dtype; may be `logits` itself)."""
    _check_logits_labels(logits, labels)
    _check_rows3d("grad_logits", grad_logits)
    if grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype or grad_logits.device != logits.device:
        raise ValueError(f"grad_logits must match logits ({logits.dtype} {tuple(logits.shape)}), got "
                         f"{grad_logits.dtype} {tuple(grad_logits.shape)} on {grad_logits.device}")
    B, T, V = logits.shape
    rows = B * T
    dev = logits.device
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    for name, t in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy),
                    ("grad_self_certainty", grad_self_certainty), ("lse", lse),
                    ("entropy", entropy if grad_entropy is not None else None)):
        check_row_vector(name, t, (B, T), dev)
    if rows == 0 or V == 0:
        return

    block = _block_v(V, logits.element_size(), dev, block_v)
    splits, tiles_per_split = vocab_splits(rows, max(1, triton.cdiv(V, block)), dev, num_splits)
    dummy = lse
    _token_stats_bwd_kernel[(rows, splits)](
        grad_logits, logits, labels.view(-1),
        dummy if grad_logprobs is None else grad_logprobs,
        dummy if grad_entropy is None else grad_entropy,
        dummy if grad_self_certainty is None else grad_self_certainty,
        lse, dummy if grad_entropy is None else entropy,
        T, V, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
        1.0 / float(temperature), 1.0 / V, ignore_index, tiles_per_split,
        BLOCK_V=block, HAS_GLP=grad_logprobs is not None, HAS_GH=grad_entropy is not None,
        HAS_GSC=grad_self_certainty is not None, num_warps=_num_warps(block))
