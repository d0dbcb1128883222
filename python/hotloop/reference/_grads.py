"""The reference backend's backward kernels: the gradient of a reference function, taken by torch.func.

A kernel-level op runs below autograd (inside a custom op, where torch.enable_grad records nothing), so the
reference kernels differentiate the spec with torch.func transforms, which work there: the hand-written
gradients of the other backends are checked against torch's own differentiation of the spec.

A TorchDispatchMode (FlopCounterMode, a profiler's mode) runs the op it intercepts with every dispatch key above
Python excluded, functorch's among them: the transforms' wrapper tensors (which have no storage) would then fall
through to the CPU kernels and fail. The transforms run with those keys let back in (`_transforms_enabled`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch._C import DispatchKey

_TRANSFORM_KEYS = (DispatchKey.FuncTorchDynamicLayerBackMode, DispatchKey.FuncTorchDynamicLayerFrontMode,
                   DispatchKey.FuncTorchGradWrapper, DispatchKey.FuncTorchBatched, DispatchKey.FuncTorchVmapMode,
                   DispatchKey.PythonTLSSnapshot)


@contextlib.contextmanager
def _transforms_enabled():
    """The caller's dispatch-key state less any exclusion of functorch's keys."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _TRANSFORM_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def vjp(fn: Callable[..., Sequence[Tensor | None]], inputs: Sequence[Tensor | None],
        grad_outputs: Sequence[Tensor | None], wrt: Sequence[bool]) -> list[Tensor | None]:
    """d <outputs of fn(*inputs), grad_outputs> / d inputs[i] for each i with wrt[i] (None elsewhere); outputs
    whose grad_output is None take no part (fn may return None there)."""
    diff = [i for i, (x, w) in enumerate(zip(inputs, wrt)) if w and x is not None]
    used = [j for j, g in enumerate(grad_outputs) if g is not None]

    def of_diff(*xs: Tensor) -> tuple[Tensor, ...]:
        args = list(inputs)
        for i, x in zip(diff, xs):
            args[i] = x
        outs = fn(*args)
        return tuple(outs[j] for j in used)

    out = [None] * len(inputs)
    if not diff:
        return out
    if not used:  # nothing flows back: zero gradients
        for i in diff:
            out[i] = torch.zeros_like(inputs[i])
        return out
    with _transforms_enabled():
        outs, pull = torch.func.vjp(of_diff, *[inputs[i].detach() for i in diff])
        grads = pull(tuple(grad_outputs[j].to(o.dtype) for j, o in zip(used, outs)))
    for i, g in zip(diff, grads):
        out[i] = g
    return out


def value_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(fn(x), d fn / d x in x's dtype, or [0] without need_grad) for a scalar-valued fn."""
    if not need_grad:
        return fn(x.detach()).detach(), x.new_empty(0)
    with _transforms_enabled():
        grad, value = torch.func.grad_and_value(fn)(x.detach())
    return value, grad
