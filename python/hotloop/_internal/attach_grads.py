"""hotloop::attach_grads: a loss value whose gradients were computed in the forward.

Fused losses (policy / NFT losses, and their fused-linear forms) know d loss / d input when they compute the loss,
so they produce both in one pass; this op hands those gradients to autograd: backward multiplies each by the
incoming scalar gradient. A torch.library custom op with a fake kernel, so torch.compile traces through it.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("hotloop::attach_grads", mutates_args=())
def attach_grads(value: Tensor, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
    """-> a copy of `value` [] whose gradient w.r.t. inputs[i] is grads[i] (same shape; its own dtype, e.g. float32
    for a bf16 input, is rounded to the input's after scaling) times the incoming one. One backward only."""
    return value.clone()


@attach_grads.register_fake
def _(value, inputs, grads):
    return torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    # kept on ctx, not saved: backward hands these very tensors to autograd (no copy of a [V, H] weight
    # gradient), so they can serve one backward only
    ctx.grads = list(inputs[2])
    ctx.dtypes = [x.dtype for x in inputs[1]]


def _backward(ctx, grad_out):
    grads = ctx.grads
    if grads is None:
        raise RuntimeError("hotloop: a fused loss's gradients were computed in its forward and are used up by "
                           "the first backward; call the loss again for another backward (retain_graph is "
                           "not supported)")
    ctx.grads = None
    # the incoming scale (a loss scaler's 65536, 1 / accumulation steps) multiplies in float32, then the result
    # is rounded once to the input's dtype; a gradient already in that dtype is scaled in place (no second
    # [V, H] buffer)
    out = [g.mul_(grad_out) if g.dtype == dt else (g * grad_out).to(dt) for g, dt in zip(grads, ctx.dtypes)]
    return None, out, [None] * len(grads)


attach_grads.register_autograd(_backward, setup_context=_setup_context)


def loss_with_grads(value: Tensor, pairs: list[tuple[Tensor | None, Tensor]]) -> Tensor:
    """`value` carrying the gradient of each (input, its gradient) pair whose input requires grad."""
    kept = [(x, g) for x, g in pairs if x is not None and x.requires_grad]
    if not kept or not torch.is_grad_enabled():
        return value
    return attach_grads(value, [x for x, _ in kept], [g for _, g in kept])
