"""Running a loss inside a distributed engine's forward, so the engine's hooks do their work.

DDP all-reduces gradients only for a backward it was told of in its own forward; FSDP2 unshards parameters in a
module's forward pre-hook and reduce-scatters their gradients after backward; DeepSpeed ZeRO-3 gathers a module's
parameters in its forward hooks. hotloop's losses never call the model's forward (the lm_head must not run), so
the training classes run the whole loss as the wrapped model's forward (`in_forward`) and the lm_head's loss as
the head module's forward (`in_head`): the inner module's `forward` is swapped for the loss for one call.

A model that one of these engines trains but that reaches hotloop without its wrapper (DDP's `.module`) would
train with unsynchronised gradients, silently; `in_forward` refuses a plain module while a multi-process group
runs unless the caller says it synchronises gradients itself (`manual_gradient_sync`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from torch import nn

_state = threading.local()


@contextlib.contextmanager
def manual_gradient_sync():
    """Within this context hotloop.train accepts a plain (unwrapped) model while torch.distributed runs several
    processes: the caller all-reduces the gradients itself."""
    previous = getattr(_state, "manual", False)
    _state.manual = True
    try:
        yield
    finally:
        _state.manual = previous


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _wrapped_inner(model: nn.Module) -> nn.Module | None:
    """The module a wrapper runs in its forward: DDP / DataParallel / FSDP1 / DeepSpeedEngine keep it as
    `.module`; None for a model that is not such a wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine", "FullyShardedDataParallel"):
        return model.module
    return None


def _has_dtensor_params(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _multi_process() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _swapped_forward(module: nn.Module, forward: Callable[..., Any], call: Callable[[], Any]) -> Any:
    """call() with module.forward replaced by `forward` (an instance attribute, restored afterwards): the
    module's __call__, and so every hook an engine registered on it, runs around the replacement."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        return call()
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward


def in_forward(op: str, model: nn.Module, loss: Callable[[nn.Module], Any], trains: bool = True) -> Any:
    """loss(inner_model) run as the forward of `model`'s engine: through DDP / DeepSpeed / FSDP1's forward
    (their `.module` is what `loss` gets), through an FSDP2 root's own forward, or called directly for a plain
    model (an error while several processes run, unless inside `manual_gradient_sync` or not `trains`: a frozen
    reference model has no gradients to synchronise)."""
    inner = _wrapped_inner(model)
    if inner is not None:
        return _swapped_forward(inner, lambda: loss(inner), model)
    if _is_fsdp2(model):
        return _swapped_forward(model, lambda: loss(model), model)
    if trains and _multi_process() and not getattr(_state, "manual", False) and not _has_dtensor_params(model):
        raise RuntimeError(
            f"hotloop.train.{op}: torch.distributed runs {_world()} processes but `model` "
            f"({type(model).__name__}) is not wrapped by DistributedDataParallel, FSDP2 (fully_shard) or a "
            "DeepSpeed engine, so no engine would synchronise its gradients: pass the wrapped model (e.g. "
            "loss(ddp_model, batch), not ddp_model.module), or call inside "
            "hotloop.train.manual_gradient_sync() if you all-reduce the gradients yourself")
    return loss(model)


def in_head(head: nn.Module, loss: Callable[..., Any], hidden: torch.Tensor) -> Any:
    """loss(hidden, weight, bias) with the lm_head's parameters as its forward sees them: inside the head's own
    forward when an engine shards it separately (an FSDP2 unit of its own: the weight is a sharded DTensor
    outside its forward; DeepSpeed ZeRO-3: the weight is gathered by the head's hooks), else directly."""
    def run(h: torch.Tensor):
        return loss(h, head.weight, getattr(head, "bias", None))

    if _is_fsdp2(head) or hasattr(head.weight, "ds_id"):
        return _swapped_forward(head, run, lambda: head(hidden))
    return run(hidden)


def _fsdp2_mesh(model: nn.Module):
    """The device mesh of the first FSDP2 unit under `model` that holds parameters."""
    for module in model.modules():
        if _is_fsdp2(module):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                return group.mesh_info.mesh
    raise ValueError("hotloop.train: the FSDP2 model holds no sharded parameters")


def data_parallel_groups(model: nn.Module) -> list:
    """The process groups over which the engine averages `model`'s gradients (FSDP2 on a 2-D HSDP mesh: one per
    mesh dimension); [] for a plain model outside `manual_gradient_sync` or a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or isinstance(model, nn.DataParallel):
        return []
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return [model.process_group]
    if _is_fsdp2(model):
        mesh = _fsdp2_mesh(model)
        return [mesh.get_group(d) for d in range(mesh.ndim)]
    if _wrapped_inner(model) is not None or getattr(_state, "manual", False):  # DeepSpeed / FSDP1 / manual
        return [dist.group.WORLD]
    return []


def global_sum(value: torch.Tensor, groups: list) -> torch.Tensor:
    """value summed over every rank of `groups` (a collective, not a host sync); value itself for []."""
    import torch.distributed as dist

    if not groups:
        return value
    total = value.detach().clone()
    for group in groups:
        dist.all_reduce(total, group=group)
    return total


def global_token_mean(op: str, loss: torch.Tensor, local_tokens: torch.Tensor, num_items_in_batch, groups: list
                      ) -> torch.Tensor:
    """A token-mean loss over this rank's tokens rescaled to the mean over every token of the optimizer step.

    num_items_in_batch (TRL / transformers' name): the scored tokens of the whole step, every data-parallel rank
    and gradient-accumulation micro-batch together; None: the ranks' token counts summed now (one all-reduce;
    exact across ranks, not across accumulation steps). The result is loss * local_tokens * W / total, W the
    number of data-parallel ranks, because the engine averages the ranks' gradients: their mean (summed over the
    micro-batches) is then the gradient of the step's token mean, as one process on the whole step computes it.
    """
    if num_items_in_batch is None:
        if not groups:
            return loss
        total = global_sum(local_tokens.float(), groups)
    elif isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 1:
        total = num_items_in_batch.to(loss.device, torch.float32).reshape(())
    elif isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool):
        total = torch.tensor(float(num_items_in_batch), device=loss.device)
    else:
        raise TypeError(f"hotloop.train.{op}: batch['num_items_in_batch'] must be a number or a 1-element tensor "
                        f"(the step's scored tokens over every rank and micro-batch), got {num_items_in_batch!r}")
    scale = local_tokens.clamp(min=1).float() * group_size(groups) / total.clamp(min=1)
    return loss * scale.to(loss.dtype)


def group_size(groups: list) -> int:
    import torch.distributed as dist

    size = 1
    for group in groups:
        size *= dist.get_world_size(group)
    return size


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()
