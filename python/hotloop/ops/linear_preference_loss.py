"""DPO-family losses straight from the last hidden states: both sides' sequence log-probs from hidden @ lm_head,
the pair loss, and the gradients of hidden / weight / bias, without the [N, V] logits (docs/preference_loss.md,
"fused linear form").

A pair's loss needs its two whole-sequence sums before any of its tokens' gradients is known. Every kind here is a
mean of per-pair terms (plus an NLL term linear in the chosen sums), so a pair's gradient needs only that pair:
the loss is a fused_linear strategy (PairLoss) whose chunks are groups of whole pairs.
  CPU  one pass over chunks of whole pairs (the tile engine): a chunk's logits stay in the buffer while its sums,
       its pairs' loss gradient and its logits' gradient are computed; three matmuls per vocabulary tile. A pair
       too long for the buffer falls back to the two-pass scheme.
  two-pass (GPU, long pairs)  the fused linear log-prob kernels' forward over every token, the per-sequence sums,
       hotloop.preference_loss on them, each token's gradient (its sequence's, times its mask), then the
       kernels' backward with it (the logits recomputed).
The whole loss is one custom op (hotloop::linear_preference_loss_fwd, opaque to torch.compile: it splits pairs on
the host and differentiates the pair objective with autograd); d_hidden, d_weight, d_bias are attached to the
loss (hotloop::attach_grads).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.attach_grads import loss_with_grads
from hotloop._internal.checks import check_label_range, check_positive, labels_checked_on_host
from hotloop._internal.loss_checks import MASK_DTYPES, check_choice, check_like, check_real, check_token_layout, \
    float_mask
from hotloop._internal.row_layout import RowLayout
from hotloop.contracts import IGNORE_INDEX, LENGTH_NORMALISED, PAIR_LAYOUTS, PREFERENCE_METRICS
from hotloop.contracts import PREFERENCE_KINDS as KINDS
from hotloop.cpu.tile_engine import chunk_rows, max_chunk_rows
from hotloop.ops import fused_linear
from hotloop.ops.linear_token_stats import check_linear_args
from hotloop.ops.preference_loss import preference_value_and_grads

_OP = "linear_preference_loss"
LAYOUTS = PAIR_LAYOUTS


def _sides(x: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """[2P] per-sequence values -> (chosen [P], rejected [P])."""
    if layout == "interleaved":
        return x[0::2], x[1::2]
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _pair_objective(s: Tensor, lengths: Tensor, layout: str, average: bool, sft_weight: float, kw: dict
                    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Per-sequence log-prob sums s [2P] and token counts [2P] -> (loss [], metrics, d loss / d s [2P]).

    ORPO's NLL (and the SFT term) is TRL's: the token mean over all chosen tokens, -Σ s_w / Σ len_w, handed to
    preference_loss as per-pair values whose mean is exactly that. The gradient is chained by hand through the
    per-pair kernel's (this runs inside a custom op, below autograd)."""
    s_w, s_l = _sides(s, layout)
    n_w, n_l = _sides(lengths, layout)
    total_w = n_w.sum().clamp(min=1)
    nll_mean = -s_w.sum() / total_w
    chosen_nll = None if kw["kind"] != "orpo" else -s_w * (s_w.shape[0] / total_w)
    averaged = average and kw["kind"] not in LENGTH_NORMALISED  # Liger's average_log_prob: means stand in for sums
    if averaged:
        s_w, s_l = s_w / n_w.clamp(min=1), s_l / n_l.clamp(min=1)
    loss, metrics, g_w, g_l, g_nll = preference_value_and_grads(
        s_w, s_l, kw["ref_chosen_logps"], kw["ref_rejected_logps"], kw["kind"], kw["beta"], kw["label_smoothing"],
        kw["gamma"], kw["consistency"], n_w, n_l, chosen_nll)
    if averaged:
        g_w, g_l = g_w / n_w.clamp(min=1), g_l / n_l.clamp(min=1)
    if g_nll is not None:
        g_w = g_w - g_nll * (g_nll.shape[0] / total_w)
    if sft_weight != 0.0:  # RPO / TRL's rpo_alpha, Liger's compute_nll_loss
        loss = loss + sft_weight * nll_mean
        g_w = g_w - sft_weight / total_w
        metrics = {**metrics, "nll_loss": nll_mean}
    grad = torch.empty_like(s)
    chosen, rejected = _sides(grad, layout)
    chosen.copy_(g_w)
    rejected.copy_(g_l)
    return loss, metrics, grad


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
    check_choice(_OP, "kind", kind, KINDS)
    # types here (a custom op's schema would reject them less clearly); preference_loss checks the ranges
    beta, label_smoothing, gamma = (check_real(_OP, name, v) for name, v in
                                    (("beta", beta), ("label_smoothing", label_smoothing), ("gamma", gamma)))
    average_log_prob = bool(average_log_prob)
    dispatch.backend("fused_linear_loss", hidden.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    mask = torch.where(labels == IGNORE_INDEX, 0, mask)
    labels_eff = torch.where(mask != 0, labels, IGNORE_INDEX)
    if labels_checked_on_host(labels.device):
        check_label_range(_OP, labels_eff, weight.shape[0], IGNORE_INDEX)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2 = h2 if h2.stride(1) == 1 else h2.contiguous()
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    value, metrics, d_h, d_w, d_b = torch.ops.hotloop.linear_preference_loss_fwd(
        h2.detach(), weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
        labels_eff, mask, detached(ref_chosen_logps), detached(ref_rejected_logps), detached(consistency),
        cu_seqlens, layout, kind, beta, label_smoothing, gamma, sft_weight, average_log_prob, temperature, *need)
    loss = loss_with_grads(value, [(hidden, d_h.view(hidden.shape) if need[0] else d_h), (weight, d_w), (bias, d_b)])
    return loss, dict(zip(_metric_names(sft_weight), metrics.unbind()))


def _metric_names(sft_weight: float) -> tuple[str, ...]:
    return PREFERENCE_METRICS + (("nll_loss",) if sft_weight != 0.0 else ())


# ----------------------------------------------------------------------------------------------- the custom op
@torch.library.custom_op("hotloop::linear_preference_loss_fwd", mutates_args=())
def linear_preference_loss_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, mask: Tensor,
                               ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
                               consistency: Tensor | None, cu_seqlens: Tensor | None, layout: str, kind: str,
                               beta: float, label_smoothing: float, gamma: float, sft_weight: float,
                               average_log_prob: bool, temperature: float, need_hidden: bool, need_weight: bool,
                               need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H] (unit stride along H), weight [V, H], labels / mask [2P, T] (or packed [N]; labels
    IGNORE_INDEX wherever the mask is 0), the options as linear_preference_loss -> (loss [], metrics
    [6 | 7] (PREFERENCE_METRICS, nll_loss with sft_weight), d_hidden [N, H] | [0], d_weight | [0], d_bias | [0])."""
    kw = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, kind=kind, beta=beta,
              label_smoothing=label_smoothing, gamma=gamma, consistency=consistency)
    rows = RowLayout(labels.shape, cu_seqlens, labels.device)
    m = float_mask(_OP, mask, torch.float64 if hidden.dtype == torch.float64 else torch.float32).reshape(-1)
    loss = PairLoss(rows, m, layout, average_log_prob, sft_weight, kw)
    d_h, d_w, d_b = fused_linear.run(hidden, weight, bias, labels.reshape(-1), temperature, loss, need_hidden,
                                     need_weight, need_bias, 0.0)
    value, metrics, _ = _pair_objective(loss.sums, loss.lengths, layout, average_log_prob, sft_weight, kw)
    return value, torch.stack([metrics[k] for k in _metric_names(sft_weight)]), d_h, d_w, d_b


@linear_preference_loss_fwd.register_fake
def _(hidden, weight, bias, labels, mask, ref_chosen_logps, ref_rejected_logps, consistency, cu_seqlens, layout,
      kind, beta, label_smoothing, gamma, sft_weight, average_log_prob, temperature, need_hidden, need_weight,
      need_bias):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(len(_metric_names(sft_weight)), dtype=acc),
            hidden.new_empty(hidden.shape if need_hidden else 0), weight.new_empty(weight.shape if need_weight else 0),
            hidden.new_empty(bias.shape if need_bias else 0, dtype=bias.dtype if need_bias else hidden.dtype))


# ------------------------------------------------------------------------------------------ the loss's strategy
def _pair_of_row(rows: Tensor, n_rows: int, layout: str) -> Tensor:
    return rows // 2 if layout == "interleaved" else rows % (n_rows // 2)


class PairLoss:
    """The pair objective as the fused driver's strategy (fused_linear.FusedLoss): the sequence sums of a chunk
    of whole pairs give those pairs' exact gradient, the objective being separable by pair (see the module note).
    `sums` [2P] holds every sequence's log-prob sum once the driver is done."""

    entropy = False

    def __init__(self, rows: RowLayout, m: Tensor, layout: str, average: bool, sft_weight: float, kw: dict):
        self.rows, self.m, self.layout, self.average, self.sft_weight, self.kw = rows, m, layout, average, \
            sft_weight, kw
        self.lengths = rows.row_sum(m)
        self.sums = torch.zeros_like(self.lengths)

    def _grad(self, s: Tensor) -> Tensor:
        return _pair_objective(s, self.lengths, self.layout, self.average, self.sft_weight, self.kw)[2]

    def chunks(self, labels: Tensor, V: int, H: int, elt: int) -> list[Tensor] | None:
        """The kept token positions grouped into chunks of whole pairs that fit the one-pass buffer (each chunk's
        positions sorted by pair), or None when a single pair does not fit. Chunks are as long as the longest pair
        when it has more tokens than the preferred chunk: one pass with a longer chunk beats the two-pass
        fallback."""
        kept = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        pair = _pair_of_row(self.rows.row_of(kept), self.rows.B, self.layout)
        counts = torch.bincount(pair, minlength=self.rows.B // 2).tolist()  # one host read: the split is on host
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

    def chunk_grads(self, pos: Tensor, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, None]:
        """A chunk's sequence sums set into a vector whose other entries are placeholders (a mean log-prob of -1
        per token: finite for every kind); the objective's gradient there is exact for the chunk's pairs."""
        n_rows = self.rows.B
        rows, m_c = self.rows.row_of(pos), self.m.index_select(0, pos)
        # index_add_ sums each row's tokens one after another: in float32 a sum near -2e3 would drift by ~1e-3
        # (4.8e-5 relative error in the gradients, measured), so the sums are formed in float64
        s_c = self.lengths.new_zeros(n_rows, dtype=torch.float64).index_add_(0, rows, (lp * m_c).double())
        s_c = s_c.to(self.lengths.dtype)
        self.sums.add_(s_c)
        in_chunk = torch.zeros(n_rows // 2, dtype=torch.bool, device=self.lengths.device)
        in_chunk[_pair_of_row(rows, n_rows, self.layout)] = True
        row_pair = _pair_of_row(torch.arange(n_rows, device=self.lengths.device), n_rows, self.layout)
        s = torch.where(in_chunk[row_pair], s_c, -self.lengths.clamp(min=1))  # both rows of each pair
        return self._grad(s).index_select(0, rows) * m_c, None

    def token_grads(self, lp: Tensor, ent: Tensor | None) -> tuple[Tensor, None]:
        self.sums = self.rows.row_sum(lp * self.m)
        return self.rows.per_token(self._grad(self.sums)) * self.m, None
