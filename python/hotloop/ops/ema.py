"""EMA of a whole model in one fused pass (docs/ema.md): target <- d * target + (1 - d) * online over every tensor.

BYOL, DINO, SPR, mean teachers and TR-DPO's reference sync all move a teacher towards a student every step.

Layers, outermost first:
  ema_update_          public API: flattens modules / tensor lists, splits averaged tensors from copied buffers,
                       checks dtypes, shapes, devices and decay
  hotloop::ema_update  torch.library custom op (mutates target and out_copy; fake kernel), so torch.compile
                       traces a training step that calls it
  kernels              dispatch.kernel: hotloop._C.cpu.ema_update (one OpenMP region over all tensors),
                       hotloop._C.cuda.ema_update (one multi-tensor launch through a device pointer table),
                       reference.ema (plain torch, per tensor; also CUDA tensors in a build without CUDA)

Kernel contract: contiguous tensors on one device; (target, online) dtypes (float32, float32 | bfloat16 |
float16), (bfloat16, bfloat16), (float16, float16), (float64, float64) (CPU); math in float32 (float64), one
rounding; optional copies (float32 / bfloat16 / float16) of the new targets written in the same pass.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hotloop._internal import dispatch
from hotloop.reference.ema import ema_update_kernel_ref

_OP = "ema_update_"
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
PAIRS = {(_F32, _F32), (_F32, _BF16), (_F32, _F16), (_BF16, _BF16), (_F16, _F16), (_F64, _F64)}
COPY_DTYPES = (_F32, _BF16, _F16)
BUFFER_MODES = ("copy", "average", "skip")

dispatch.register("ema_update", "reference", ema_update_kernel_ref, reference_serves_cuda=True)
dispatch.register("ema_update", "cpu", dispatch.extension("cpu", "ema_update"))
dispatch.register("ema_update", "cuda", dispatch.extension("cuda", "ema_update"))


# ----------------------------------------------------------------------------------------------- the op
@torch.library.custom_op("hotloop::ema_update", mutates_args=("target", "out_copy"))
def ema_update_op(target: list[Tensor], online: list[Tensor], out_copy: list[Tensor], decay: float,
                  decay_tensor: Tensor | None) -> None:
    """In place over lists of contiguous tensors: target[i] <- lerp(target[i], online[i], 1 - d), d = decay_tensor
    (one float32 element on the targets' device) when given, else decay; out_copy (empty or one per target)
    receives the new targets."""
    dispatch.kernel("ema_update", target[0].device)(target, online, out_copy, decay, decay_tensor)


@ema_update_op.register_fake
def _(target, online, out_copy, decay, decay_tensor):
    return None


# --------------------------------------------------------------------------------------------- flattening
def _collect(obj: object, name: str) -> tuple[list[Tensor | None], list[Tensor]]:
    """-> (parameters-like tensors, buffers) of a module, a tensor, or a sequence of either (in order); None
    items (out_copy only: no copy of that tensor) stay None."""
    if obj is None and name == "out_copy":
        return [None], []
    if isinstance(obj, nn.Module):
        return [p for p in obj.parameters()], [b for b in obj.buffers()]
    if isinstance(obj, Tensor):
        return [obj], []
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        params, bufs = [], []
        for i, item in enumerate(obj):
            if isinstance(item, Tensor):  # the common case (a parameter list): no recursion
                params.append(item)
                continue
            if not isinstance(item, nn.Module) and not (item is None and name == "out_copy"):
                raise TypeError(f"hotloop.{_OP}: `{name}[{i}]` must be a torch.Tensor or nn.Module, "
                                f"got {type(item).__name__}")
            p, b = _collect(item, name)
            params += p
            bufs += b
        return params, bufs
    raise TypeError(f"hotloop.{_OP}: `{name}` must be an nn.Module or a sequence of tensors / modules, "
                    f"got {type(obj).__name__}")


def _local(t: Tensor) -> Tensor:
    """The tensor the kernel writes: a DTensor's local shard (FSDP2); plain tensors as they are (the op runs
    under no_grad)."""
    if type(t) in _PLAIN:  # fast path: ~200 tensors a call, so per-tensor Python costs add up
        return t
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


_PLAIN = (Tensor, nn.Parameter)


def _split_buffers(bufs: list[Tensor], mode: str) -> tuple[list[Tensor], list[Tensor]]:
    """-> (buffers averaged like parameters, buffers copied); integer buffers (counters) are always copied."""
    if mode == "skip":
        return [], []
    if mode == "copy":
        return [], bufs
    return [b for b in bufs if b.is_floating_point()], [b for b in bufs if not b.is_floating_point()]


# ----------------------------------------------------------------------------------------------- checks
def _check_decay(decay: object) -> tuple[float, Tensor | None]:
    """-> (decay as a float, or the float32 one-element tensor the kernel reads on device)."""
    if isinstance(decay, Tensor):
        if decay.numel() != 1 or not decay.is_floating_point():
            raise ValueError(f"hotloop.{_OP}: a tensor `decay` must be one floating-point element, "
                             f"got shape {tuple(decay.shape)} {decay.dtype}")
        if decay.device.type == "cpu":  # no device sync: read it here and check it like a float
            return _check_decay(float(decay))
        return 0.0, decay.reshape(()).to(torch.float32)
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"hotloop.{_OP}: `decay` must be a real number or a 0-dim tensor, got {type(decay).__name__}")
    decay = float(decay)
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"hotloop.{_OP}: `decay` must lie in [0, 1], got {decay}")
    return decay, None


def _check_pairs(target: list[Tensor], online: list[Tensor], copy: list[Tensor] | None) -> None:
    if len(target) != len(online):
        raise ValueError(f"hotloop.{_OP}: `target` has {len(target)} tensors but `online` has {len(online)}")
    if copy is not None and len(copy) != len(target):
        raise ValueError(f"hotloop.{_OP}: `out_copy` has {len(copy)} tensors but `target` has {len(target)}")
    dev = target[0].device if target else None
    for i, (t, s) in enumerate(zip(target, online)):
        if t.shape != s.shape:
            raise ValueError(f"hotloop.{_OP}: `target[{i}]` has shape {tuple(t.shape)} but `online[{i}]` has "
                             f"{tuple(s.shape)}")
        if t.device != dev or s.device != dev:
            raise ValueError(f"hotloop.{_OP}: every tensor must be on {dev}; `target[{i}]` is on {t.device}, "
                             f"`online[{i}]` on {s.device}")
        if (t.dtype, s.dtype) not in PAIRS:
            raise TypeError(f"hotloop.{_OP}: unsupported dtype pair (target {t.dtype}, online {s.dtype}) at index "
                            f"{i}; supported: float32 <- float32/bfloat16/float16, bfloat16 <- bfloat16, "
                            f"float16 <- float16, float64 <- float64 (CPU)")
        if t.dtype == _F64 and t.device.type != "cpu":
            raise TypeError(f"hotloop.{_OP}: float64 tensors are supported on CPU only (index {i})")
        if not t.is_contiguous():
            raise ValueError(f"hotloop.{_OP}: `target[{i}]` must be contiguous (it is updated in place)")
        if copy is not None and copy[i] is not None:
            c = copy[i]
            if c.shape != t.shape or c.device != dev or not c.is_contiguous():
                raise ValueError(f"hotloop.{_OP}: `out_copy[{i}]` must be a contiguous {tuple(t.shape)} tensor on "
                                 f"{dev}, got {tuple(c.shape)} on {c.device}")
            if c.dtype not in COPY_DTYPES or t.dtype == _F64:
                raise TypeError(f"hotloop.{_OP}: `out_copy[{i}]` must be float32 / bfloat16 / float16 next to a "
                                f"non-float64 target, got {c.dtype} for a {t.dtype} target")


def _check_no_overlap(target: list[Tensor], online: list[Tensor], copy: list[Tensor] | None) -> None:
    """Refuse a written tensor (target, out_copy) whose memory overlaps any other tensor of the call: the kernel
    would read values it already overwrote. One sort of the address ranges (contiguous tensors: [ptr, ptr +
    bytes)), so hundreds of tensors cost microseconds; online tensors may overlap each other (only read)."""
    spans = []
    for name, tensors, written in (("target", target, True), ("online", online, False),
                                   ("out_copy", copy or [], True)):
        for i, t in enumerate(tensors):
            if t is not None and t.numel():
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), written, f"{name}[{i}]"))
    spans.sort(key=lambda s: s[0])
    end_any = end_written = -1
    last_any = last_written = ""
    for start, end, written, what in spans:
        other = last_any if written and start < end_any else last_written if start < end_written else None
        if other is not None:
            raise ValueError(f"hotloop.{_OP}: `{what}` and `{other}` overlap in memory; the tensors written in "
                             "place (target, out_copy) must not share memory with any other tensor of the call")
        if end > end_any:
            end_any, last_any = end, what
        if written and end > end_written:
            end_written, last_written = end, what


# ------------------------------------------------------------------------------------------- public API
def ema_update_(target: nn.Module | Sequence[Tensor | nn.Module], online: nn.Module | Sequence[Tensor | nn.Module],
                decay: float | Tensor, *, out_copy: nn.Module | Sequence[Tensor | nn.Module] | None = None,
                buffers: str = "copy") -> None:
    """Move `target` towards `online` in place: t <- d * t + (1 - d) * s for every tensor, in one fused pass.

    Args:
        target: the teacher: an nn.Module (its parameters, then buffers per `buffers`), or a sequence of tensors
            or modules, flattened in order. Tensors must be contiguous. A DTensor (FSDP2) is updated through its
            local shard.
        online: the student, laid out like `target` (same count, shapes and device).
            dtype pairs (target, online): float32 <- float32 / bfloat16 / float16 (a float32 shadow of a
            low-precision student), bfloat16 <- bfloat16, float16 <- float16, float64 <- float64 (CPU only).
            Non-contiguous online tensors are copied first.
        decay: d in [0, 1] (1 keeps the target, 0 copies the online values exactly): a float, or a one-element
            floating tensor (e.g. a scheduled decay kept on the GPU). A CPU tensor is read and checked like a
            float; a CUDA tensor is read by the kernel on device (no host sync) and therefore NOT range-checked.
        out_copy: optional, laid out like `target`: float32 / bfloat16 / float16 tensors that receive the new
            target values rounded to their dtype in the same pass (the bf16 teacher for forward next to a float32
            shadow); None items skip that tensor. With `buffers="copy"` its buffers receive the online ones too.
        buffers: for modules: "copy" (default: BN running statistics and counters taken from the online model),
            "average" (floating buffers averaged like parameters, integer ones copied) or "skip".

    Math is float32 (float64 for float64) with ATen's lerp, rounded once. One OpenMP region on CPU, one kernel
    launch on CUDA for all the averaged tensors of every dtype; copied buffers take one torch._foreach_copy_.
    """
    if buffers not in BUFFER_MODES:
        raise ValueError(f"hotloop.{_OP}: `buffers` must be one of {BUFFER_MODES}, got {buffers!r}")
    t_par, t_buf = _collect(target, "target")
    s_par, s_buf = _collect(online, "online")
    if len(t_buf) != len(s_buf):
        raise ValueError(f"hotloop.{_OP}: `target` has {len(t_buf)} buffers but `online` has {len(s_buf)}")
    t_avg, t_cp = _split_buffers(t_buf, buffers)
    s_avg, s_cp = _split_buffers(s_buf, buffers)
    tgt = [_local(t) for t in t_par + t_avg]
    src = [_local(s) for s in s_par + s_avg]
    cpy = c_cp = None
    if out_copy is not None:
        c_par, c_buf = _collect(out_copy, "out_copy")
        c_avg, c_cp = _split_buffers(c_buf, buffers)
        cpy = [None if c is None else _local(c) for c in c_par + c_avg]
    _check_pairs(tgt, src, cpy)
    d, d_tensor = _check_decay(decay)
    with torch.no_grad():
        if tgt:
            dev = tgt[0].device
            if d_tensor is not None and d_tensor.device != dev:
                raise ValueError(f"hotloop.{_OP}: a tensor `decay` must be on the targets' device {dev}, "
                                 f"got {d_tensor.device}")
            src = [s.contiguous() for s in src]
            if cpy is not None:  # a None entry (no copy of that tensor) travels as an empty tensor
                cpy = [torch.empty(0, dtype=_BF16, device=dev) if c is None else c for c in cpy]
            if torch.compiler.is_compiling():
                ema_update_op(tgt, src, cpy or [], d, d_tensor)
            else:
                _check_no_overlap(tgt, src, cpy)  # eager only: traced tensors have no addresses
                # eager: straight to the kernel, skipping the custom op's Python dispatch layers (~2 us a tensor,
                # hundreds of tensors a call); the version counters are bumped as the custom op would
                dispatch.kernel("ema_update", dev)(tgt, src, cpy or [], d, d_tensor)
                torch.autograd.graph.increment_version(tgt + (cpy or []))
        _copy_buffers(t_cp, s_cp, c_cp)


def _copy_buffers(t_cp: list[Tensor], s_cp: list[Tensor], c_cp: list[Tensor] | None) -> None:
    for i, (t, s) in enumerate(zip(t_cp, s_cp)):
        if t.shape != s.shape:
            raise ValueError(f"hotloop.{_OP}: buffer {i} of `target` has shape {tuple(t.shape)} but `online`'s "
                             f"has {tuple(s.shape)}")
    if t_cp:
        torch._foreach_copy_([_local(t) for t in t_cp], [_local(s) for s in s_cp])
    if c_cp:
        torch._foreach_copy_([_local(c) for c in c_cp], [_local(s) for s in s_cp])
