"""The one place that decides which kernel runs an op: a table filled by `register`, read by `kernel`.

Every kernel-level op (hotloop::token_stats_fwd, hotloop::policy_tokens, ...) is one torch.library custom op whose
implementation is `kernel(op, device)(*args)`; each backend registers its kernel for the op under its name:

  reference  plain torch (the spec in code, hotloop.reference), any device
  cpu        the C++ extension (OpenMP + SIMD; hotloop._C.cpu), or BLAS tiles around it, CPU tensors
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests them)
  cuda       the CUDA C++ kernels of the extension (hotloop._C.cuda), CUDA tensors

Without HOTLOOP_BACKEND a CPU tensor gets "cpu" and a CUDA tensor "triton" (or "cuda" for an op with no Triton
kernel; an op registered with `reference_serves_cuda` runs its reference on CUDA tensors when the extension was
built without CUDA kernels, where the others raise how to build them). HOTLOOP_BACKEND forces one backend for every op, read on every call (never cached), so tests can switch
it per case; it is read when the op runs, not when torch.compile traces it. HOTLOOP_CPU_ISA (base / avx2 /
avx512) lowers the C++ kernels' SIMD path; any other value is an error when a CPU kernel is chosen.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
CPU_ISAS = ("base", "avx2", "avx512")  # HOTLOOP_CPU_ISA: the C++ kernels' SIMD path, lowered for tests
_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda"}  # the device type a backend's kernels need (triton: see _check)

# op -> backend -> the kernel, or "module:attribute.path" imported on first use (Triton and the extension load
# only when asked for: the package works without either)
_KERNELS: dict[str, dict[str, Callable | str]] = {}
_REFERENCE_SERVES_CUDA: set[str] = set()


def register(op: str, backend: str, fn: Callable | str, *, reference_serves_cuda: bool = False) -> None:
    """Make `fn` the `backend` kernel of `op` (a kernel-level op name, e.g. "token_stats_fwd").
    reference_serves_cuda (with backend "reference"): this reference is fast enough to stand in for a missing
    CUDA build (e.g. the EMA's per-tensor loop), so CUDA tensors never fail for want of nvcc at install time."""
    if backend not in BACKENDS:
        raise ValueError(f"dispatch.register: backend {backend!r} is not one of {BACKENDS}")
    _KERNELS.setdefault(op, {})[backend] = fn
    if reference_serves_cuda:
        _REFERENCE_SERVES_CUDA.add(op)


def extension(backend: str, name: str) -> str:
    """The lazy spec of a compiled kernel: hotloop._C.cpu.<name> or hotloop._C.cuda.<name>."""
    return f"hotloop._C:{backend}.{name}"


def backends(op: str) -> tuple[str, ...]:
    """The backends with a kernel for `op`, in BACKENDS order."""
    return tuple(b for b in BACKENDS if b in _KERNELS.get(op, {}))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(op: str, device: torch.device) -> str:
    """The backend `op` runs on for tensors on `device`; raises a ValueError that names the fix."""
    available = backends(op)
    forced = os.environ.get("HOTLOOP_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"HOTLOOP_BACKEND={forced!r} is not one of {BACKENDS}")
        chosen = forced
    elif device.type == "cpu":
        chosen = "cpu"
    elif device.type == "cuda":
        chosen = "triton" if "triton" in available else "cuda"
        if chosen == "cuda" and op in _REFERENCE_SERVES_CUDA:
            from hotloop._internal.extension import has_cuda_kernels

            chosen = "cuda" if has_cuda_kernels() else "reference"
    else:
        raise ValueError(f"hotloop.{op}: no kernel for device type {device.type!r}; use CPU or CUDA tensors")
    if chosen not in available:
        raise ValueError(f"hotloop.{op} has no {chosen!r} backend (it has {available})")
    _check(op, chosen, device)
    return chosen


def _check(op: str, chosen: str, device: torch.device) -> None:
    needs = _DEVICE_OF.get(chosen)
    if needs is not None and device.type != needs:
        raise ValueError(f"hotloop.{op}: HOTLOOP_BACKEND={chosen} needs {needs.upper()} tensors, got {device}")
    if chosen == "cpu":
        _check_cpu_isa()
    if chosen == "triton" and device.type == "cpu" and not _interpreting():
        raise ValueError(f"hotloop.{op}: the triton backend runs on CPU tensors only with TRITON_INTERPRET=1")
    fn = _KERNELS[op][chosen]
    if isinstance(fn, str) and fn.startswith("hotloop._C:"):
        from hotloop._internal.extension import require_extension

        require_extension(chosen)


def _check_cpu_isa() -> None:
    """The C++ kernels read HOTLOOP_CPU_ISA on every call and never go above what the CPU has; an unknown name
    would be ignored there, so it is refused here."""
    isa = os.environ.get("HOTLOOP_CPU_ISA")
    if isa is not None and isa not in CPU_ISAS:
        raise ValueError(f"HOTLOOP_CPU_ISA={isa!r} is not one of {CPU_ISAS} (unset it for the best the CPU has)")


def kernel(op: str, device: torch.device) -> Callable:
    """The kernel that runs `op` on tensors on `device` (see `backend`)."""
    chosen = backend(op, device)
    fn = _KERNELS[op][chosen]
    if isinstance(fn, str):
        module, path = fn.split(":")
        fn = importlib.import_module(module)
        for part in path.split("."):
            fn = getattr(fn, part)
        _KERNELS[op][chosen] = fn
    return fn
