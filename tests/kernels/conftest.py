"""Kernel tests run against the torch references: compiled on a GPU when there is one, else
on CPU in Triton's interpreter (slow, so shapes stay small there)."""

from __future__ import annotations

import os

import torch

# Must happen before any kernel is decorated (the top-level conftest does the same; this
# copy keeps `pytest tests/kernels` and single-file runs working on their own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()

# Interpreter: the dots run in fp32, so only the final rounding to the output dtype differs.
# GPU: P is rounded to fp16/bf16 before the P @ V tensor-core dot, and fp32 uses IEEE dots.
_TOLERANCES = {
    torch.float32: 1e-4 if ON_GPU else 2e-5,
    torch.float16: 1e-2 if ON_GPU else 2e-3,
    torch.bfloat16: 3e-2 if ON_GPU else 2e-2,
}


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="session")
def assert_attention_close():
    """Compare a kernel result with a reference at the tolerance of the kernel's dtype."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
        tol = _TOLERANCES[dtype or actual.dtype]
        torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)

    return check
