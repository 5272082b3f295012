"""Forward kernels of the fused Synchronous-HQLT memories (FUSED_NOTES.md step 2); launched by
``launch.fused_forward``.

Design (three launches; the chunk is 64 tokens, ``n = ceil(T / 64)``; padded positions load as zero,
which makes them no-op writes that come after every real token):

1. ``wy_kernel``, grid (n, B*H): featurise the chunk's keys in registers (and store them when the scan is to
   read them, ``settings.scan_features`` "stored"), build
   ``A = strict_lower(diag(beta) K K^T)`` as 16x16 blocks, invert the four diagonal blocks by forward
   substitution (row by row, 15 steps each) and solve ``(I + A) [W | U] = diag(beta) [K | V]`` by blocked
   forward substitution (10 block products per right-hand side). Writes ``w`` and ``u`` (dtype of the
   inputs), and with ``STORE_T`` the chunk's whole ``T = (I + A)^-1`` for the backward (settings.FW_BWD_T "fwd").
   Under settings "wy_parts" 2 the grid is (n, B*H, 2): W (and the features, T) in one program, U in the other.
2. ``scan_kernel``, grid (ceil(Dv/BV), B*H), sequential over chunks with the ``Dk x BV`` state ``M`` in
   float32 registers: store ``M`` (the state before the chunk), ``v_new = u - w M``, ``M += K^T v_new``.
   Only two ``64 x Dk x BV`` products per chunk sit on the sequential path; with "stored" key features the
   featurisation (silu, a row norm) leaves it too. Where those programs would not fill the SMs (long T, small
   B*H), the scan runs in segments instead (``launch.fused_forward``, settings "scan_segment_chunks"): each
   segment's transition and local pass at once, a walk over the segments, then each segment's final pass.
3. ``out_kernel``, grid (n, B*H, ceil(Dv/BV)): loads the chunk's q and k tiles once and uses them for
   both memories: FW ``o_fw = fw_scale (Q M + causal(Q K^T) v_new)`` on the featurised copies, KV
   online-softmax over the chunk itself (diagonal block first, so every row has a finite max) and the
   at most ``ceil((W-1)/64)`` previous chunks that the window reaches.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import eye_rows, featurize_rows, fw_rows, inv4_unit_lower16, load_beta, load_rows, solve4, store_rows


# ==================================================================================================
# Kernel 1: WY representation per chunk.

@triton.jit
def _store_blocks4(ptr, base, t0, T, st, D, x0, x1, x2, x3, BD: tl.constexpr):
    """Four 16-row blocks of one chunk, rows t0 .. t0 + 63."""
    store_rows(ptr, base, t0, T, st, D, x0, 16, BD)
    store_rows(ptr, base, t0 + 16, T, st, D, x1, 16, BD)
    store_rows(ptr, base, t0 + 32, T, st, D, x2, 16, BD)
    store_rows(ptr, base, t0 + 48, T, st, D, x3, 16, BD)


@triton.jit
def _wy_u(v_ptr, u_ptr, vbase, t0, T, svt, DV, b0, b1, b2, b3, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32,
          BVW: tl.constexpr):
    """U = (I + A)^-1 diag(beta) V of the chunk, stored in u's dtype."""
    v0 = load_rows(v_ptr, vbase, t0, T, svt, DV, 16, BVW).to(tl.float32) * b0[:, None]
    v1 = load_rows(v_ptr, vbase, t0 + 16, T, svt, DV, 16, BVW).to(tl.float32) * b1[:, None]
    v2 = load_rows(v_ptr, vbase, t0 + 32, T, svt, DV, 16, BVW).to(tl.float32) * b2[:, None]
    v3 = load_rows(v_ptr, vbase, t0 + 48, T, svt, DV, 16, BVW).to(tl.float32) * b3[:, None]
    u0, u1, u2, u3 = solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32, v0, v1, v2, v3)
    _store_blocks4(u_ptr, vbase, t0, T, svt, DV, u0, u1, u2, u3, BVW)


@triton.jit
def _wy_t(t_ptr, i_bh, NC, i_c, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32):
    """T = (I + A)^-1 of the chunk for the backward's fw_bwd_wy_kernel (settings.FW_BWD_T "fwd"): the blocks solved
    against the identity, float32 [B*H, NC, 64, 64]; the backward then skips wy_t_kernel."""
    x0, x1, x2, x3 = solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32,
                            eye_rows(0, 64), eye_rows(16, 64), eye_rows(32, 64), eye_rows(48, 64))
    tbase = (i_bh * NC + i_c) * 4096
    _store_blocks4(t_ptr, tbase, 0, 64, 64, 64, x0, x1, x2, x3, 64)


@triton.jit
def wy_kernel(k_ptr, kf_ptr, v_ptr, beta_ptr, w_ptr, u_ptr, kfo_ptr, t_ptr, T, H, NC, DK, DV,
              BK: tl.constexpr, BVW: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr,
              STORE_KF: tl.constexpr, STORE_T: tl.constexpr, PARTS: tl.constexpr = 1):
    """W, U (and the key features, T) of one chunk; grid (n, B*H, PARTS). PARTS 2 (settings.WY_PARTS): program 0 of
    axis 2 stores W, the key features and T, program 1 U; each builds A and the diagonal inverses itself."""
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

    k0 = fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k1 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 16, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k2 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 32, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k3 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 48, T, skt, DK, 16, BK, FEATURIZE, EPS)
    b0 = load_beta(beta_ptr, bbase, t0, T, H, 16)
    b1 = load_beta(beta_ptr, bbase, t0 + 16, T, H, 16)
    b2 = load_beta(beta_ptr, bbase, t0 + 32, T, H, 16)
    b3 = load_beta(beta_ptr, bbase, t0 + 48, T, H, 16)
    if PARTS == 1:
        if STORE_KF:   # the key features for the scan (settings.scan_features "stored"), in the inputs' dtype
            _store_blocks4(kfo_ptr, kbase, t0, T, skt, DK, k0, k1, k2, k3, BK)
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
    t_0, t_1, t_2, t_3 = inv4_unit_lower16(a00, a11, a22, a33)

    if PARTS == 1:
        w0, w1, w2, w3 = solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32, kb0, kb1, kb2, kb3)
        _store_blocks4(w_ptr, kbase, t0, T, skt, DK, w0, w1, w2, w3, BK)
        _wy_u(v_ptr, u_ptr, vbase, t0, T, svt, DV, b0, b1, b2, b3, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32,
              BVW)
        if STORE_T:
            _wy_t(t_ptr, i_bh, NC, i_c, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32)
    else:
        # twice the programs for a kernel that is latency-bound at d 128 (255 registers, 2 programs per SM); the
        # registers are the larger branch's, so the W branch bounds what this saves (FUSED_NOTES.md "wy in two programs")
        if tl.program_id(2) == 0:
            if STORE_KF:
                _store_blocks4(kfo_ptr, kbase, t0, T, skt, DK, k0, k1, k2, k3, BK)
            w0, w1, w2, w3 = solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32, kb0, kb1, kb2, kb3)
            _store_blocks4(w_ptr, kbase, t0, T, skt, DK, w0, w1, w2, w3, BK)
            if STORE_T:
                _wy_t(t_ptr, i_bh, NC, i_c, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32)
        else:
            _wy_u(v_ptr, u_ptr, vbase, t0, T, svt, DV, b0, b1, b2, b3, t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31,
                  a32, BVW)


# ==================================================================================================
# Kernel 2: the chunk-state recurrence.

@triton.jit
def scan_kernel(k_ptr, kf_ptr, w_ptr, u_ptr, vnew_ptr, h_ptr, carry_ptr, T, H, NC, L, DK, DV,
                BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr, SEG: tl.constexpr):
    """The chunk-state recurrence, grid (ceil(Dv/BV), B*H, segments), chunks from first to last.

    Segments (``settings`` "scan_segment_chunks" L; segment s holds chunks s*L .. min(NC, (s+1)*L) - 1), as in the
    reverse scan (``bwd.bwd_scan_kernel``) with time running forward. SEG 0: one segment, L >= NC. SEG 1, the local
    pass of segments 0 .. S-2 (grid axis 2 is S - 1): start from M = 0, store nothing per chunk, and leave the state
    the segment ends with in carry_ptr's slot of the segment (float32 [B*H, S, Dk, Dv]). SEG 2, the final pass of
    every segment: start from the state the segment receives, which ``bwd.bwd_scan_carry_kernel`` (FORWARD) left in
    the slot, and store M and v_new as SEG 0 does."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
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
    cbase = (i_bh * tl.cdiv(NC, L) + i_s) * DK * DV

    if SEG == 2:
        m = tl.load(carry_ptr + cbase + h_off, mask=h_mask, other=0.0)
    else:
        m = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(i_s * L, tl.minimum(NC, (i_s + 1) * L)):
        t0 = c * 64
        if SEG != 1:
            tl.store(h_ptr + hbase + c * DK * DV + h_off, m.to(h_ptr.dtype.element_ty), mask=h_mask)
        w = load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK)
        u = load_rows(u_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        kft = tl.trans(fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT))
        v_new = u - tl.dot(w.to(DT), m.to(DT))
        if SEG != 1:
            store_rows(vnew_ptr, vbase, t0, T, svt, dv_left, v_new, 64, BV)
        m += tl.dot(kft, v_new.to(DT))
    if SEG == 1:
        tl.store(carry_ptr + cbase + h_off, m, mask=h_mask)


# ==================================================================================================
# Kernel 3: both memories' outputs per chunk.

@triton.jit
def out_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, v_ptr, vnew_ptr, h_ptr, okv_ptr, ofw_ptr, lse_ptr,
               T, H, NC, DK, DV, W, kv_scale, fw_scale,
               BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr,
               STORE_LSE: tl.constexpr, V_FIRST: tl.constexpr):
    # V_FIRST: grid (value blocks, n, B*H), so the programs of one chunk run side by side and the later ones read
    # the chunk's q, k (and features) from L2 (settings "out_order" "value"); else grid (n, B*H, value blocks)
    if V_FIRST:
        i_v = tl.program_id(0)
        i_c = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
    else:
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
    q = load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
    k = load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK)
    r = tl.arange(0, 64)
    causal = r[None, :] <= r[:, None]

    # ---- FW: o = fw_scale * (Qf M + causal(Qf Kf^T) v_new)
    if FEATURIZE:
        qf = featurize_rows(q, EPS).to(DT)
        kf = featurize_rows(k, EPS).to(DT)
    else:
        qf = load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        kf = load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    h_mask = (rk[:, None] < DK) & (rv[None, :] < dv_left)
    m = tl.load(h_ptr + (i_bh * NC + i_c) * DK * DV + rk[:, None] * DV + (i_v * BV + rv)[None, :],
                mask=h_mask, other=0.0)
    v_new = load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV)
    qk = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)
    o_fw = tl.dot(qf, m.to(DT)) + tl.dot(qk.to(DT), v_new.to(DT))
    store_rows(ofw_ptr, vbase, t0, T, svt, dv_left, o_fw * fw_scale, 64, BV)

    # ---- KV: online softmax over keys t-W+1 .. t; the diagonal block first (every row sees itself)
    qpos = t0 + r
    scale2 = kv_scale * 1.4426950408889634
    v = load_rows(v_ptr, vbase, t0, T, svt, dv_left, 64, BV)
    s = tl.dot(q, tl.trans(k)) * scale2
    s = tl.where(causal & (r[:, None] - r[None, :] < W), s, float("-inf"))
    m_i = tl.max(s, axis=1)
    p = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p.to(DT), v.to(DT))
    lo = tl.maximum(t0 - W + 1, 0) // 64
    for kc in range(lo, i_c):
        kk = load_rows(k_ptr, kbase, kc * 64, T, skt, DK, 64, BK)
        vv = load_rows(v_ptr, vbase, kc * 64, T, svt, dv_left, 64, BV)
        kpos = kc * 64 + r
        s = tl.dot(q, tl.trans(kk)) * scale2
        s = tl.where(qpos[:, None] - kpos[None, :] < W, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vv.to(DT))
        m_i = m_new
    store_rows(okv_ptr, vbase, t0, T, svt, dv_left, acc / l_i[:, None], 64, BV)
    if STORE_LSE:
        # log2-domain log-sum-exp of the scaled scores per query row ([B*H, T] float32), for the backward;
        # every value block computes the same numbers, the first one stores them
        if i_v == 0:
            tl.store(lse_ptr + i_bh * T + qpos, m_i + tl.log2(l_i), mask=qpos < T)
