"""Loading the compiled extension `hotloop._C` (C++ CPU kernels, and CUDA kernels where built)."""
from __future__ import annotations

import torch

try:
    from hotloop import _C  # noqa: F401  (registers the torch.ops.hotloop.*_cpu / *_cuda kernels)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # the package still works with the reference / triton backends
    _C = None
    _IMPORT_ERROR = exc


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def require_extension(backend: str) -> None:
    """Raise a RuntimeError that says how to build the extension when `backend` needs it and it is missing."""
    if _C is None:
        raise RuntimeError(
            f"the {backend!r} backend needs the compiled extension hotloop._C, which failed to import "
            f"({_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .`, "
            "or set HOTLOOP_BACKEND=reference"
        )
    if backend == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            "the 'cuda' backend needs hotloop._C built with CUDA (torch with CUDA and nvcc at build time); "
            f"this build has CPU kernels only (torch {torch.__version__})"
        )
