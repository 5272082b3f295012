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

Backward is NOT fused: ``sync_hybrid_memory`` / ``FusedSyncHybrid`` recompute both outputs in their
backward with the fla composition (``backend="fla"``) when fla is importable on the tensors' device, else
with the pure-torch chunked reference, and back-propagate through that (FUSED_NOTES.md, step 3 is the
fused backward).
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
def _out_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, v_ptr, vnew_ptr, h_ptr, okv_ptr, ofw_ptr,
                T, H, NC, DK, DV, W, kv_scale, fw_scale,
                BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
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
            "num_stages": 2}


def fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, window: int,
                  kv_scale: float, fw_scale: float, q_fw: torch.Tensor | None = None,
                  k_fw: torch.Tensor | None = None, poison: bool = False, config: dict | None = None,
                  stages: int = 3):
    """(o_kv, o_fw), each ``[B, T, H, Dv]`` in v's dtype; no autograd (see ``sync_hybrid_memory``).

    q, k: raw KV queries/keys ``[B, T, H, Dk]`` (RoPE'd if wanted). With q_fw, k_fw None the FW features
    are ``l2(silu(q))``, ``l2(silu(k))`` computed in the kernel from the same tiles; otherwise q_fw, k_fw
    are the FW queries/keys as given. q, k, v (and q_fw, k_fw) must share one dtype; beta ``[B, T, H]``
    any float dtype. ``poison`` fills every buffer with NaN first (tests: catches unwritten elements).
    ``config`` overrides entries of ``default_config``; ``stages`` < 3 runs only the first launches
    (benchmarks time the kernels one by one; the outputs are then not written).
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
    if T == 0:
        return o_kv, o_fw
    common = dict(FEATURIZE=featurize, EPS=FEATURE_EPS)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _wy_kernel[(NC, B * H)](k, k_fw, v, beta, w, u, T, H, dk, dv, BK=cfg["BK"], BVW=cfg["BVW"],
                                num_warps=cfg["wy_warps"], **common)
        if stages < 2:
            return o_kv, o_fw
        _scan_kernel[(triton.cdiv(dv, cfg["scan_bv"]), B * H)](
            k, k_fw, w, u, v_new, states, T, H, NC, dk, dv, BK=cfg["BK"], BV=cfg["scan_bv"],
            num_warps=cfg["scan_warps"], num_stages=cfg["num_stages"], **common)
        if stages < 3:
            return o_kv, o_fw
        _out_kernel[(NC, B * H, triton.cdiv(dv, cfg["out_bv"]))](
            q, k, q_fw, k_fw, v, v_new, states, o_kv, o_fw, T, H, NC, dk, dv, int(window),
            float(kv_scale), float(fw_scale), BK=cfg["BK"], BV=cfg["out_bv"],
            num_warps=cfg["out_warps"], num_stages=cfg["num_stages"], **common)
    return o_kv, o_fw


# ==================================================================================================
# Autograd: fused forward, recomputed (unfused) backward.

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
    """Forward: the fused Triton kernel. Backward: NOT fused — recomputes the outputs with
    ``unfused_sync_hybrid`` (fla composition or the chunked reference) under autograd and
    back-propagates through that recomputation (costs one extra unfused forward)."""

    @staticmethod
    def forward(ctx, q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale):
        o_kv, o_fw = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale, fw_scale=fw_scale,
                                   q_fw=q_fw, k_fw=k_fw)
        ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta)
        ctx.cfg = dict(window=window, kv_scale=kv_scale, fw_scale=fw_scale)
        return o_kv, o_fw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_kv, do_fw):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
            outs = unfused_sync_hybrid(*leaves, **ctx.cfg)
            wanted = [x for x, n in zip(leaves, needs) if x is not None and n]
            grads = iter(torch.autograd.grad(outs, wanted, (do_kv, do_fw), allow_unused=True)) if wanted else iter(())
        result = [next(grads) if (x is not None and n) else None for x, n in zip(leaves, needs)]
        return (*result, None, None, None)


def sync_hybrid_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, window: int,
                       kv_scale: float | None = None, fw_scale: float | None = None,
                       q_fw: torch.Tensor | None = None, k_fw: torch.Tensor | None = None):
    """Synchronous-HQLT memories with the fused forward: ``(o_kv, o_fw)``, each ``[B, T, H, Dv]``.

    q, k raw ``[B, T, H, Dk]`` (KV branch, optionally RoPE'd by the caller); FW features l2(silu(q)),
    l2(silu(k)) are computed in the kernel unless q_fw, k_fw are given. beta ``[B, T, H]`` already in the
    caller's range (e.g. 2*sigmoid). Scales default to Dk^-1/2. Trainable; the backward is not fused
    (``FusedSyncHybrid``).
    """
    d = q.shape[-1]
    kv_scale = d ** -0.5 if kv_scale is None else float(kv_scale)
    fw_scale = d ** -0.5 if fw_scale is None else float(fw_scale)
    return FusedSyncHybrid.apply(q, k, q_fw, k_fw, v, beta, int(window), kv_scale, fw_scale)


__all__ = ["fused_forward", "sync_hybrid_memory", "FusedSyncHybrid", "unfused_sync_hybrid", "featurize",
           "default_config", "interpreting", "CHUNK", "MAX_HEAD_DIM", "MAX_GRID_ROWS"]
