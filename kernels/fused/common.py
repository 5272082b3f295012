"""Triton tile helpers shared by the forward (``fwd``) and backward (``bwd``) kernels of the fused
Synchronous-HQLT memories, and the interpreter shim that runs when ``TRITON_INTERPRET=1``."""
from __future__ import annotations

import triton
import triton.language as tl

from .settings import interpreting


def _interpreter_numpy_shim() -> None:
    """triton 3.6's interpreter turns a scalar into an int with ``int(array_of_shape_(1,))``, which
    NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so a loop
    with a runtime bound fails under TRITON_INTERPRET=1. Re-patch ``__index__`` with ``.item()``."""
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - layout of another triton version
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_hqlt_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._hqlt_shim = True
    _interp._patch_lang_tensor = patched


if interpreting():
    _interpreter_numpy_shim()


# ==================================================================================================
# Triton helpers.

@triton.jit
def load_rows(ptr, base, row0, T, stride_t, D, ROWS: tl.constexpr, BD: tl.constexpr):
    """Rows row0 .. row0+ROWS-1 (time) x columns 0..BD-1 of one (batch, head); zero outside T and D."""
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, base, row0, T, stride_t, D, x, ROWS: tl.constexpr, BD: tl.constexpr):
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + base + rows[:, None] * stride_t + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_beta(ptr, base, row0, T, stride_t, ROWS: tl.constexpr):
    rows = row0 + tl.arange(0, ROWS)
    return tl.load(ptr + base + rows * stride_t, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def featurize_rows(x, EPS: tl.constexpr):
    """l2(silu(x)) per row, float32 (zero rows stay zero)."""
    x = x.to(tl.float32)
    x = x * tl.sigmoid(x)
    return x / tl.sqrt_rn(tl.sum(x * x, axis=1) + EPS)[:, None]


@triton.jit
def fw_rows(raw_ptr, fw_ptr, base, row0, T, stride_t, D, ROWS: tl.constexpr, BD: tl.constexpr,
            FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """FW features of a tile, float32: l2(silu(raw)) computed here, or loaded already featurised."""
    if FEATURIZE:
        x = featurize_rows(load_rows(raw_ptr, base, row0, T, stride_t, D, ROWS, BD), EPS)
    else:
        x = load_rows(fw_ptr, base, row0, T, stride_t, D, ROWS, BD).to(tl.float32)
    return x


@triton.jit
def inv4_unit_lower16(a0, a1, a2, a3):
    """(I + strict_lower(a_b))^-1 for four independent 16x16 float32 blocks, by forward substitution
    row by row: x[i, :] = e_i - sum_j n[i, j] x[j, :]. The four blocks share one loop (independent
    work for the scheduler); n[i, :] is read as column i of n^T, so the row index j lands on the rows of
    x without a layout conversion inside the loop."""
    r = tl.arange(0, 16)
    lower = r[:, None] > r[None, :]
    n0 = tl.trans(tl.where(lower, a0, 0.0))
    n1 = tl.trans(tl.where(lower, a1, 0.0))
    n2 = tl.trans(tl.where(lower, a2, 0.0))
    n3 = tl.trans(tl.where(lower, a3, 0.0))
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    x0 = eye
    x1 = eye
    x2 = eye
    x3 = eye
    for i in range(1, 16):
        pick = r[None, :] == i
        row_i = r[:, None] == i
        c0 = tl.sum(tl.sum(tl.where(pick, n0, 0.0), axis=1)[:, None] * x0, axis=0)
        c1 = tl.sum(tl.sum(tl.where(pick, n1, 0.0), axis=1)[:, None] * x1, axis=0)
        c2 = tl.sum(tl.sum(tl.where(pick, n2, 0.0), axis=1)[:, None] * x2, axis=0)
        c3 = tl.sum(tl.sum(tl.where(pick, n3, 0.0), axis=1)[:, None] * x3, axis=0)
        x0 = tl.where(row_i, x0 - c0[None, :], x0)      # row i was e_i
        x1 = tl.where(row_i, x1 - c1[None, :], x1)
        x2 = tl.where(row_i, x2 - c2[None, :], x2)
        x3 = tl.where(row_i, x3 - c3[None, :], x3)
    return x0, x1, x2, x3


@triton.jit
def eye_rows(i0, N: tl.constexpr):
    """Rows i0 .. i0+15 of the N x N identity (float32)."""
    r = tl.arange(0, 16)
    c = tl.arange(0, N)
    return tl.where((i0 + r)[:, None] == c[None, :], 1.0, 0.0)


@triton.jit
def solve4(t0, t1, t2, t3, a10, a20, a21, a30, a31, a32, r0, r1, r2, r3):
    """Blocked forward substitution: (I + A) X = R with A's 16x16 blocks (t_i = diagonal inverses)."""
    x0 = tl.dot(t0, r0)
    x1 = tl.dot(t1, r1 - tl.dot(a10, x0))
    x2 = tl.dot(t2, r2 - tl.dot(a20, x0) - tl.dot(a21, x1))
    x3 = tl.dot(t3, r3 - tl.dot(a30, x0) - tl.dot(a31, x1) - tl.dot(a32, x2))
    return x0, x1, x2, x3
