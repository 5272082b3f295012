"""Tiny Triton kernels for the self-test of ``hqlt.kernels.fused.boundscheck`` (tests/test_gpu_fused.py,
interpreter only). A module of its own: it imports triton, which the test module must not need."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def shifted_copy_kernel(x_ptr, y_ptr, N, SHIFT: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """y[i] = x[i + SHIFT] for i < BLOCK; MASKED: only where i + SHIFT < N (else every lane, in bounds or not)."""
    i = tl.arange(0, BLOCK)
    src = i + SHIFT
    if MASKED:
        x = tl.load(x_ptr + src, mask=src < N, other=0.0)
        tl.store(y_ptr + i, x, mask=i < N)
    else:
        x = tl.load(x_ptr + src)
        tl.store(y_ptr + i, x)


@triton.jit
def atomic_add_kernel(x_ptr, N, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if MASKED:
        tl.atomic_add(x_ptr + i, 1.0, mask=i < N)
    else:
        tl.atomic_add(x_ptr + i, 1.0)
