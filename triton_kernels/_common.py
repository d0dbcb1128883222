"""Launcher helpers shared by the Triton kernel files: dtypes, the interpreter flag, the GPU's SM count and
compute capability, vocab splits."""
from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float32_math(launcher):
    """A launcher of float32-only kernels that also takes all-float64 inputs (CPU tensors under the interpreter,
    where the C++ kernels compute in float64): they are computed in float32 and the outputs returned as float64,
    so every backend honours one contract."""
    @functools.wraps(launcher)
    def run(*args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not tensors or any(t.dtype != torch.float64 for t in tensors):  # mixed dtypes: the launcher's checks
            return launcher(*args)
        narrow = [a.float() if isinstance(a, Tensor) and a.dtype == torch.float64 else a for a in args]
        return tuple(t.double() for t in launcher(*narrow))

    return run


def interpreting() -> bool:
    """Triton runs kernels in numpy (TRITON_INTERPRET=1): bf16 tl.dot is wrong there, so callers upcast."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[int, int]:
    """(multiprocessor count, compute capability as 10 * major + minor) of CUDA device `index`: everything the
    launchers' tile and split choices read of the GPU (scripts/triton_compile_matrix.py stands in for it)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, 10 * props.major + props.minor


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    return _device_info(_index(device))[0]


def capability(device: torch.device) -> int:
    """10 * major + minor (80 for A100, 90 for H100 / H200)."""
    return _device_info(_index(device))[1]


def vocab_splits(work_items: int, n_tiles: int, device: torch.device, num_splits: int | None) -> tuple[int, int]:
    """-> (splits, tiles_per_split): split the vocabulary only when `work_items` programs leave SMs idle.

    Aims at 4 programs per SM; re-balanced so no split is left without a tile. `num_splits` overrides (tests).
    """
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        return num_splits, triton.cdiv(n_tiles, num_splits)
    splits = 1
    if device.type == "cuda" and n_tiles > 1:
        target = 4 * sm_count(device)
        if work_items < target:
            splits = min(n_tiles, triton.cdiv(target, work_items))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def check_row_vector(name: str, t: Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    """A per-row float32 input (lse, entropy, upstream grads): contiguous, `shape`, on `device`; None passes."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.dtype != torch.float32 or t.device != device:
        raise ValueError(f"{name} must be a contiguous float32 {tuple(shape)} tensor on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")
