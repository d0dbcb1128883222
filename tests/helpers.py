"""Backends, devices, error measures and input makers shared by the op tests."""
from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cuda_kernels_built() -> bool:
    from hotloop._internal.extension import has_cuda_kernels

    return has_cuda_kernels()


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not (HAS_CUDA and _cuda_kernels_built()),
                                                             reason="needs a GPU and the CUDA build")),
]


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return "cuda"
    return "cpu"


def interpreted(backend: str) -> bool:
    """Triton on CPU tensors runs in the interpreter (~0.4 ms a program): such cases use small shapes."""
    return backend == "triton" and not HAS_CUDA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere (or a NaN mismatch) never passes."""
    out, ref = out.double(), ref.double()
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    out, ref = torch.nan_to_num(out, nan=0.0), torch.nan_to_num(ref, nan=0.0)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# relative-norm tolerances (device METHOD notes): outputs are float32 math in every dtype; gradients are rounded
# once to the logits' dtype
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def random_logits(shape, dtype, device, scale=3.0, generator=None):
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype).to(device)


def random_labels(shape, V, device, ignore_index=-100, frac_ignored=0.2, dtype=torch.int64):
    labels = torch.randint(0, V, shape, dtype=dtype)
    labels[torch.rand(shape) < frac_ignored] = ignore_index
    return labels.to(device)


def triton_interpreter_only(test):
    """Marks a kernel-level Triton test on CPU tensors (the interpreter, which conftest.py turns on without a GPU):
    skipped with a GPU, where the public-op tests run the same kernels on CUDA tensors, and without triton. Per
    test, so the rest of its file runs either way."""
    test = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")(test)
    return pytest.mark.skipif(HAS_CUDA, reason="interpreter-only kernel tests (CPU tensors)")(test)


class LazyModule:
    """A module imported at its first attribute access, i.e. inside the test that uses it, never at collection: a
    test whose module cannot be imported is skipped (pytest.importorskip), the other tests of its file still run."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # dunders and pytest's probes at collection (__test__, ...): no import
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)
