"""Fused Synchronous-HQLT forward in Triton (blend="sync", fw="delta"); FUSED_NOTES.md step 2.

What it computes, for fla-layout tensors ``[B, T, H, D]`` (hqlt-reference.md §3.3-3.4, §4.1):

* ``o_kv``: softmax attention of query t over the W keys ``max(0, t-W+1) .. t`` (raw q, k; scale
  ``kv_scale``);
* ``o_fw``: DeltaNet over all tokens <= t on the FW features ``l2(silu(q))``, ``l2(silu(k))``
  (``l2(x) = x / sqrt(|x|^2 + 1e-6)``, as ``hqlt.kernels.reference.l2_normalize``), beta as given (any
  range; the caller scales it), read-out scale ``fw_scale``; or, with ``q_fw``/``k_fw`` given, on those
  already-featurised tensors (the ``hybrid_memory`` contract, where the KV copies may carry RoPE).

Equal to ``reference.chunked_hybrid_memory(q, k, l2(silu(q)), l2(silu(k)), v, beta, blend="sync",
fw="delta", ...)``. RoPE is not applied in the kernel: callers rotate the KV copies before.

Design (three launches; the chunk is 64 tokens, ``n = ceil(T / 64)``; padded positions load as zero,
which makes them no-op writes that come after every real token):

1. ``_wy_kernel``, grid (n, B*H): featurise the chunk's keys in registers, build
   ``A = strict_lower(diag(beta) K K^T)`` as 16x16 blocks, invert the four diagonal blocks by forward
   substitution (row by row, 15 steps each) and solve ``(I + A) [W | U] = diag(beta) [K | V]`` by blocked
   forward substitution (10 block products per right-hand side). Writes ``w`` and ``u`` (dtype of the
   inputs).
2. ``_scan_kernel``, grid (ceil(Dv/BV), B*H), sequential over chunks with the ``Dk x BV`` state ``M`` in
   float32 registers: store ``M`` (the state before the chunk), ``v_new = u - w M``, ``M += K^T v_new``.
   Only two ``64 x Dk x BV`` products per chunk sit on the sequential path.
3. ``_out_kernel``, grid (n, B*H, ceil(Dv/BV)): loads the chunk's q and k tiles once and uses them for
   both memories: FW ``o_fw = fw_scale (Q M + causal(Q K^T) v_new)`` on the featurised copies, KV
   online-softmax over the chunk itself (diagonal block first, so every row has a finite max) and the
   at most ``ceil((W-1)/64)`` previous chunks that the window reaches.

Why not one program per (sequence, head) that does everything in its sequential loop: at B=1, T=32768,
H=8 that is 16 programs for 132 SMs, each walking 512 chunks; the attention and the read-out are
independent of the state, so they stay in a chunk-parallel launch and the sequential kernel does only
the state recurrence (the price: chunk states written and read once, 2*Dk*Dv bytes per chunk and head).

Precision: float32 accumulation everywhere; the large products take operands in the input dtype
(bf16/fp16 on the GPU, as fla does), the 16x16 triangular work runs in float32. float32 inputs work
(TF32 products on a GPU; exact float32 under ``TRITON_INTERPRET=1``, which is how the CPU tests run).

Backward (FUSED_NOTES.md step 3), ``fused_backward``, four launches (plus the forward's wy + scan again
when the chunk states were not kept, ``HQLT_FUSED_SAVE_STATES=0``):

4. ``_kv_bwd_dq_kernel``, grid (n, B*H): delta = rowsum(dO_kv * o_kv) of the chunk's queries (stored) and
   their dq over the key chunks in their windows, probabilities from the forward's log2-domain LSE;
5. ``_kv_bwd_dkdv_kernel``, grid (n, B*H): dk, dv of the chunk's keys over the query chunks that see
   them (no atomics: score tiles are recomputed in both kernels);
6. ``_bwd_scan_kernel``, grid (ceil(Dv/BV), B*H), chunks last to first with dH (gradient w.r.t. the
   state after the chunk) in float32 registers: store dH, dv_new = s causal(Qf Kf^T)^T dO_fw + Kf dH,
   dH += s Qf^T dO_fw - W^T dv_new;
7. ``_fw_bwd_kernel``, grid (n, B*H): dq of the read-out, dk of the read-out and of the state update,
   dW = -dv_new M^T; T = (I + A)^-1 rebuilt as a 64x64 tile; back through [W | U] = T diag(beta)
   [Kf | V] to dk, dv, dbeta; then through l2(silu(.)), plus the KV branch's partial gradients.

``FusedSyncHybrid`` uses it unless ``HQLT_FUSED_BACKWARD=0`` (or ``fused_backward=False``): then the
backward recomputes both outputs with the fla composition (``backend="fla"``) when fla is importable on
the tensors' device, else with the pure-torch chunked reference, and back-propagates through that.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK = 64          # tokens per chunk (fixed: the WY kernel is written as 4 blocks of 16)
MAX_HEAD_DIM = 128  # Dk and Dv; larger heads would need more registers than one tile
MAX_GRID_ROWS = 65535  # CUDA's limit on grid axes y and z; (batch, head) pairs go on axis y
FEATURE_EPS = 1e-6  # l2(x) = x / sqrt(|x|^2 + eps), hqlt-reference.md §1


def interpreting() -> bool:
    """Whether triton runs its CPU interpreter (TRITON_INTERPRET=1, read by triton at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
def _load_rows(ptr, base, row0, T, stride_t, D, ROWS: tl.constexpr, BD: tl.constexpr):
    """Rows row0 .. row0+ROWS-1 (time) x columns 0..BD-1 of one (batch, head); zero outside T and D."""
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, base, row0, T, stride_t, D, x, ROWS: tl.constexpr, BD: tl.constexpr):
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + base + rows[:, None] * stride_t + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_beta(ptr, base, row0, T, stride_t, ROWS: tl.constexpr):
    rows = row0 + tl.arange(0, ROWS)
    return tl.load(ptr + base + rows * stride_t, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def _featurize(x, EPS: tl.constexpr):
    """l2(silu(x)) per row, float32 (zero rows stay zero)."""
    x = x.to(tl.float32)
    x = x * tl.sigmoid(x)
    return x / tl.sqrt_rn(tl.sum(x * x, axis=1) + EPS)[:, None]


@triton.jit
def _fw_rows(raw_ptr, fw_ptr, base, row0, T, stride_t, D, ROWS: tl.constexpr, BD: tl.constexpr,
             FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """FW features of a tile, float32: l2(silu(raw)) computed here, or loaded already featurised."""
    if FEATURIZE:
        x = _featurize(_load_rows(raw_ptr, base, row0, T, stride_t, D, ROWS, BD), EPS)
    else:
        x = _load_rows(fw_ptr, base, row0, T, stride_t, D, ROWS, BD).to(tl.float32)
    return x


@triton.jit
def _inv4_unit_lower16(a0, a1, a2, a3):
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
def _solve4(t0, t1, t2, t3, a10, a20, a21, a30, a31, a32, r0, r1, r2, r3):
    """Blocked forward substitution: (I + A) X = R with A's 16x16 blocks (t_i = diagonal inverses)."""
    x0 = tl.dot(t0, r0)
    x1 = tl.dot(t1, r1 - tl.dot(a10, x0))
    x2 = tl.dot(t2, r2 - tl.dot(a20, x0) - tl.dot(a21, x1))
    x3 = tl.dot(t3, r3 - tl.dot(a30, x0) - tl.dot(a31, x1) - tl.dot(a32, x2))
    return x0, x1, x2, x3


# ==================================================================================================
# Kernel 1: WY representation per chunk.

@triton.jit
def _wy_kernel(k_ptr, kf_ptr, v_ptr, beta_ptr, w_ptr, u_ptr, T, H, DK, DV,
               BK: tl.constexpr, BVW: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV
    bbase = b * T * H + h
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = v_ptr.dtype.element_ty

    k0 = _fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k1 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 16, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k2 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 32, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k3 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 48, T, skt, DK, 16, BK, FEATURIZE, EPS)
    b0 = _load_beta(beta_ptr, bbase, t0, T, H, 16)
    b1 = _load_beta(beta_ptr, bbase, t0 + 16, T, H, 16)
    b2 = _load_beta(beta_ptr, bbase, t0 + 32, T, H, 16)
    b3 = _load_beta(beta_ptr, bbase, t0 + 48, T, H, 16)
    kb0 = k0 * b0[:, None]
    kb1 = k1 * b1[:, None]
    kb2 = k2 * b2[:, None]
    kb3 = k3 * b3[:, None]

    # A_ij = diag(beta_i) K_i K_j^T (16x16 blocks, i >= j); products in the input dtype, fp32 accumulate
    c0 = tl.trans(k0.to(DT))
    c1 = tl.trans(k1.to(DT))
    c2 = tl.trans(k2.to(DT))
    a00 = tl.dot(kb0.to(DT), c0)
    a10 = tl.dot(kb1.to(DT), c0)
    a11 = tl.dot(kb1.to(DT), c1)
    a20 = tl.dot(kb2.to(DT), c0)
    a21 = tl.dot(kb2.to(DT), c1)
    a22 = tl.dot(kb2.to(DT), c2)
    a30 = tl.dot(kb3.to(DT), c0)
    a31 = tl.dot(kb3.to(DT), c1)
    a32 = tl.dot(kb3.to(DT), c2)
    a33 = tl.dot(kb3.to(DT), tl.trans(k3.to(DT)))
    t_0, t_1, t_2, t_3 = _inv4_unit_lower16(a00, a11, a22, a33)

    w0, w1, w2, w3 = _solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32, kb0, kb1, kb2, kb3)
    _store_rows(w_ptr, kbase, t0, T, skt, DK, w0, 16, BK)
    _store_rows(w_ptr, kbase, t0 + 16, T, skt, DK, w1, 16, BK)
    _store_rows(w_ptr, kbase, t0 + 32, T, skt, DK, w2, 16, BK)
    _store_rows(w_ptr, kbase, t0 + 48, T, skt, DK, w3, 16, BK)

    v0 = _load_rows(v_ptr, vbase, t0, T, svt, DV, 16, BVW).to(tl.float32) * b0[:, None]
    v1 = _load_rows(v_ptr, vbase, t0 + 16, T, svt, DV, 16, BVW).to(tl.float32) * b1[:, None]
    v2 = _load_rows(v_ptr, vbase, t0 + 32, T, svt, DV, 16, BVW).to(tl.float32) * b2[:, None]
    v3 = _load_rows(v_ptr, vbase, t0 + 48, T, svt, DV, 16, BVW).to(tl.float32) * b3[:, None]
    u0, u1, u2, u3 = _solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32, v0, v1, v2, v3)
    _store_rows(u_ptr, vbase, t0, T, svt, DV, u0, 16, BVW)
    _store_rows(u_ptr, vbase, t0 + 16, T, svt, DV, u1, 16, BVW)
    _store_rows(u_ptr, vbase, t0 + 32, T, svt, DV, u2, 16, BVW)
    _store_rows(u_ptr, vbase, t0 + 48, T, svt, DV, u3, 16, BVW)


# ==================================================================================================
# Kernel 2: the chunk-state recurrence.

@triton.jit
def _scan_kernel(k_ptr, kf_ptr, w_ptr, u_ptr, vnew_ptr, h_ptr, T, H, NC, DK, DV,
                 BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV + i_v * BV
    skt = H * DK
    svt = H * DV
    dv_left = DV - i_v * BV
    DT = vnew_ptr.dtype.element_ty

    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    h_mask = (rk[:, None] < DK) & (rv[None, :] < dv_left)
    h_off = rk[:, None] * DV + (i_v * BV + rv)[None, :]
    hbase = i_bh * NC * DK * DV

    m = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(NC):
        t0 = c * 64
        tl.store(h_ptr + hbase + c * DK * DV + h_off, m.to(h_ptr.dtype.element_ty), mask=h_mask)
        w = _load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK)
        u = _load_rows(u_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        kf = _fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS)
        v_new = u - tl.dot(w.to(DT), m.to(DT))
        _store_rows(vnew_ptr, vbase, t0, T, svt, dv_left, v_new, 64, BV)
        m += tl.dot(tl.trans(kf.to(DT)), v_new.to(DT))


# ==================================================================================================
# Kernel 3: both memories' outputs per chunk.

@triton.jit
def _out_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, v_ptr, vnew_ptr, h_ptr, okv_ptr, ofw_ptr, lse_ptr,
                T, H, NC, DK, DV, W, kv_scale, fw_scale,
                BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr,
                STORE_LSE: tl.constexpr):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV + i_v * BV
    skt = H * DK
    svt = H * DV
    dv_left = DV - i_v * BV
    t0 = i_c * 64
    DT = v_ptr.dtype.element_ty

    # the chunk's raw q and k: loaded once, used by both memories
    q = _load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
    k = _load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK)
    r = tl.arange(0, 64)
    causal = r[None, :] <= r[:, None]

    # ---- FW: o = fw_scale * (Qf M + causal(Qf Kf^T) v_new)
    if FEATURIZE:
        qf = _featurize(q, EPS).to(DT)
        kf = _featurize(k, EPS).to(DT)
    else:
        qf = _load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        kf = _load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    h_mask = (rk[:, None] < DK) & (rv[None, :] < dv_left)
    m = tl.load(h_ptr + (i_bh * NC + i_c) * DK * DV + rk[:, None] * DV + (i_v * BV + rv)[None, :],
                mask=h_mask, other=0.0)
    v_new = _load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV)
    qk = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)
    o_fw = tl.dot(qf, m.to(DT)) + tl.dot(qk.to(DT), v_new.to(DT))
    _store_rows(ofw_ptr, vbase, t0, T, svt, dv_left, o_fw * fw_scale, 64, BV)

    # ---- KV: online softmax over keys t-W+1 .. t; the diagonal block first (every row sees itself)
    qpos = t0 + r
    scale2 = kv_scale * 1.4426950408889634
    v = _load_rows(v_ptr, vbase, t0, T, svt, dv_left, 64, BV)
    s = tl.dot(q, tl.trans(k)) * scale2
    s = tl.where(causal & (r[:, None] - r[None, :] < W), s, float("-inf"))
    m_i = tl.max(s, axis=1)
    p = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p.to(DT), v.to(DT))
    lo = tl.maximum(t0 - W + 1, 0) // 64
    for kc in range(lo, i_c):
        kk = _load_rows(k_ptr, kbase, kc * 64, T, skt, DK, 64, BK)
        vv = _load_rows(v_ptr, vbase, kc * 64, T, svt, dv_left, 64, BV)
        kpos = kc * 64 + r
        s = tl.dot(q, tl.trans(kk)) * scale2
        s = tl.where(qpos[:, None] - kpos[None, :] < W, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vv.to(DT))
        m_i = m_new
    _store_rows(okv_ptr, vbase, t0, T, svt, dv_left, acc / l_i[:, None], 64, BV)
    if STORE_LSE:
        # log2-domain log-sum-exp of the scaled scores per query row ([B*H, T] float32), for the backward;
        # every value block computes the same numbers, the first one stores them
        if i_v == 0:
            tl.store(lse_ptr + i_bh * T + qpos, m_i + tl.log2(l_i), mask=qpos < T)


# ==================================================================================================
# Backward (FUSED_NOTES.md step 3). Four launches (plus the forward's wy + scan when the states were
# not kept): _kv_bwd_kernel (sliding-window attention, FlashAttention-2 style), _bwd_scan_kernel (the
# reverse state-gradient recurrence), _fw_bwd_kernel (per chunk: dq, dk of the read-out and the state
# update, back through the WY/UT transform to dk, dv, dbeta, then through l2(silu(.))).

@triton.jit
def _featurize_bwd(x, g, EPS: tl.constexpr):
    """Gradient w.r.t. x of l2(silu(x)) per row, given the gradient g w.r.t. the features (float32)."""
    x = x.to(tl.float32)
    sig = tl.sigmoid(x)
    y = x * sig
    n = tl.sqrt_rn(tl.sum(y * y, axis=1) + EPS)
    f = y / n[:, None]
    dy = (g - f * tl.sum(f * g, axis=1)[:, None]) / n[:, None]
    return dy * (sig * (1.0 + x * (1.0 - sig)))


@triton.jit
def _eye_rows(i0, N: tl.constexpr):
    """Rows i0 .. i0+15 of the N x N identity (float32)."""
    r = tl.arange(0, 16)
    c = tl.arange(0, N)
    return tl.where((i0 + r)[:, None] == c[None, :], 1.0, 0.0)


@triton.jit
def _vstack(a, b, R: tl.constexpr, N: tl.constexpr):
    """[a; b] for two R x N tiles (join in a new minor dim, move it to the front, merge it with rows)."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * R, N))


@triton.jit
def _chunk_t_matrix(k_ptr, kf_ptr, beta_ptr, kbase, bbase, t0, T, H, skt, DK,
                    BK: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr, DT: tl.constexpr):
    """T = (I + strict_lower(diag(beta) K K^T))^-1 of one chunk as a 64 x 64 float32 tile (K: FW keys).

    Same blocks as the forward's _wy_kernel (products in the input dtype, the 16x16 diagonal inverses by
    forward substitution), then the four 16-row blocks of T by blocked forward substitution against
    the identity, stacked."""
    k0 = _fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k1 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 16, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k2 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 32, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k3 = _fw_rows(k_ptr, kf_ptr, kbase, t0 + 48, T, skt, DK, 16, BK, FEATURIZE, EPS)
    kb0 = (k0 * _load_beta(beta_ptr, bbase, t0, T, H, 16)[:, None]).to(DT)
    kb1 = (k1 * _load_beta(beta_ptr, bbase, t0 + 16, T, H, 16)[:, None]).to(DT)
    kb2 = (k2 * _load_beta(beta_ptr, bbase, t0 + 32, T, H, 16)[:, None]).to(DT)
    kb3 = (k3 * _load_beta(beta_ptr, bbase, t0 + 48, T, H, 16)[:, None]).to(DT)
    c0 = tl.trans(k0.to(DT))
    c1 = tl.trans(k1.to(DT))
    c2 = tl.trans(k2.to(DT))
    a10 = tl.dot(kb1, c0)
    a20 = tl.dot(kb2, c0)
    a21 = tl.dot(kb2, c1)
    a30 = tl.dot(kb3, c0)
    a31 = tl.dot(kb3, c1)
    a32 = tl.dot(kb3, c2)
    t_0, t_1, t_2, t_3 = _inv4_unit_lower16(tl.dot(kb0, c0), tl.dot(kb1, c1), tl.dot(kb2, c2),
                                            tl.dot(kb3, tl.trans(k3.to(DT))))
    x0, x1, x2, x3 = _solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32,
                             _eye_rows(0, 64), _eye_rows(16, 64), _eye_rows(32, 64), _eye_rows(48, 64))
    return _vstack(_vstack(x0, x1, 16, 64), _vstack(x2, x3, 16, 64), 32, 64)


@triton.jit
def _kv_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                      T, H, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr):
    """Sliding-window softmax backward, queries: grid (n, B*H); program c stores delta = rowsum(dO * O)
    of chunk c's queries ([B*H, T] float32, for _kv_bwd_dkdv_kernel) and their dq, over the key chunks
    their windows reach. Probabilities recomputed from the forward's log2-domain LSE."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = v_ptr.dtype.element_ty
    r = tl.arange(0, 64)
    scale2 = kv_scale * 1.4426950408889634

    q = _load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
    do = _load_rows(do_ptr, vbase, t0, T, svt, DV, 64, BVW)
    delta = tl.sum(do.to(tl.float32) * _load_rows(o_ptr, vbase, t0, T, svt, DV, 64, BVW).to(tl.float32), axis=1)
    qpos = t0 + r
    tl.store(delta_ptr + i_bh * T + qpos, delta, mask=qpos < T)
    lse = tl.load(lse_ptr + i_bh * T + qpos, mask=qpos < T, other=float("inf"))
    dq = tl.zeros((64, BK), dtype=tl.float32)
    lo = tl.maximum(t0 - W + 1, 0) // 64
    for kc in range(lo, i_c + 1):
        kk = _load_rows(k_ptr, kbase, kc * 64, T, skt, DK, 64, BK)
        vv = _load_rows(v_ptr, vbase, kc * 64, T, svt, DV, 64, BVW)
        kpos = kc * 64 + r
        vis = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < W)
        s = tl.dot(q, tl.trans(kk)) * scale2
        p = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DT), kk)
    _store_rows(dq_ptr, kbase, t0, T, skt, DK, dq * kv_scale, 64, BK)


@triton.jit
def _kv_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                        T, H, NC, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr):
    """Sliding-window softmax backward, keys: grid (n, B*H); program c computes dk, dv of chunk c's keys
    over the query chunks that see them (at most 1 + ceil((W-1)/64)). No atomics: every score tile is
    recomputed here and in _kv_bwd_dq_kernel (cheap at W <= 256)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = v_ptr.dtype.element_ty
    r = tl.arange(0, 64)
    scale2 = kv_scale * 1.4426950408889634

    k = _load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK)
    v = _load_rows(v_ptr, vbase, t0, T, svt, DV, 64, BVW)
    kpos = t0 + r
    dk = tl.zeros((64, BK), dtype=tl.float32)
    dv = tl.zeros((64, BVW), dtype=tl.float32)
    hi = tl.minimum(NC - 1, (t0 + 62 + W) // 64)    # the last query that sees key t0+63 is t0+63+W-1
    for qc in range(i_c, hi + 1):
        qq = _load_rows(q_ptr, kbase, qc * 64, T, skt, DK, 64, BK)
        dd = _load_rows(do_ptr, vbase, qc * 64, T, svt, DV, 64, BVW)
        qp = qc * 64 + r
        ll = tl.load(lse_ptr + i_bh * T + qp, mask=qp < T, other=float("inf"))
        de = tl.load(delta_ptr + i_bh * T + qp, mask=qp < T, other=0.0)
        vis = (kpos[None, :] <= qp[:, None]) & (qp[:, None] - kpos[None, :] < W)
        s = tl.dot(qq, tl.trans(k)) * scale2
        p = tl.exp2(tl.where(vis, s - ll[:, None], float("-inf")))
        dv += tl.dot(tl.trans(p).to(DT), dd)
        dp = tl.dot(dd, tl.trans(v))
        ds = p * (dp - de[:, None])
        dk += tl.dot(tl.trans(ds).to(DT), qq)
    _store_rows(dk_ptr, kbase, t0, T, skt, DK, dk * kv_scale, 64, BK)
    _store_rows(dv_ptr, vbase, t0, T, svt, DV, dv, 64, BVW)


@triton.jit
def _bwd_scan_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, w_ptr, do_ptr, dvn_ptr, dh_ptr, T, H, NC, DK, DV, fw_scale,
                     BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """Reverse recurrence of the state gradient, grid (ceil(Dv/BV), B*H), chunks from last to first.

    With dH the gradient w.r.t. the state after chunk c (M_{c+1}): store dH; the total gradient of the
    corrected values dv_new = fw_scale * causal(Qf Kf^T)^T dO + Kf dH (stored, float32); then
    dH <- dH + fw_scale * Qf^T dO - W^T dv_new (the gradient w.r.t. M_c)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV + i_v * BV
    skt = H * DK
    svt = H * DV
    dv_left = DV - i_v * BV
    DT = w_ptr.dtype.element_ty

    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    r = tl.arange(0, 64)
    causal = r[None, :] <= r[:, None]
    h_mask = (rk[:, None] < DK) & (rv[None, :] < dv_left)
    h_off = rk[:, None] * DV + (i_v * BV + rv)[None, :]
    hbase = i_bh * NC * DK * DV

    dh = tl.zeros((BK, BV), dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        t0 = c * 64
        tl.store(dh_ptr + hbase + c * DK * DV + h_off, dh.to(dh_ptr.dtype.element_ty), mask=h_mask)
        kf = _fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT)
        qf = _fw_rows(q_ptr, qf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT)
        w = _load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        do = _load_rows(do_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        a = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)            # a[i, j] = qf_i . kf_j, j <= i
        dvn = fw_scale * tl.dot(tl.trans(a.to(DT)), do) + tl.dot(kf, dh.to(DT))
        _store_rows(dvn_ptr, vbase, t0, T, svt, dv_left, dvn, 64, BV)
        dh += fw_scale * tl.dot(tl.trans(qf), do) - tl.dot(tl.trans(w), dvn.to(DT))


@triton.jit
def _fw_bwd_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, v_ptr, beta_ptr, vnew_ptr, h_ptr, dh_ptr, dvn_ptr, do_ptr,
                   dqkv_ptr, dkkv_ptr, dvkv_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr,
                   T, H, NC, DK, DV, fw_scale,
                   BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """Per chunk (grid (n, B*H)), all of Dk and the value dims in blocks of BV:

    read-out  o = s (Qf M + causal(Qf Kf^T) v_new):  dQf = s (dO M^T + causal(dO v_new^T) Kf),
              dKf += s causal(dO v_new^T)^T Qf;
    update    M' = M + Kf^T v_new, v_new = U - W M:   dKf += v_new dH^T, dW = -dv_new M^T, dU = dv_new;
    WY        [W | U] = T diag(beta) [Kf | V], T = (I + A)^-1, A = strict_lower(diag(beta) Kf Kf^T):
              dR = T^T [dW | dU], dA = -strict_lower(dR [W | U]^T), dKf += beta dR_k + beta (dA Kf)
              + dA^T (beta Kf), dV = beta dR_v, dbeta = rowsum(Kf dR_k + V dR_v + Kf (dA Kf));
    then dq, dk through l2(silu(.)) (FEATURIZE) plus the KV branch's partial gradients (float32
    buffers), and dv = the KV branch's dv + the FW one. Without FEATURIZE dq, dk are the FW features'."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase0 = (b * T * H + h) * DV
    bbase = b * T * H + h
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = v_ptr.dtype.element_ty
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)

    hbase = (i_bh * NC + i_c) * DK * DV
    n_v = tl.cdiv(DV, BV)

    # ---- phase 1 (read-out): dq, and the dk term of causal(Qf Kf^T); frees dq before phase 2
    dq = tl.zeros((64, BK), dtype=tl.float32)
    dp = tl.zeros((64, 64), dtype=tl.float32)
    for i_v in range(0, n_v):
        cv = i_v * BV + tl.arange(0, BV)
        h_off = hbase + rk[:, None] * DV + cv[None, :]
        m = tl.load(h_ptr + h_off, mask=(rk[:, None] < DK) & (cv[None, :] < DV), other=0.0).to(DT)  # M_c
        vnew = _load_rows(vnew_ptr, vbase0 + i_v * BV, t0, T, svt, DV - i_v * BV, 64, BV).to(DT)
        do = _load_rows(do_ptr, vbase0 + i_v * BV, t0, T, svt, DV - i_v * BV, 64, BV).to(DT)
        dq += tl.dot(do, tl.trans(m))
        dp += tl.dot(do, tl.trans(vnew))
    dp = tl.where(r[None, :] <= r[:, None], dp, 0.0).to(DT)
    if FEATURIZE:
        kf = _featurize(_load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), EPS).to(DT)
        qraw = _load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
        qf = _featurize(qraw, EPS).to(DT)
    else:
        kf = _load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        qf = _load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    dq = fw_scale * (dq + tl.dot(dp, kf))
    if FEATURIZE:
        dq = _featurize_bwd(qraw, dq, EPS) + _load_rows(dqkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    _store_rows(dq_ptr, kbase, t0, T, skt, DK, dq, 64, BK)
    dk = fw_scale * tl.dot(tl.trans(dp), qf)

    # ---- phase 2 (state update and WY): dk += v_new dH^T, dW, and per value block dv, dbeta, dA
    tm = _chunk_t_matrix(k_ptr, kf_ptr, beta_ptr, kbase, bbase, t0, T, H, skt, DK, BK, FEATURIZE, EPS, DT)
    tmt = tl.trans(tm)
    beta = _load_beta(beta_ptr, bbase, t0, T, H, 64)
    dw = tl.zeros((64, BK), dtype=tl.float32)
    da = tl.zeros((64, 64), dtype=tl.float32)
    dbeta = tl.zeros((64,), dtype=tl.float32)
    for i_v in range(0, n_v):
        cv = i_v * BV + tl.arange(0, BV)
        h_mask = (rk[:, None] < DK) & (cv[None, :] < DV)
        h_off = hbase + rk[:, None] * DV + cv[None, :]
        m = tl.load(h_ptr + h_off, mask=h_mask, other=0.0).to(DT)           # M_c (Dk x BV)
        dh = tl.load(dh_ptr + h_off, mask=h_mask, other=0.0).to(DT)         # dL/dM_{c+1}
        vbase = vbase0 + i_v * BV
        dv_left = DV - i_v * BV
        vnew = _load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        dvn = _load_rows(dvn_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        vv = _load_rows(v_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        dk += tl.dot(vnew, tl.trans(dh))
        dw -= tl.dot(dvn.to(DT), tl.trans(m))
        drv = tl.dot(tmt, dvn)                                                # T^T dU (float32)
        dbeta += tl.sum(vv * drv, axis=1)
        u = tl.dot(tm, vv * beta[:, None])                                    # U = T diag(beta) V
        da += tl.dot(drv, tl.trans(u))
        dv = drv * beta[:, None] + _load_rows(dvkv_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        _store_rows(dv_ptr, vbase, t0, T, svt, dv_left, dv, 64, BV)

    # ---- phase 3: back through W = T diag(beta) Kf and A = strict_lower(diag(beta) Kf Kf^T)
    kf = _fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT).to(tl.float32)
    kfb = kf * beta[:, None]
    drk = tl.dot(tmt, dw)                                                     # T^T dW
    da += tl.dot(drk, tl.trans(tl.dot(tm, kfb)))                              # + dR_k W^T
    da = tl.where(r[None, :] < r[:, None], -da, 0.0)
    dak = tl.dot(da, kf)
    dk += (drk + dak) * beta[:, None] + tl.dot(tl.trans(da), kfb)
    dbeta += tl.sum(kf * (drk + dak), axis=1)
    tl.store(dbeta_ptr + bbase + (t0 + r) * H, dbeta, mask=t0 + r < T)
    if FEATURIZE:
        dk = _featurize_bwd(_load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), dk, EPS) \
            + _load_rows(dkkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    _store_rows(dk_ptr, kbase, t0, T, skt, DK, dk, 64, BK)


# ==================================================================================================
# Launch configuration.

def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(B: int, H: int, dk: int, dv: int, device) -> dict:
    """Block sizes and warps (not autotuned; ``python -m hqlt.kernels.bench_fused`` sweeps alternatives).

    Chosen so that ptxas reports no register spills for sm_90 (checked by compiling the bf16 kernels for
    ``GPUTarget("cuda", 90, 32)`` on a CPU machine and reading ``cuobjdump --dump-resource-usage``):
    * wy: 4 warps, 8 when a head dim is 128 (4 warps spill 208 B at d = 128);
    * scan: value blocks of 64 columns (32 at Dk = 128: 64 spills even with 8 warps), 8 warps when the
      state tile is >= 64x64 elements; halved down to 16 columns while B*H*blocks < #SMs (the scan is the
      only sequential launch, so it needs programs on every SM);
    * out: 64-column value blocks (two programs per chunk at d = 128, the score tiles recomputed by each;
      128 columns spill), 8 warps at d = 128, else 4.
    """
    BK, BVW = _pow2(dk), _pow2(dv)
    big = max(BK, BVW) > 64
    sms = _sm_count(device)
    scan_bv = 32 if BK > 64 else min(BVW, 64)
    while scan_bv > 16 and B * H * triton.cdiv(dv, scan_bv) < sms:
        scan_bv //= 2
    scan_bv = min(scan_bv, BVW)
    return {"BK": BK, "BVW": BVW,
            "wy_warps": 8 if big else 4,
            "scan_bv": scan_bv, "scan_warps": 8 if (BK > 64 or BK * scan_bv >= 64 * 64) else 4,
            "out_bv": min(BVW, 64), "out_warps": 8 if big else 4,
            "num_stages": 2,
            # backward (step 3): reverse scan like the forward scan; the per-chunk FW backward walks the
            # value dims in blocks of fw_bwd_bv with all of Dk in registers
            "bwd_scan_bv": scan_bv, "bwd_scan_warps": 8 if BK >= 64 else 4,
            "fw_bwd_bv": 16, "fw_bwd_warps": 8,
            "kv_bwd_warps": 8 if max(BK, BVW) >= 64 else 4}


def fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, window: int,
                  kv_scale: float, fw_scale: float, q_fw: torch.Tensor | None = None,
                  k_fw: torch.Tensor | None = None, poison: bool = False, config: dict | None = None,
                  stages: int = 3, return_aux: bool = False):
    """(o_kv, o_fw), each ``[B, T, H, Dv]`` in v's dtype; no autograd (see ``sync_hybrid_memory``).

    q, k: raw KV queries/keys ``[B, T, H, Dk]`` (RoPE'd if wanted). With q_fw, k_fw None the FW features
    are ``l2(silu(q))``, ``l2(silu(k))`` computed in the kernel from the same tiles; otherwise q_fw, k_fw
    are the FW queries/keys as given. q, k, v (and q_fw, k_fw) must share one dtype; beta ``[B, T, H]``
    any float dtype. ``poison`` fills every buffer with NaN first (tests: catches unwritten elements).
    ``config`` overrides entries of ``default_config``; ``stages`` < 3 runs only the first launches
    (benchmarks time the kernels one by one; the outputs are then not written).
    ``return_aux``: return ``(o_kv, o_fw, aux)`` with aux = dict(lse, w, v_new, states) — what the fused
    backward needs: ``lse`` ``[B*H, T]`` float32 (log2-domain log-sum-exp of the KV scores, written only
    when stages == 3), ``w``, ``v_new`` ``[B, T, H, D]`` and the chunk-start states ``[B*H, NC, Dk, Dv]``.
    """
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    featurize = q_fw is None
    if featurize != (k_fw is None):
        raise ValueError("give both q_fw and k_fw, or neither")
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"beta {tuple(beta.shape)}")
    if not featurize and (q_fw.shape != q.shape or k_fw.shape != q.shape):
        raise ValueError("q_fw and k_fw must have the shape of q")
    tensors = [q, k, v] + ([] if featurize else [q_fw, k_fw])
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"q, k, v (and q_fw, k_fw) must share one dtype; got {[t.dtype for t in tensors]}")
    if max(dk, dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM}; got Dk={dk}, Dv={dv}")
    if B * H > MAX_GRID_ROWS:
        raise ValueError(f"B*H = {B * H} exceeds a CUDA grid axis ({MAX_GRID_ROWS}); split the batch")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if not interpreting() and not q.is_cuda:
        raise ValueError("the fused kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    q_fw, k_fw = (q, k) if featurize else (q_fw.contiguous(), k_fw.contiguous())
    cfg = dict(default_config(B, H, dk, dv, q.device), **(config or {}))
    NC = triton.cdiv(T, CHUNK)

    def buf(*shape, dtype=v.dtype):
        return (torch.full(shape, float("nan"), dtype=dtype, device=q.device) if poison
                else torch.empty(shape, dtype=dtype, device=q.device))

    w = buf(B, T, H, dk, dtype=q.dtype)
    u = buf(B, T, H, dv)
    v_new = buf(B, T, H, dv)
    states = buf(B * H, NC, dk, dv)
    o_kv = buf(B, T, H, dv)
    o_fw = buf(B, T, H, dv)
    lse = buf(B * H, T, dtype=torch.float32) if return_aux else o_kv   # o_kv: an unused placeholder
    aux = dict(lse=lse, w=w, v_new=v_new, states=states)

    def result():
        return (o_kv, o_fw, aux) if return_aux else (o_kv, o_fw)

    if T == 0:
        return result()
    common = dict(FEATURIZE=featurize, EPS=FEATURE_EPS)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _wy_kernel[(NC, B * H)](k, k_fw, v, beta, w, u, T, H, dk, dv, BK=cfg["BK"], BVW=cfg["BVW"],
                                num_warps=cfg["wy_warps"], **common)
        if stages < 2:
            return result()
        _scan_kernel[(triton.cdiv(dv, cfg["scan_bv"]), B * H)](
            k, k_fw, w, u, v_new, states, T, H, NC, dk, dv, BK=cfg["BK"], BV=cfg["scan_bv"],
            num_warps=cfg["scan_warps"], num_stages=cfg["num_stages"], **common)
        if stages < 3:
            return result()
        _out_kernel[(NC, B * H, triton.cdiv(dv, cfg["out_bv"]))](
            q, k, q_fw, k_fw, v, v_new, states, o_kv, o_fw, lse, T, H, NC, dk, dv, int(window),
            float(kv_scale), float(fw_scale), BK=cfg["BK"], BV=cfg["out_bv"],
            num_warps=cfg["out_warps"], num_stages=cfg["num_stages"], STORE_LSE=return_aux, **common)
    return result()


def fused_backward(q, k, v, beta, o_kv, lse, do_kv, do_fw, *, window: int, kv_scale: float, fw_scale: float,
                   q_fw=None, k_fw=None, w=None, v_new=None, states=None, poison: bool = False,
                   config: dict | None = None):
    """Gradients of ``fused_forward``'s (o_kv, o_fw) given (do_kv, do_fw); no autograd.

    ``o_kv`` and ``lse`` come from ``fused_forward(..., return_aux=True)``; ``w``, ``v_new``, ``states``
    too when kept, else (any of them None) the forward's wy + scan kernels run again to recompute them.
    Returns ``(dq, dk, dv, dbeta)`` when q_fw, k_fw are None (the FW features l2(silu(q)), l2(silu(k))
    computed in the kernel: dq, dk hold both branches), else ``(dq_kv, dk_kv, dq_fw, dk_fw, dv, dbeta)``.
    Gradients have the dtype of their input. ``poison`` fills every buffer with NaN first (tests).
    """
    featurize = q_fw is None
    B, T, H, dk_ = q.shape
    dv_ = v.shape[-1]
    q, k, v, beta, o_kv = (t.contiguous() for t in (q, k, v, beta, o_kv))
    q_fw, k_fw = (q, k) if featurize else (q_fw.contiguous(), k_fw.contiguous())
    do_kv = do_kv.to(v.dtype).contiguous()
    do_fw = do_fw.to(v.dtype).contiguous()
    cfg = dict(default_config(B, H, dk_, dv_, q.device), **(config or {}))
    NC = triton.cdiv(T, CHUNK)
    if w is None or v_new is None or states is None:
        _, _, aux = fused_forward(q, k, v, beta, window=window, kv_scale=kv_scale, fw_scale=fw_scale,
                                  q_fw=None if featurize else q_fw, k_fw=None if featurize else k_fw,
                                  poison=poison, config=config, stages=2, return_aux=True)
        w, v_new, states = aux["w"], aux["v_new"], aux["states"]

    def buf(shape, dtype):
        return (torch.full(shape, float("nan"), dtype=dtype, device=q.device) if poison
                else torch.empty(shape, dtype=dtype, device=q.device))

    f32 = torch.float32
    dq_kv = buf(q.shape, f32 if featurize else q.dtype)     # partial (summed in _fw_bwd_kernel) or final
    dk_kv = buf(k.shape, f32 if featurize else k.dtype)
    dv_kv = buf(v.shape, f32)
    delta = buf((B * H, T), f32)
    dh = buf((B * H, NC, dk_, dv_), states.dtype)
    dvn = buf(v.shape, f32)
    dq = buf(q.shape, q.dtype if featurize else q_fw.dtype)
    dk = buf(k.shape, k.dtype if featurize else k_fw.dtype)
    dv = buf(v.shape, v.dtype)
    dbeta = buf(beta.shape, f32)
    if T > 0:
        common = dict(FEATURIZE=featurize, EPS=FEATURE_EPS)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            kv = dict(BK=cfg["BK"], BVW=cfg["BVW"], num_warps=cfg["kv_bwd_warps"], num_stages=cfg["num_stages"])
            _kv_bwd_dq_kernel[(NC, B * H)](q, k, v, o_kv, do_kv, lse, delta, dq_kv, T, H, dk_, dv_, int(window),
                                           float(kv_scale), **kv)
            _kv_bwd_dkdv_kernel[(NC, B * H)](q, k, v, do_kv, lse, delta, dk_kv, dv_kv, T, H, NC, dk_, dv_,
                                             int(window), float(kv_scale), **kv)
            _bwd_scan_kernel[(triton.cdiv(dv_, cfg["bwd_scan_bv"]), B * H)](
                q, k, q_fw, k_fw, w, do_fw, dvn, dh, T, H, NC, dk_, dv_, float(fw_scale), BK=cfg["BK"],
                BV=cfg["bwd_scan_bv"], num_warps=cfg["bwd_scan_warps"], num_stages=cfg["num_stages"], **common)
            _fw_bwd_kernel[(NC, B * H)](
                q, k, q_fw, k_fw, v, beta, v_new, states, dh, dvn, do_fw, dq_kv, dk_kv, dv_kv, dq, dk, dv,
                dbeta, T, H, NC, dk_, dv_, float(fw_scale), BK=cfg["BK"], BV=cfg["fw_bwd_bv"],
                num_warps=cfg["fw_bwd_warps"], num_stages=cfg["num_stages"], **common)
    dbeta = dbeta.to(beta.dtype)
    if featurize:
        return dq, dk, dv, dbeta
    return dq_kv, dk_kv, dq, dk, dv, dbeta


# ==================================================================================================
# Autograd: fused forward; fused backward (default) or the recomputed (unfused) backward.

def fused_backward_default() -> bool:
    """``HQLT_FUSED_BACKWARD`` (default "1"): "0" makes ``FusedSyncHybrid`` back-propagate through the
    unfused recomputation (fla composition or reference) instead of the fused backward kernels."""
    return os.environ.get("HQLT_FUSED_BACKWARD", "1") not in ("", "0")


def save_states_default() -> bool:
    """``HQLT_FUSED_SAVE_STATES`` (default "1"): keep the forward's w, v_new and chunk states for the
    fused backward (memory: about 2*Dk*Dv/64 + Dk + Dv elements per token and head in the input dtype,
    4x the size of k at Dk = Dv = 128); "0" recomputes them in the backward (the forward's wy + scan
    kernels once more)."""
    return os.environ.get("HQLT_FUSED_SAVE_STATES", "1") not in ("", "0")


def featurize(x: torch.Tensor) -> torch.Tensor:
    """l2(silu(x)) in float32, differentiable (what the kernel computes when q_fw/k_fw are not given)."""
    x = F.silu(x.float())
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + FEATURE_EPS)


def _fla_usable(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from .backends import cuda_available
    from .backends._glue import fla_available
    return fla_available() and cuda_available()


def unfused_sync_hybrid(q_kv, k_kv, q_fw, k_fw, v, beta, *, window, kv_scale, fw_scale):
    """The same outputs without the fused kernel, differentiable by autograd: the fla composition when
    fla is importable on CUDA, else the pure-torch chunked reference. q_fw/k_fw None: featurised here."""
    if q_fw is None:
        q_fw, k_fw = featurize(q_kv), featurize(k_kv)
    kw = dict(blend="sync", window=int(window), fw="delta", kv_scale=kv_scale, fw_scale=fw_scale, g=None,
              chunk_size=CHUNK)
    if _fla_usable(v):
        from .dispatch import load_backend
        return load_backend("fla").hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kw)
    from .reference import chunked_hybrid_memory
    return chunked_hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kw)


class FusedSyncHybrid(torch.autograd.Function):
    """Forward: the fused Triton kernels. Backward: the fused backward kernels (``fused_backward``), or,
    with ``fused_bwd=False``, the outputs recomputed with ``unfused_sync_hybrid`` (fla composition or
    the chunked reference) under autograd and back-propagated through (costs one extra unfused forward).

    apply(q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale[, fused_bwd[, save_states]]);
    q_fw = k_fw = None: FW features l2(silu(q_kv)), l2(silu(k_kv)) computed in the kernels."""

    @staticmethod
    def forward(ctx, q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale, fused_bwd=None,
                save_states=None):
        fused_bwd = fused_backward_default() if fused_bwd is None else bool(fused_bwd)
        save_states = save_states_default() if save_states is None else bool(save_states)
        ctx.cfg = dict(window=window, kv_scale=kv_scale, fw_scale=fw_scale)
        ctx.fused_bwd = fused_bwd
        if not fused_bwd:
            o_kv, o_fw = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale,
                                       fw_scale=fw_scale, q_fw=q_fw, k_fw=k_fw)
            ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta)
            return o_kv, o_fw
        o_kv, o_fw, aux = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale,
                                        fw_scale=fw_scale, q_fw=q_fw, k_fw=k_fw, return_aux=True)
        kept = (aux["w"], aux["v_new"], aux["states"]) if save_states else (None, None, None)
        ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, aux["lse"], *kept)
        return o_kv, o_fw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_kv, do_fw):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        if ctx.fused_bwd:
            q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states = saved
            if do_kv is None:
                do_kv = torch.zeros_like(o_kv)
            if do_fw is None:
                do_fw = torch.zeros_like(o_kv)
            g = fused_backward(q_kv, k_kv, v, beta, o_kv, lse, do_kv, do_fw, q_fw=q_fw, k_fw=k_fw, w=w,
                               v_new=v_new, states=states, **ctx.cfg)
            if q_fw is None:
                dq, dk, dv, dbeta = g
                g = (dq, dk, None, None, dv, dbeta)
            result = [x if n else None for x, n in zip(g, needs)]
            return (*result, None, None, None, None, None)
        needs = ctx.needs_input_grad[:6]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
            outs = unfused_sync_hybrid(*leaves, **ctx.cfg)
            wanted = [x for x, n in zip(leaves, needs) if x is not None and n]
            grads = iter(torch.autograd.grad(outs, wanted, (do_kv, do_fw), allow_unused=True)) if wanted else iter(())
        result = [next(grads) if (x is not None and n) else None for x, n in zip(leaves, needs)]
        return (*result, None, None, None, None, None)


def sync_hybrid_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, window: int,
                       kv_scale: float | None = None, fw_scale: float | None = None,
                       q_fw: torch.Tensor | None = None, k_fw: torch.Tensor | None = None,
                       fused_backward: bool | None = None, save_states: bool | None = None):
    """Synchronous-HQLT memories with the fused forward: ``(o_kv, o_fw)``, each ``[B, T, H, Dv]``.

    q, k raw ``[B, T, H, Dk]`` (KV branch, optionally RoPE'd by the caller); FW features l2(silu(q)),
    l2(silu(k)) are computed in the kernel unless q_fw, k_fw are given. beta ``[B, T, H]`` already in the
    caller's range (e.g. 2*sigmoid). Scales default to Dk^-1/2. Trainable: ``fused_backward`` (default
    ``HQLT_FUSED_BACKWARD``, on) picks the fused backward kernels over the unfused recomputation;
    ``save_states`` (default ``HQLT_FUSED_SAVE_STATES``, on) keeps the forward's chunk states for it
    (``FusedSyncHybrid``).
    """
    d = q.shape[-1]
    kv_scale = d ** -0.5 if kv_scale is None else float(kv_scale)
    fw_scale = d ** -0.5 if fw_scale is None else float(fw_scale)
    return FusedSyncHybrid.apply(q, k, q_fw, k_fw, v, beta, int(window), kv_scale, fw_scale, fused_backward,
                                 save_states)


__all__ = ["fused_forward", "fused_backward", "fused_backward_default", "save_states_default",
           "sync_hybrid_memory", "FusedSyncHybrid", "unfused_sync_hybrid", "featurize",
           "default_config", "interpreting", "CHUNK", "MAX_HEAD_DIM", "MAX_GRID_ROWS"]
