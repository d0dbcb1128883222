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
    """-> a copy of `value` [] whose gradient w.r.t. inputs[i] is grads[i] (same shape) times the incoming one."""
    return value.clone()


@attach_grads.register_fake
def _(value, inputs, grads):
    return torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    _, _, grads = inputs
    ctx.save_for_backward(*grads)


def _backward(ctx, grad_out):
    grads = ctx.saved_tensors
    # in each gradient's dtype: a bf16 weight gradient is scaled without an fp32 copy of it
    return None, [g * grad_out.to(g.dtype) for g in grads], [None] * len(grads)


attach_grads.register_autograd(_backward, setup_context=_setup_context)


def loss_with_grads(value: Tensor, pairs: list[tuple[Tensor | None, Tensor]]) -> Tensor:
    """`value` carrying the gradient of each (input, its gradient) pair whose input requires grad."""
    kept = [(x, g) for x, g in pairs if x is not None and x.requires_grad]
    if not kept or not torch.is_grad_enabled():
        return value
    return attach_grads(value, [x for x, _ in kept], [g for _, g in kept])
