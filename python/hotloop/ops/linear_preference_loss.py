"""DPO-family losses straight from the last hidden states: both sides' sequence log-probs from hidden @ lm_head,
the pair loss, and the gradients of hidden / weight / bias, without the [N, V] logits (SPEC §2 + §6).

A pair's loss needs its two whole-sequence sums before any of its tokens' gradients is known. Every kind here is a
mean of per-pair terms (plus an NLL term linear in the chosen sums), so a pair's gradient needs only that pair:
  CPU  one pass over chunks of whole pairs (hotloop.cpu.linear_loss): a chunk's logits stay in the buffer while its
       sums, its pairs' loss gradient and its logits' gradient are computed; three matmuls per vocabulary tile.
       A pair too long for the buffer falls back to the two-pass scheme.
  two-pass (GPU, long pairs)  the fused linear log-prob kernels' forward over every token (no gradient kept), the
       per-sequence sums, hotloop.preference_loss on them, each token's gradient (its sequence's, times its mask),
       then the kernels' backward with it (the logits recomputed).
d_hidden, d_weight, d_bias are made in the forward and attached to the loss (hotloop::attach_grads).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal.dispatch import resolve_backend
from hotloop._internal.checks import check_label_range, check_positive, labels_checked_on_host
from hotloop._internal.attach_grads import loss_with_grads
from hotloop.ops.linear_token_stats import check_linear_args
from hotloop._internal.loss_checks import MASK_DTYPES, check_choice, check_like, check_real, check_token_layout, float_mask
from hotloop.ops.preference_loss import preference_loss
from hotloop.reference.preference_loss import LENGTH_NORMALISED
from hotloop._internal.row_layout import RowLayout

_OP = "linear_preference_loss"
_BACKENDS = ("reference", "cpu", "triton")
LAYOUTS = ("concatenated", "interleaved")
IGNORE = -100


def _sides(x: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """[2P] per-sequence values -> (chosen [P], rejected [P])."""
    if layout == "interleaved":
        return x[0::2], x[1::2]
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _pair_objective(s: Tensor, lengths: Tensor, layout: str, average: bool, sft_weight: float, kw: dict
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sequence log-prob sums s [2P] and token counts [2P] -> (loss [], metrics), differentiable in s.

    ORPO's NLL (and the SFT term) is TRL's: the token mean over all chosen tokens, -Σ s_w / Σ len_w, handed to
    preference_loss as per-pair values whose mean is exactly that."""
    s_w, s_l = _sides(s, layout)
    n_w, n_l = _sides(lengths, layout)
    nll_mean = -s_w.sum() / n_w.sum().clamp(min=1)
    chosen_nll = None if kw["kind"] != "orpo" else -s_w * (s_w.shape[0] / n_w.sum().clamp(min=1))
    if average and kw["kind"] not in LENGTH_NORMALISED:  # Liger's average_log_prob: means stand in for sums
        s_w, s_l = s_w / n_w.clamp(min=1), s_l / n_l.clamp(min=1)
    loss, metrics = preference_loss(s_w, s_l, chosen_lengths=n_w, rejected_lengths=n_l, chosen_nll=chosen_nll,
                                    **kw)
    if sft_weight != 0.0:  # RPO / TRL's rpo_alpha, Liger's compute_nll_loss
        loss = loss + sft_weight * nll_mean
        metrics = {**metrics, "nll_loss": nll_mean.detach()}
    return loss, metrics


def linear_preference_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, *,
                           ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                           layout: str = "concatenated", kind: str = "sigmoid", beta: float = 0.1,
                           label_smoothing: float = 0.0, gamma: float = 0.5, consistency: Tensor | None = None,
                           sft_weight: float = 0.0, average_log_prob: bool = False, bias: Tensor | None = None,
                           temperature: float = 1.0, cu_seqlens: Tensor | None = None
                           ) -> tuple[Tensor, dict[str, Tensor]]:
    """hotloop.preference_loss on sequence log-probs computed inside from hidden @ weight.T (+ bias).

    Args:
        hidden: [2P, T, H] (or packed [N, H] with cu_seqlens over 2P sequences), float32 / bfloat16 / float16.
        weight: [V, H] lm_head weight, hidden's dtype;  bias: optional [V].
        labels, mask: [2P, T] (or [N]); labels int, mask bool / 0-1 ints / float weights; masked positions (and
            labels of -100) are skipped, so prompts and padding may hold anything.
        layout: "concatenated" (TRL's concatenated_forward: chosen rows first, then rejected) or "interleaved"
            (chosen, rejected, chosen, ...).
        ref_chosen_logps, ref_rejected_logps: [P] reference sequence log-prob sums (reference-based kinds).
        kind, beta, label_smoothing, gamma, consistency: as `hotloop.preference_loss` (lengths come from the mask;
            ORPO's NLL is TRL's: the token mean over all chosen tokens).
        sft_weight: weight of an added NLL term, the token mean over all chosen tokens (RPO, TRL's rpo_alpha).
        average_log_prob: per-token mean log-probs instead of sums for every kind (Liger's average_log_prob; the
            reference log-probs must then be means too). ipo / simpo / orpo always use means.
        temperature: the logits are divided by it.

    Returns:
        (loss [] float32, metrics of preference_loss (+ nll_loss with sft_weight)); gradients flow to hidden, weight
        and bias, one backward per call. Never allocates [N, V].
    """
    check_linear_args(hidden, weight, bias, labels, op=_OP)
    check_token_layout(_OP, labels.new_empty(labels.shape, dtype=torch.float32), cu_seqlens, "labels")
    check_like(_OP, "mask", mask, labels, dtypes=MASK_DTYPES)
    check_choice(_OP, "layout", layout, LAYOUTS)
    rows = labels.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if rows % 2:
        raise ValueError(f"hotloop.{_OP}: chosen and rejected sequences come in pairs: the batch must hold an even "
                         f"number of sequences, got {rows}")
    temperature = check_positive(_OP, "temperature", temperature)
    sft_weight = check_real(_OP, "sft_weight", sft_weight, low=0.0)
    kw = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, kind=kind, beta=beta,
              label_smoothing=label_smoothing, gamma=gamma, consistency=consistency)
    backend = resolve_backend(_OP, hidden.device, _BACKENDS)
    mask = torch.where(labels == IGNORE, 0, mask)
    labels_eff = torch.where(mask != 0, labels, IGNORE)
    if labels_checked_on_host(labels.device):
        check_label_range(_OP, labels_eff, weight.shape[0], IGNORE)
    layout_rows = RowLayout(labels.shape, cu_seqlens, labels.device)
    if backend == "reference":  # the composition of the unfused ops, autograd throughout
        from hotloop.ops.sequence_logprobs import linear_sequence_logprobs

        s = linear_sequence_logprobs(hidden, weight, labels_eff, mask, bias=bias, temperature=temperature,
                                     cu_seqlens=cu_seqlens)
        lengths = layout_rows.row_sum(float_mask(_OP, mask, s.dtype))
        return _pair_objective(s, lengths, layout, average_log_prob, sft_weight, kw)

    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    h2 = h2 if h2.stride(1) == 1 else h2.contiguous()
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    flat_labels = labels_eff.reshape(-1).contiguous()
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with torch.no_grad():
        m = float_mask(_OP, mask, torch.float64 if hidden.dtype == torch.float64 else torch.float32).reshape(-1)
        lengths = layout_rows.row_sum(m)
        chunks = _pair_chunks(layout_rows, flat_labels, layout, *w.shape, h2.element_size()) \
            if backend == "cpu" else None
        if chunks is not None:
            loss, metrics, d_h, d_w, d_b = _one_pass(h2.detach(), w.detach(), None if b is None else b.detach(),
                                                     flat_labels, temperature, m, lengths, layout_rows, chunks,
                                                     layout, average_log_prob, sft_weight, kw, need)
        else:
            loss, metrics, d_h, d_w, d_b = _two_pass(h2.detach(), w.detach(), None if b is None else b.detach(),
                                                     flat_labels, temperature, m, lengths, layout_rows, layout,
                                                     average_log_prob, sft_weight, kw, need, backend)
    loss = loss_with_grads(loss, [(hidden, d_h.view(hidden.shape) if need[0] else d_h), (weight, d_w), (bias, d_b)])
    return loss, metrics


def _objective_grad(s: Tensor, lengths: Tensor, layout: str, average: bool, sft_weight: float, kw: dict) -> Tensor:
    """d loss / d s [2P] of _pair_objective at the per-sequence sums s."""
    s = s.detach().requires_grad_()
    with torch.enable_grad():
        loss, _ = _pair_objective(s, lengths, layout, average, sft_weight, kw)
        return torch.autograd.grad(loss, s)[0]


def _two_pass(h2, w, b, labels, temperature, m, lengths, layout_rows, layout, average, sft_weight, kw, need,
              backend):
    lp, _, _, lse = torch.ops.hotloop.linear_token_stats_fwd(h2, w, b, labels, temperature, IGNORE, False, False,
                                                             0.0, backend)
    s = layout_rows.row_sum(lp * m)
    loss, metrics = _pair_objective(s, lengths, layout, average, sft_weight, kw)
    g_tok = layout_rows.per_token(_objective_grad(s, lengths, layout, average, sft_weight, kw)) * m
    d_h, d_w, d_b = torch.ops.hotloop.linear_token_stats_bwd(
        g_tok, None, None, h2, w, b, labels, lse, None, temperature, IGNORE, need[0], need[1],
        need[2] and b is not None, 0.0, backend)
    return loss, metrics, d_h, d_w, d_b


def _pair_of_row(rows: Tensor, n_rows: int, layout: str) -> Tensor:
    return rows // 2 if layout == "interleaved" else rows % (n_rows // 2)


def _pair_chunks(layout_rows: RowLayout, labels: Tensor, layout: str, V: int, H: int, elt: int
                 ) -> list[Tensor] | None:
    """The kept token positions grouped into chunks of whole pairs that fit the one-pass buffer (each chunk's
    positions sorted by pair), or None when a single pair does not fit. Chunks are as long as the longest pair
    when it has more tokens than the preferred chunk: one pass with a longer chunk beats the two-pass fallback."""
    from hotloop.cpu.linear_loss import chunk_rows, max_chunk_rows

    kept = (labels != IGNORE).nonzero().squeeze(1)
    pair = _pair_of_row(layout_rows.row_of(kept), layout_rows.B, layout)
    counts = torch.bincount(pair, minlength=layout_rows.B // 2).tolist()  # one host read: the split is on host
    longest = max(counts, default=0)
    if longest > max_chunk_rows(V, elt):
        return None
    budget = max(chunk_rows(V, H, elt), longest)
    order = kept.index_select(0, torch.argsort(pair, stable=True))
    chunks, start, size = [], 0, 0
    for c in counts:
        if size + c > budget:
            chunks.append(order[start:start + size])
            start, size = start + size, 0
        size += c
    if size:
        chunks.append(order[start:start + size])
    return chunks


def _one_pass(h2, w, b, labels, temperature, m, lengths, layout_rows, chunks, layout, average, sft_weight, kw,
              need):
    """Chunks of whole pairs through hotloop.cpu.linear_loss: each chunk's sequence sums are set into a vector
    whose other entries are placeholders (a mean log-prob of -1 per token: finite for every kind), the objective's
    gradient there is exact for the chunk's pairs (the objective is separable by pair, see the module note)."""
    from hotloop.cpu.linear_loss import one_pass_linear_loss

    n_rows = layout_rows.B
    placeholder = -lengths.clamp(min=1)
    s_total = torch.zeros_like(lengths)
    row_pair = _pair_of_row(torch.arange(n_rows, device=lengths.device), n_rows, layout)

    def chunk_grads(pos: Tensor, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, None]:
        rows, m_c = layout_rows.row_of(pos), m.index_select(0, pos)
        # index_add_ sums each row's tokens one after another: in float32 a sum near -2e3 would drift by ~1e-3
        # (4.8e-5 relative error in the gradients, measured), so the sums are formed in float64
        s_c = lengths.new_zeros(n_rows, dtype=torch.float64).index_add_(0, rows, (lp * m_c).double())
        s_c = s_c.to(lengths.dtype)
        s_total.add_(s_c)
        in_chunk = torch.zeros(n_rows // 2, dtype=torch.bool, device=lengths.device)
        in_chunk[_pair_of_row(rows, n_rows, layout)] = True
        s = torch.where(in_chunk[row_pair], s_c, placeholder)  # both rows of each pair, tokens or not
        g_seq = _objective_grad(s, lengths, layout, average, sft_weight, kw)
        return g_seq.index_select(0, rows) * m_c, None

    d_h, d_w, d_b = one_pass_linear_loss(h2, w, b, labels, temperature, chunks, chunk_grads, False, need[0],
                                         need[1], need[2] and b is not None)
    loss, metrics = _pair_objective(s_total, lengths, layout, average, sft_weight, kw)
    return loss.detach(), metrics, d_h, d_w, d_b
