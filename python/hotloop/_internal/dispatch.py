"""Which kernel family runs an op: chosen by the tensors' device, or forced with HOTLOOP_BACKEND.

  reference  plain torch (the spec in code), any device
  cpu        the C++ extension (OpenMP + SIMD), CPU tensors
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests them)
  cuda       the CUDA C++ kernels of the extension, CUDA tensors

The variable is read on every call (never cached at import), so tests can switch it per case.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(op: str, device: torch.device, available: tuple[str, ...] = BACKENDS) -> str:
    """Return the backend `op` runs on for tensors on `device`; raises a ValueError naming the fix."""
    forced = os.environ.get("HOTLOOP_BACKEND", "").strip().lower()
    if not forced:
        if device.type == "cpu":
            backend = "cpu"
        elif device.type == "cuda":
            backend = "triton" if "triton" in available else "cuda"
        else:
            raise ValueError(f"hotloop.{op}: no kernel for device type {device.type!r}; use CPU or CUDA tensors")
    else:
        if forced not in BACKENDS:
            raise ValueError(f"HOTLOOP_BACKEND={forced!r} is not one of {BACKENDS}")
        backend = forced
    if backend not in available:
        raise ValueError(f"hotloop.{op} has no {backend!r} backend (it has {available})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"hotloop.{op}: HOTLOOP_BACKEND=cpu needs CPU tensors, got {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"hotloop.{op}: HOTLOOP_BACKEND=cuda needs CUDA tensors, got {device}")
    if backend == "triton" and device.type == "cpu" and not _interpreting():
        raise ValueError(f"hotloop.{op}: the triton backend runs on CPU tensors only with TRITON_INTERPRET=1")
    if backend in ("cpu", "cuda"):
        from hotloop._internal.extension import require_extension

        require_extension(backend)
    return backend
