"""Input validation shared by the public ops: every error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
import operator
import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(op: str, name: str, t: object, *, dtypes: tuple[torch.dtype, ...] | None = None,
                 min_dim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"hotloop.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"hotloop.{op}: `{name}` must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"hotloop.{op}: `{name}` must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, **tensors: Tensor) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"hotloop.{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}")


def check_positive(op: str, name: str, value: float) -> float:
    if isinstance(value, (Tensor, bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"hotloop.{op}: `{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"hotloop.{op}: `{name}` must be a finite number > 0, got {value}")
    return value


def check_index(op: str, name: str, value: object) -> int:
    """An integer that fits int64 (labels are compared with it in the kernels)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"hotloop.{op}: `{name}` must be an integer, got {type(value).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"hotloop.{op}: `{name}` must fit in int64, got {value}")
    return value


def check_logits_labels(op: str, logits: Tensor, labels: Tensor) -> None:
    """logits [..., V] float, labels [...] int32/int64 of logits' leading shape, same device."""
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    if logits.shape[-1] == 0:
        raise ValueError(f"hotloop.{op}: `logits` has an empty vocabulary dim (shape {tuple(logits.shape)}); V >= 1")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"hotloop.{op}: `labels` must have the leading shape of `logits` {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    check_same_device(op, logits=logits, labels=labels)
    if logits.dtype == torch.float64 and logits.device.type != "cpu":
        raise TypeError(f"hotloop.{op}: float64 `logits` are supported on CPU only")


def labels_checked_on_host(device: torch.device) -> bool:
    """Whether to check the label range with a host read: always on CPU; on GPU unless HOTLOOP_CHECK_LABELS=0.

    The check costs one device->host sync; with it off, an out-of-range label gives NaN outputs (never a wild read).
    """
    if _compiling():
        return False
    return device.type == "cpu" or os.environ.get("HOTLOOP_CHECK_LABELS", "1") != "0"


def check_label_range(op: str, labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise if a label outside [0, vocab) is not ignore_index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"hotloop.{op}: `labels` must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} out of range (e.g. {first})"
        )
