"""Large CPU buffers backed by transparent huge pages.

A fresh [N, V] gradient is hundreds of MB; on first touch the kernel maps it 4 KiB at a time, and on VMs each
fault costs microseconds (measured here: 400 ms to first-touch 524 MB, against 60 ms for the kernel that writes
it). Advising MADV_HUGEPAGE before the first write maps it 2 MiB at a time. Where THP is off or the platform is
not Linux the advice is skipped and the buffer is an ordinary torch.empty.
"""
from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14
_PAGE = 4096
_MIN_BYTES = 4 << 20  # below two huge pages there is nothing to gain


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty_large(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(shape) whose pages, on CPU, are advised to be huge before anything touches them."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and _madvise is not None and nbytes >= _MIN_BYTES:
        start = (t.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_PAGE - 1)
        _madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure leaves ordinary pages
    return t
