"""Per-token log-probs, entropy and self-certainty straight from hidden states × lm_head
(docs/linear_token_stats.md).

The [N, V] logits and their gradient are never held: the CPU backend goes through cache-sized blocks of them
(hotloop.cpu.tile_engine), the Triton backend through on-chip tiles (triton_kernels/linear_token_stats.py).

Layers: public linear_token_stats / linear_token_logprobs -> custom ops hotloop::linear_token_stats_fwd / _bwd
(fake kernels + autograd, traced by torch.compile) -> dispatch.kernel(op, device): reference.linear_token_stats,
cpu.linear_token_stats, triton_kernels.linear_token_stats. Kernel contract: hidden [N, H] with
unit stride along H, weight [V, H] and bias [V] contiguous, labels [N] contiguous; outputs [N] float32 (float64
for float64 input); backward returns (d_hidden, d_weight, d_bias), each [0] when not asked for.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hotloop._internal import dispatch
from hotloop._internal.checks import (FLOAT_DTYPES, LABEL_DTYPES, check_index, check_label_range, check_positive,
                             check_same_device, check_tensor, labels_checked_on_host)
from hotloop.ops.token_stats import TokenStats

_OP = "linear_token_stats"


for _op in ("linear_token_stats_fwd", "linear_token_stats_bwd"):
    dispatch.register(_op, "reference", f"hotloop.reference.linear_token_stats:{_op}_ref")
    dispatch.register(_op, "cpu", f"hotloop.cpu.linear_token_stats:{_op}_cpu")
    dispatch.register(_op, "triton", f"hotloop.triton_kernels.linear_token_stats:{_op}_triton")


def _out_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("hotloop::linear_token_stats_fwd", mutates_args=())
def linear_token_stats_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                           ignore_index: int, entropy: bool, self_certainty: bool, grad_filter_eps: float
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (logprobs [N], entropy [N] | [0], self_certainty [N] | [0], lse [N]); lse is kept for the backward,
    grad_filter_eps is the backward's (see linear_token_stats)."""
    if hidden.shape[0] == 0:
        dt = _out_dtype(hidden)
        e = hidden.new_empty(0, dtype=dt)
        return e, e.clone(), e.clone(), e.clone()
    return dispatch.kernel("linear_token_stats_fwd", hidden.device)(hidden, weight, bias, labels, temperature,
                                                                     ignore_index, entropy, self_certainty)


@linear_token_stats_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, entropy, self_certainty, grad_filter_eps):
    N, dt = hidden.shape[0], _out_dtype(hidden)
    return (hidden.new_empty(N, dtype=dt), hidden.new_empty(N if entropy else 0, dtype=dt),
            hidden.new_empty(N if self_certainty else 0, dtype=dt), hidden.new_empty(N, dtype=dt))


@torch.library.custom_op("hotloop::linear_token_stats_bwd", mutates_args=())
def linear_token_stats_bwd(grad_logprobs: Tensor | None, grad_entropy: Tensor | None,
                           grad_self_certainty: Tensor | None, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                           labels: Tensor, lse: Tensor, entropy: Tensor | None, temperature: float, ignore_index: int,
                           need_hidden: bool, need_weight: bool, need_bias: bool, grad_filter_eps: float
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_hidden [N, H] | [0], d_weight [V, H] | [0], d_bias [V] | [0])."""
    if hidden.shape[0] == 0:
        d_w = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
        d_b = torch.zeros_like(bias) if need_bias else hidden.new_empty(0)
        return hidden.new_empty(hidden.shape if need_hidden else 0), d_w, d_b
    dt = _out_dtype(hidden)
    grads = [None if g is None else g.to(dt).contiguous() for g in (grad_logprobs, grad_entropy, grad_self_certainty)]
    return dispatch.kernel("linear_token_stats_bwd", hidden.device)(
        *grads, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, need_hidden, need_weight,
        need_bias, filter_eps=grad_filter_eps)


@linear_token_stats_bwd.register_fake
def _(grad_logprobs, grad_entropy, grad_self_certainty, hidden, weight, bias, labels, lse, entropy, temperature,
      ignore_index, need_hidden, need_weight, need_bias, grad_filter_eps):
    return (hidden.new_empty(hidden.shape if need_hidden else 0), weight.new_empty(weight.shape if need_weight else 0),
            hidden.new_empty(bias.shape if need_bias else 0, dtype=bias.dtype if need_bias else hidden.dtype))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, entropy, self_certainty, filter_eps = inputs
    _, ent, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if entropy else None)
    ctx.cfg = (temperature, ignore_index, entropy, self_certainty, filter_eps)


def _backward(ctx, g_logprobs, g_entropy, g_self_certainty, g_lse):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    temperature, ignore_index, entropy, self_certainty, filter_eps = ctx.cfg
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    d_h, d_w, d_b = torch.ops.hotloop.linear_token_stats_bwd(
        g_logprobs, g_entropy if entropy else None, g_self_certainty if self_certainty else None, hidden, weight,
        bias, labels, lse, ent, temperature, ignore_index, need_h, need_w, need_b and bias is not None, filter_eps)
    return (d_h if need_h else None, d_w if need_w else None, d_b if (need_b and bias is not None) else None,
            None, None, None, None, None, None)


linear_token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_linear_args(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, op: str = _OP) -> None:
    """hidden [..., H] float, weight [V, H] and bias [V] of hidden's dtype, labels [...] int; one device."""
    check_tensor(op, "hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES)
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    H = hidden.shape[-1]
    if H == 0:
        raise ValueError(f"hotloop.{op}: `hidden` has an empty hidden dim (shape {tuple(hidden.shape)}); H >= 1")
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"hotloop.{op}: `weight` must be [V, H] with V >= 1 and H = hidden.shape[-1] = {H}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hotloop.{op}: `weight` must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(hidden.dtype,))
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"hotloop.{op}: `bias` must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"hotloop.{op}: `labels` must have the leading shape of `hidden` "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    check_same_device(op, hidden=hidden, weight=weight, bias=bias, labels=labels)
    if hidden.dtype == torch.float64 and hidden.device.type != "cpu":
        raise TypeError(f"hotloop.{op}: float64 `hidden` is supported on CPU only")


def linear_token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100, entropy: bool = True,
                       self_certainty: bool = False, grad_filter_eps: float = 0.0) -> TokenStats:
    """token_stats of the logits hidden @ weight.T (+ bias), without ever holding those [N, V] logits.

    Args:
        hidden: [..., H] last hidden states, float32 / bfloat16 / float16 (float64 on CPU).
        weight: [V, H] lm_head weight (tied embeddings too), hidden's dtype.
        labels: [...] int32 / int64, hidden's leading shape; `ignore_index` marks positions to skip.
        bias: optional [V] lm_head bias, hidden's dtype.
        temperature, ignore_index, entropy, self_certainty: as in `hotloop.token_stats`.
        grad_filter_eps: 0 (default) = exact backward. > 0: cut-cross-entropy's gradient filtering, an
            approximation: vocabulary entries whose softmax probability is below it for every token of a block
            (and that are no token's label) skip the d_hidden / d_weight matmuls (CPU: columns over a block of
            tokens; Triton: tiles). Each dropped term is below eps times the token's incoming gradient.
            Pays off when the softmax is peaked (trained models), not on flat ones; the error it adds is measured
            in the tests and documented in the README.

    Returns:
        TokenStats(logprobs, entropy, self_certainty), each [...] float32 (float64 for float64 input) or None.
        Differentiable w.r.t. hidden, weight and bias; the backward recomputes blocks of logits and never
        allocates [N, V]. Gradients of a weight shared across calls accumulate as usual.
    """
    check_linear_args(hidden, weight, bias, labels)
    temperature = check_positive(_OP, "temperature", temperature)
    ignore_index = check_index(_OP, "ignore_index", ignore_index)
    if grad_filter_eps != 0.0:
        grad_filter_eps = check_positive(_OP, "grad_filter_eps", grad_filter_eps)
    dispatch.backend("linear_token_stats_fwd", hidden.device)  # a bad HOTLOOP_BACKEND fails here, before any work
    if labels_checked_on_host(labels.device):
        check_label_range(_OP, labels, weight.shape[0], ignore_index)
    shape, H = labels.shape, hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    lp, ent, sc, _ = torch.ops.hotloop.linear_token_stats_fwd(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), labels.reshape(-1).contiguous(),
        temperature, ignore_index, entropy, self_certainty, float(grad_filter_eps))
    return TokenStats(lp.view(shape), ent.view(shape) if entropy else None,
                      sc.view(shape) if self_certainty else None)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[label]: [..., H], [V, H], [...] -> [...] float32."""
    return linear_token_stats(hidden, weight, labels, bias=bias, temperature=temperature,
                              ignore_index=ignore_index, entropy=False).logprobs
