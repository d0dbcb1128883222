"""Loading the compiled extension `hotloop._C` (C++ CPU kernels, and CUDA kernels where built)."""
from __future__ import annotations

import warnings

import torch

REBUILD = "pip install --no-build-isolation -e ."  # (or without -e) rebuilds _C against the torch installed


class TorchMismatchError(ImportError):
    """hotloop._C was compiled against another torch than the one running (C++ ABI: loading it could crash)."""


def _release(version: str) -> str:
    """A torch version without its local build tag: '2.13.0+cu130' -> '2.13.0'. Builds of one release share
    the C++ ABI whatever their tag (a CUDA _C under a CPU torch fails to load on its own, cleanly)."""
    return version.split("+", 1)[0]


def torch_mismatch(built: str | None, running: str) -> TorchMismatchError | None:
    """The error to report when a _C built for torch `built` is loaded into torch `running`, else None.
    None for `built` None: a build from before the record, nothing to compare."""
    if built is None or _release(built) == _release(running):
        return None
    return TorchMismatchError(
        f"hotloop._C was built for torch {built}, but torch {running} is running; rebuild it against this torch "
        f"with `{REBUILD}` (or install torch=={_release(built)})"
    )


def _built_torch() -> str | None:
    try:
        from hotloop import _build_info  # written by setup.py next to _C
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


_IMPORT_ERROR: Exception | None = torch_mismatch(_built_torch(), torch.__version__)
if _IMPORT_ERROR is None:
    try:
        from hotloop import _C  # noqa: F401  (the compiled kernels: hotloop._C.cpu, hotloop._C.cuda)
    except ImportError as exc:  # the package still works with the reference / triton backends
        _C = None
        _IMPORT_ERROR = exc
else:  # never load a _C built for another torch
    _C = None
    warnings.warn(f"{_IMPORT_ERROR}. hotloop._C is not loaded: the 'cpu' and 'cuda' backends are unavailable "
                  "until then (HOTLOOP_BACKEND=reference works)", RuntimeWarning, stacklevel=2)


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def require_extension(backend: str) -> None:
    """Raise a RuntimeError that says how to build the extension when `backend` needs it and it is missing."""
    if _C is None:
        if isinstance(_IMPORT_ERROR, TorchMismatchError):
            raise RuntimeError(f"the {backend!r} backend needs the compiled extension hotloop._C, which is not "
                               f"loaded: {_IMPORT_ERROR}; or set HOTLOOP_BACKEND=reference")
        raise RuntimeError(
            f"the {backend!r} backend needs the compiled extension hotloop._C, which failed to import "
            f"({_IMPORT_ERROR}); build it with `{REBUILD}`, "
            "or set HOTLOOP_BACKEND=reference"
        )
    if backend == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            "the 'cuda' backend needs hotloop._C built with CUDA (torch with CUDA and nvcc at build time); "
            f"this build has CPU kernels only (torch {torch.__version__})"
        )


def compiled_kernels(backend: str):
    """The module of compiled kernels of `backend` ("cpu": hotloop._C.cpu, "cuda": hotloop._C.cuda); raises how
    to build them when they are missing."""
    require_extension(backend)
    return getattr(_C, backend)
