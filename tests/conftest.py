"""Test setup shared by every test file.

- Without a GPU, Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be set before
  triton is first imported, which is why it happens here.
- `poison` (autouse): torch.empty / at::empty return NaN-filled memory while a test runs, so an output element a
  kernel forgets to write shows up as NaN instead of passing by luck.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def poison():
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Each test picks its backend explicitly; never inherit one from the shell."""
    monkeypatch.delenv("HOTLOOP_BACKEND", raising=False)
    monkeypatch.delenv("HOTLOOP_CPU_ISA", raising=False)
