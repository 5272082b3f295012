"""Backward kernels of the fused Synchronous-HQLT memories (FUSED_NOTES.md step 3), launched by
``launch.fused_backward``: four launches (plus the forward's wy + scan again when the chunk states were
not kept, ``HQLT_FUSED_SAVE_STATES=0``):

4. ``kv_bwd_dq_kernel``, grid (n, B*H): delta = rowsum(dO_kv * o_kv) of the chunk's queries (stored) and
   their dq over the key chunks in their windows, probabilities from the forward's log2-domain LSE;
5. ``kv_bwd_dkdv_kernel``, grid (n, B*H): dk, dv of the chunk's keys over the query chunks that see
   them (no atomics: score tiles are recomputed in both kernels);
6. ``bwd_scan_kernel``, grid (ceil(Dv/BV), B*H), chunks last to first with dH (gradient w.r.t. the
   state after the chunk) in float32 registers: store dH, dv_new = s causal(Qf Kf^T)^T dO_fw + Kf dH,
   dH += s Qf^T dO_fw - W^T dv_new; at small B*H*ceil(Dv/BV) (programs for at most half the SMs) it runs segmented
   (``settings`` "bwd_scan_segment_chunks", FUSED_NOTES.md "Round 9"): ``bwd_scan_phi_kernel`` (each segment's
   transition) and a local pass of every segment in parallel, ``bwd_scan_carry_kernel`` (a short walk over the
   segments), then the final pass of every segment from the dH it receives;
7. ``fw_bwd_kernel``, grid (n, B*H): dq of the read-out, dk of the read-out and of the state update,
   dW = -dv_new M^T; T = (I + A)^-1 rebuilt as a 64x64 tile; back through [W | U] = T diag(beta)
   [Kf | V] to dk, dv, dbeta; then through l2(silu(.)), plus the KV branch's partial gradients.

4 and 5 are the sliding-window attention backward, FlashAttention-2 style; 6 is the reverse
state-gradient recurrence; 7 goes back through the WY/UT transform. With ``HQLT_FUSED_FW_BWD=split``
(FUSED_NOTES.md "Round 3") 7 is replaced by ``fw_bwd_dq_kernel`` (before 6, which then runs with
``LOCAL_IN``), ``fw_bwd_wy_kernel`` and ``fw_bwd_dk_kernel`` (after 6): six launches, fewer live tiles each. Helpers: ``_featurize_bwd`` (back
through l2(silu(.))) and ``_chunk_t_matrix`` (T = (I + A)^-1 of a chunk, from the same blocks as the
forward's ``wy_kernel``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import eye_rows, featurize_rows, fw_rows, inv4_unit_lower16, load_beta, load_rows, solve4, store_rows


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
def _vstack(a, b, R: tl.constexpr, N: tl.constexpr):
    """[a; b] for two R x N tiles (join in a new minor dim, move it to the front, merge it with rows)."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * R, N))


@triton.jit
def _chunk_t_matrix(k_ptr, kf_ptr, beta_ptr, kbase, bbase, t0, T, H, skt, DK,
                    BK: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr, DT: tl.constexpr):
    """T = (I + strict_lower(diag(beta) K K^T))^-1 of one chunk as a 64 x 64 float32 tile (K: FW keys).

    Same blocks as the forward's wy_kernel (products in the input dtype, the 16x16 diagonal inverses by
    forward substitution), then the four 16-row blocks of T by blocked forward substitution against
    the identity, stacked."""
    k0 = fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k1 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 16, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k2 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 32, T, skt, DK, 16, BK, FEATURIZE, EPS)
    k3 = fw_rows(k_ptr, kf_ptr, kbase, t0 + 48, T, skt, DK, 16, BK, FEATURIZE, EPS)
    kb0 = (k0 * load_beta(beta_ptr, bbase, t0, T, H, 16)[:, None]).to(DT)
    kb1 = (k1 * load_beta(beta_ptr, bbase, t0 + 16, T, H, 16)[:, None]).to(DT)
    kb2 = (k2 * load_beta(beta_ptr, bbase, t0 + 32, T, H, 16)[:, None]).to(DT)
    kb3 = (k3 * load_beta(beta_ptr, bbase, t0 + 48, T, H, 16)[:, None]).to(DT)
    c0 = tl.trans(k0.to(DT))
    c1 = tl.trans(k1.to(DT))
    c2 = tl.trans(k2.to(DT))
    a10 = tl.dot(kb1, c0)
    a20 = tl.dot(kb2, c0)
    a21 = tl.dot(kb2, c1)
    a30 = tl.dot(kb3, c0)
    a31 = tl.dot(kb3, c1)
    a32 = tl.dot(kb3, c2)
    t_0, t_1, t_2, t_3 = inv4_unit_lower16(tl.dot(kb0, c0), tl.dot(kb1, c1), tl.dot(kb2, c2),
                                           tl.dot(kb3, tl.trans(k3.to(DT))))
    x0, x1, x2, x3 = solve4(t_0, t_1, t_2, t_3, a10, a20, a21, a30, a31, a32,
                            eye_rows(0, 64), eye_rows(16, 64), eye_rows(32, 64), eye_rows(48, 64))
    return _vstack(_vstack(x0, x1, 16, 64), _vstack(x2, x3, 16, 64), 32, 64)


@triton.jit
def _kv_dq_rows(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, i_bh, kbase, vbase, t0, T, H, DK, DV, W,
                kv_scale, BK: tl.constexpr, BVW: tl.constexpr, BM: tl.constexpr, STORE_DELTA: tl.constexpr):
    """dq of queries t0 .. t0 + BM - 1 of one (batch, head) over the 64-key chunks their windows reach (stored),
    probabilities recomputed from the forward's log2-domain LSE; delta = rowsum(dO * O) of those queries computed
    here, and stored ([B*H, T] float32) for kv_bwd_dkdv_kernel with STORE_DELTA."""
    skt = H * DK
    svt = H * DV
    DT = v_ptr.dtype.element_ty
    r = tl.arange(0, BM)
    rn = tl.arange(0, 64)
    scale2 = kv_scale * 1.4426950408889634
    q = load_rows(q_ptr, kbase, t0, T, skt, DK, BM, BK)
    do = load_rows(do_ptr, vbase, t0, T, svt, DV, BM, BVW)
    delta = tl.sum(do.to(tl.float32) * load_rows(o_ptr, vbase, t0, T, svt, DV, BM, BVW).to(tl.float32), axis=1)
    qpos = t0 + r
    if STORE_DELTA:
        tl.store(delta_ptr + i_bh * T + qpos, delta, mask=qpos < T)
    lse = tl.load(lse_ptr + i_bh * T + qpos, mask=qpos < T, other=float("inf"))
    dq = tl.zeros((BM, BK), dtype=tl.float32)
    lo = tl.maximum(t0 - W + 1, 0) // 64
    hi = tl.minimum(t0 + BM, T) - 1   # the last query of the block; rows past T have lse inf (p = 0)
    for kc in range(lo, hi // 64 + 1):
        kk = load_rows(k_ptr, kbase, kc * 64, T, skt, DK, 64, BK)
        vv = load_rows(v_ptr, vbase, kc * 64, T, svt, DV, 64, BVW)
        kpos = kc * 64 + rn
        vis = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < W)
        s = tl.dot(q, tl.trans(kk)) * scale2
        p = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DT), kk)
    store_rows(dq_ptr, kbase, t0, T, skt, DK, dq * kv_scale, BM, BK)


@triton.jit
def _kv_dkdv_rows(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, i_bh, kbase, vbase, t0, T, H,
                  NC, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr, BM: tl.constexpr,
                  DELTA_FROM_O: tl.constexpr):
    """dk, dv of keys t0 .. t0 + BM - 1 of one (batch, head) over the 64-query chunks that see them (at most
    ceil((BM + W - 1) / 64)), stored; delta of those queries loaded from kv_bwd_dq_kernel's buffer, or with
    DELTA_FROM_O computed from dO and O here."""
    skt = H * DK
    svt = H * DV
    DT = v_ptr.dtype.element_ty
    r = tl.arange(0, BM)
    rn = tl.arange(0, 64)
    scale2 = kv_scale * 1.4426950408889634
    k = load_rows(k_ptr, kbase, t0, T, skt, DK, BM, BK)
    v = load_rows(v_ptr, vbase, t0, T, svt, DV, BM, BVW)
    kpos = t0 + r
    dk = tl.zeros((BM, BK), dtype=tl.float32)
    dv = tl.zeros((BM, BVW), dtype=tl.float32)
    hi = tl.minimum(NC - 1, (t0 + BM - 2 + W) // 64)    # the last query that sees key t0+BM-1 is t0+BM-1+W-1
    for qc in range(t0 // 64, hi + 1):
        qq = load_rows(q_ptr, kbase, qc * 64, T, skt, DK, 64, BK)
        dd = load_rows(do_ptr, vbase, qc * 64, T, svt, DV, 64, BVW)
        qp = qc * 64 + rn
        ll = tl.load(lse_ptr + i_bh * T + qp, mask=qp < T, other=float("inf"))
        if DELTA_FROM_O:
            de = tl.sum(dd.to(tl.float32) * load_rows(o_ptr, vbase, qc * 64, T, svt, DV, 64, BVW).to(tl.float32),
                        axis=1)
        else:
            de = tl.load(delta_ptr + i_bh * T + qp, mask=qp < T, other=0.0)
        if BM == 64:   # queries x keys, transposed into the products (round 11's form, the one run on GPUs)
            vis = (kpos[None, :] <= qp[:, None]) & (qp[:, None] - kpos[None, :] < W)
            s = tl.dot(qq, tl.trans(k)) * scale2
            p = tl.exp2(tl.where(vis, s - ll[:, None], float("-inf")))
            dv += tl.dot(tl.trans(p).to(DT), dd)
            dp = tl.dot(dd, tl.trans(v))
            ds = p * (dp - de[:, None])
            dk += tl.dot(tl.trans(ds).to(DT), qq)
        else:   # keys x queries from the start: at 128 rows and 8 warps (sm_90, bf16) 0 B of spills at d 64 and
            # 436 B at d 128, against 344 B and 1,192 B for the form above (FUSED_NOTES.md "Round 12")
            vis = (kpos[:, None] <= qp[None, :]) & (qp[None, :] - kpos[:, None] < W)
            st = tl.dot(k, tl.trans(qq)) * scale2
            pt = tl.exp2(tl.where(vis, st - ll[None, :], float("-inf")))
            dv += tl.dot(pt.to(DT), dd)
            dpt = tl.dot(v, tl.trans(dd))
            dk += tl.dot((pt * (dpt - de[None, :])).to(DT), qq)
    store_rows(dk_ptr, kbase, t0, T, skt, DK, dk * kv_scale, BM, BK)
    store_rows(dv_ptr, vbase, t0, T, svt, DV, dv, BM, BVW)


@triton.jit
def kv_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                     T, H, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr, BM: tl.constexpr):
    """Sliding-window softmax backward, queries: grid (ceil(T / BM), B*H); program c stores delta = rowsum(dO * O)
    of queries c*BM .. c*BM + BM - 1 ([B*H, T] float32, for kv_bwd_dkdv_kernel) and their dq, over the 64-key
    chunks their windows reach. Probabilities recomputed from the forward's log2-domain LSE. BM (64 or 128, a launch
    config's "kv_dq_rows"): with 128 rows each key tile loaded serves twice the queries (FUSED_NOTES.md "Round 12")."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    _kv_dq_rows(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, i_bh, (b * T * H + h) * DK,
                (b * T * H + h) * DV, i_c * BM, T, H, DK, DV, W, kv_scale, BK, BVW, BM, True)


@triton.jit
def kv_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       T, H, NC, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr, BM: tl.constexpr):
    """Sliding-window softmax backward, keys: grid (ceil(T / BM), B*H); program c computes dk, dv of keys
    c*BM .. c*BM + BM - 1 over the 64-query chunks that see them (at most ceil((BM + W - 1) / 64)). No atomics:
    every score tile is recomputed here and in kv_bwd_dq_kernel (cheap at small W). BM: "kv_dkdv_rows", as in
    kv_bwd_dq_kernel."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    # o_ptr unused (delta comes from kv_bwd_dq_kernel): do_ptr stands in
    _kv_dkdv_rows(q_ptr, k_ptr, v_ptr, do_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, i_bh, (b * T * H + h) * DK,
                  (b * T * H + h) * DV, i_c * BM, T, H, NC, DK, DV, W, kv_scale, BK, BVW, BM, False)


@triton.jit
def kv_bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
                  T, H, NC, DK, DV, W, kv_scale, BK: tl.constexpr, BVW: tl.constexpr):
    """kv_bwd_dq_kernel and kv_bwd_dkdv_kernel for one 64-row chunk in one program (a launch config's "kv_bwd"
    "fused", 64-row tiles): grid (n, B*H). Program c first computes dq of queries c*64 .. c*64 + 63 over the key
    chunks their windows reach, then dk, dv of the same chunk's keys over the query chunks that see them; the
    second phase finds its chunk's k, v, q, dO, O and the neighbours' tiles in L2 (this program and its neighbours
    loaded them just before), so each tensor is read from DRAM about once instead of once per kernel. delta =
    rowsum(dO * O) of a query chunk is recomputed where it is needed, not stored. The same per-element sums as the
    two kernels (FUSED_NOTES.md "Round 17"). dq first: ptxas allots fewer registers than to the other order (sm_90,
    bf16, 8 warps: 226 instead of 255 at d 64; 124 B of spills instead of about 220 at d 128)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase = (b * T * H + h) * DV
    # lse_ptr stands in for the delta buffer neither phase uses
    _kv_dq_rows(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, lse_ptr, dq_ptr, i_bh, kbase, vbase, i_c * 64, T, H, DK,
                DV, W, kv_scale, BK, BVW, 64, False)
    _kv_dkdv_rows(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, lse_ptr, dk_ptr, dv_ptr, i_bh, kbase, vbase, i_c * 64,
                  T, H, NC, DK, DV, W, kv_scale, BK, BVW, 64, True)


@triton.jit
def bwd_scan_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, w_ptr, do_ptr, dvn_ptr, dh_ptr, carry_ptr, T, H, NC, L, DK, DV,
                    fw_scale, BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr,
                    LOCAL_IN: tl.constexpr, PRE_QDO: tl.constexpr, SEG: tl.constexpr):
    """Reverse recurrence of the state gradient, grid (ceil(Dv/BV), B*H), chunks from last to first.

    With dH the gradient w.r.t. the state after chunk c (M_{c+1}): store dH; the total gradient of the
    corrected values dv_new = fw_scale * causal(Qf Kf^T)^T dO + Kf dH (stored, float32); then
    dH <- dH + fw_scale * Qf^T dO - W^T dv_new (the gradient w.r.t. M_c).

    LOCAL_IN: the chunk-local term fw_scale * causal(Qf Kf^T)^T dO is already in dvn_ptr (written by the
    chunk-parallel ``fw_bwd_dq_kernel``, split FW backward): read it instead of computing it here, which
    takes the 64 x 64 x Dk score product (half the FLOPs of a step at 16-column value blocks) off the
    sequential path. PRE_QDO (with LOCAL_IN): the read-out term fw_scale * Qf^T dO of each chunk is already in
    dh_ptr's slot of that chunk (written by ``fw_bwd_dq_kernel``); a step reads it before storing dH there, so
    neither Qf nor dO is loaded on the sequential path.

    Segments (``settings`` "bwd_scan_segment_chunks" L; grid axis 2; segment s holds chunks s*L .. min(NC, (s+1)*L)
    - 1). SEG 0: one segment, L >= NC (the whole sequence, as described above). SEG 1, the local pass of segments
    1 .. S-1 (grid axis 2 is S - 1): start from dH = 0 at the segment's end, store nothing per chunk, and leave the
    dH the segment passes on (without what later segments contribute) in carry_ptr's slot of the segment
    (float32 [B*H, S, Dk, Dv]). SEG 2, the final pass of every segment: start from the dH the segment receives, which
    ``bwd_scan_carry_kernel`` left in the slot, and store dH and dv_new as SEG 0 does."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    if SEG == 1:   # the local pass skips segment 0: nothing reads what it would pass on
        i_s += 1
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

    c_hi = tl.minimum(NC, (i_s + 1) * L)
    cbase = (i_bh * tl.cdiv(NC, L) + i_s) * DK * DV
    if SEG == 2:
        dh = tl.load(carry_ptr + cbase + h_off, mask=h_mask, other=0.0)
    else:
        dh = tl.zeros((BK, BV), dtype=tl.float32)
    for cc in range(c_hi - i_s * L):
        c = c_hi - 1 - cc
        t0 = c * 64
        if PRE_QDO:   # read this chunk's fw_scale * Qf^T dO before dH takes its slot
            qdo = tl.load(dh_ptr + hbase + c * DK * DV + h_off, mask=h_mask, other=0.0).to(tl.float32)
        if SEG != 1:
            tl.store(dh_ptr + hbase + c * DK * DV + h_off, dh.to(dh_ptr.dtype.element_ty), mask=h_mask)
        kf = fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT)
        if not PRE_QDO:
            qf = fw_rows(q_ptr, qf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT)
        w = load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        if not PRE_QDO:
            do = load_rows(do_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        if LOCAL_IN:
            dvn = load_rows(dvn_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32) + tl.dot(kf, dh.to(DT))
        else:
            a = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)            # a[i, j] = qf_i . kf_j, j <= i
            dvn = fw_scale * tl.dot(tl.trans(a.to(DT)), do) + tl.dot(kf, dh.to(DT))
        if SEG != 1:
            store_rows(dvn_ptr, vbase, t0, T, svt, dv_left, dvn, 64, BV)
        if PRE_QDO:
            dh += qdo - tl.dot(tl.trans(w), dvn.to(DT))
        else:
            dh += fw_scale * tl.dot(tl.trans(qf), do) - tl.dot(tl.trans(w), dvn.to(DT))
    if SEG == 1:
        tl.store(carry_ptr + cbase + h_off, dh, mask=h_mask)


@triton.jit
def bwd_scan_phi_kernel(k_ptr, kf_ptr, w_ptr, phi_ptr, T, H, NC, L, DK, s0, BK: tl.constexpr, BP: tl.constexpr,
                        FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """Segmented scans, grid (ceil(Dk/BP), B*H, S - 1): for segments s0 .. s0 + S - 2 (reverse scan: s0 = 1; forward
    scan: s0 = 0), the map Phi_s from the dH segment s receives at its end to the dH it passes on, i.e. the product
    over its chunks of A_c = I - W_c^T Kf_c (a step of ``bwd_scan_kernel`` without the inputs' terms:
    dH <- dH - W^T (Kf dH), products in the inputs' dtype as there), built by walking the chunks from the identity;
    columns i_p*BP .. of Phi_s, float32, in phi_ptr [B*H, S, Dk, Dk]. Its transpose is the forward scan's map of
    the segment's state (a step M <- M - Kf^T (W M), chunks in the other order).
    Kf: the FW keys' features (FEATURIZE: computed from the raw keys here, as the scans do)."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2) + s0
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    skt = H * DK
    DT = w_ptr.dtype.element_ty
    rk = tl.arange(0, BK)
    rp = i_p * BP + tl.arange(0, BP)
    phi = tl.where(rk[:, None] == rp[None, :], 1.0, 0.0)
    c_hi = tl.minimum(NC, (i_s + 1) * L)
    for cc in range(c_hi - i_s * L):
        t0 = (c_hi - 1 - cc) * 64
        kf = fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT)
        w = load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        phi -= tl.dot(tl.trans(w), tl.dot(kf, phi.to(DT)).to(DT))
    # Phi_s - I is stored: the carry walk adds the identity's part exactly and rounds only the rest (as the scan's
    # steps round only W^T (Kf dH))
    phi -= tl.where(rk[:, None] == rp[None, :], 1.0, 0.0)
    tl.store(phi_ptr + (i_bh * tl.cdiv(NC, L) + i_s) * DK * DK + rk[:, None] * DK + rp[None, :], phi,
             mask=(rk[:, None] < DK) & (rp[None, :] < DK))


@triton.jit
def bwd_scan_carry_kernel(phi_ptr, carry_ptr, NC, L, DK, DV, BK: tl.constexpr, BV: tl.constexpr,
                          FORWARD: tl.constexpr):
    """Segmented scans, grid (ceil(Dv/BV), B*H), between the local and the final passes: walks the S segments with
    G, what a segment receives, and E_s, the local pass's result in carry_ptr's slot s, which G_s replaces there
    once read. Reverse scan (``bwd_scan_kernel``): from the last segment to the first, G = 0 for the last,
    G_{s-1} = Phi_s G_s + E_s (slot 0 gets G_0). FORWARD (``fwd.scan_kernel``): from the first to the last, G = 0
    for the first, G_{s+1} = Phi_s^T G_s + E_s (slot S-1 gets G_{S-1}). phi_ptr holds Phi_s - I
    (``bwd_scan_phi_kernel``): G + (Phi_s - I) G with the product in tf32 (float32 inputs rounded to 10 mantissa
    bits, the identity's part exact)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    NS = tl.cdiv(NC, L)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    h_mask = (rk[:, None] < DK) & (rv[None, :] < DV - i_v * BV)
    h_off = rk[:, None] * DV + (i_v * BV + rv)[None, :]
    p_mask = (rk[:, None] < DK) & (rk[None, :] < DK)
    if FORWARD:   # the transpose: element [i, j] of the tile is Phi_s[j, i]
        p_off = rk[None, :] * DK + rk[:, None]
    else:
        p_off = rk[:, None] * DK + rk[None, :]
    g = tl.zeros((BK, BV), dtype=tl.float32)
    for ss in range(NS - 1):
        if FORWARD:
            s = ss
        else:
            s = NS - 1 - ss
        slot = carry_ptr + (i_bh * NS + s) * DK * DV + h_off
        e = tl.load(slot, mask=h_mask, other=0.0)
        tl.store(slot, g, mask=h_mask)
        dphi = tl.load(phi_ptr + (i_bh * NS + s) * DK * DK + p_off, mask=p_mask, other=0.0)
        g += tl.dot(dphi, g, input_precision="tf32") + e
    if FORWARD:
        last = NS - 1
    else:
        last = 0
    tl.store(carry_ptr + (i_bh * NS + last) * DK * DV + h_off, g, mask=h_mask)


@triton.jit
def fw_bwd_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, v_ptr, beta_ptr, vnew_ptr, h_ptr, dh_ptr, dvn_ptr, do_ptr,
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
    # dp^T is accumulated as its own product rather than transposed from dp: on sm_90 (triton 3.6) the
    # transposed fp16 tile fed to tl.dot addressed shared memory out of range at dk 32 (compute-sanitizer,
    # B 1 T 100 H 3 dk 32 dv 64 W 16); one more 64x64xBV product per value block is cheap beside the rest.
    dpt = tl.zeros((64, 64), dtype=tl.float32)
    for i_v in range(0, n_v):
        cv = i_v * BV + tl.arange(0, BV)
        h_off = hbase + rk[:, None] * DV + cv[None, :]
        m = tl.load(h_ptr + h_off, mask=(rk[:, None] < DK) & (cv[None, :] < DV), other=0.0).to(DT)  # M_c
        vnew = load_rows(vnew_ptr, vbase0 + i_v * BV, t0, T, svt, DV - i_v * BV, 64, BV).to(DT)
        do = load_rows(do_ptr, vbase0 + i_v * BV, t0, T, svt, DV - i_v * BV, 64, BV).to(DT)
        dq += tl.dot(do, tl.trans(m))
        dp += tl.dot(do, tl.trans(vnew))
        dpt += tl.dot(vnew, tl.trans(do))
    dp = tl.where(r[None, :] <= r[:, None], dp, 0.0).to(DT)
    dpt = tl.where(r[:, None] <= r[None, :], dpt, 0.0).to(DT)
    if FEATURIZE:
        kf = featurize_rows(load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), EPS).to(DT)
        qraw = load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
        qf = featurize_rows(qraw, EPS).to(DT)
    else:
        kf = load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        qf = load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    dq = fw_scale * (dq + tl.dot(dp, kf))
    if FEATURIZE:
        dq = _featurize_bwd(qraw, dq, EPS) + load_rows(dqkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    store_rows(dq_ptr, kbase, t0, T, skt, DK, dq, 64, BK)
    dk = fw_scale * tl.dot(dpt, qf)

    # ---- phase 2 (state update and WY): dk += v_new dH^T, dW, and per value block dv, dbeta, dA
    tm = _chunk_t_matrix(k_ptr, kf_ptr, beta_ptr, kbase, bbase, t0, T, H, skt, DK, BK, FEATURIZE, EPS, DT)
    tmt = tl.trans(tm)
    beta = load_beta(beta_ptr, bbase, t0, T, H, 64)
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
        vnew = load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        dvn = load_rows(dvn_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        vv = load_rows(v_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        dk += tl.dot(vnew, tl.trans(dh))
        dw -= tl.dot(dvn.to(DT), tl.trans(m))
        drv = tl.dot(tmt, dvn)                                                # T^T dU (float32)
        dbeta += tl.sum(vv * drv, axis=1)
        u = tl.dot(tm, vv * beta[:, None])                                    # U = T diag(beta) V
        da += tl.dot(drv, tl.trans(u))
        dv = drv * beta[:, None] + load_rows(dvkv_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        store_rows(dv_ptr, vbase, t0, T, svt, dv_left, dv, 64, BV)

    # ---- phase 3: back through W = T diag(beta) Kf and A = strict_lower(diag(beta) Kf Kf^T)
    kf = fw_rows(k_ptr, kf_ptr, kbase, t0, T, skt, DK, 64, BK, FEATURIZE, EPS).to(DT).to(tl.float32)
    kfb = kf * beta[:, None]
    drk = tl.dot(tmt, dw)                                                     # T^T dW
    da += tl.dot(drk, tl.trans(tl.dot(tm, kfb)))                              # + dR_k W^T
    da = tl.where(r[None, :] < r[:, None], -da, 0.0)
    dak = tl.dot(da, kf)
    dk += (drk + dak) * beta[:, None] + tl.dot(tl.trans(da), kfb)
    dbeta += tl.sum(kf * (drk + dak), axis=1)
    tl.store(dbeta_ptr + bbase + (t0 + r) * H, dbeta, mask=t0 + r < T)
    if FEATURIZE:
        dk = _featurize_bwd(load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), dk, EPS) \
            + load_rows(dkkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    store_rows(dk_ptr, kbase, t0, T, skt, DK, dk, 64, BK)


# ==================================================================================================
# The FW backward split in two launches (``HQLT_FUSED_FW_BWD=split``, FUSED_NOTES.md "Round 3"): the same
# gradients as ``fw_bwd_kernel``, whose one program per chunk held dq, dk, dW (64 x Dk float32 each), T, T^T,
# dA, dP, dP^T (64 x 64 float32 each) and spilled 1.9 KB per thread at Dk = 128 on sm_90.

@triton.jit
def fw_bwd_dq_kernel(q_ptr, k_ptr, qf_ptr, kf_ptr, vnew_ptr, h_ptr, do_ptr, dqkv_ptr, dq_ptr, dvn_ptr, dh_ptr,
                     T, H, NC, DK, DV, fw_scale,
                     BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr,
                     PRE_QDO: tl.constexpr):
    """Read-out side of the FW backward, grid (n, B*H); needs only the forward's chunk states and v_new, so
    it runs before the reverse scan:

    dQf = s (dO M^T + causal(dO v_new^T) Kf) -> through l2(silu(.)) plus the KV partial (FEATURIZE) -> dq
    stored. FEATURIZE: the features l2(silu(q)), l2(silu(k)) are computed here from the raw q, k and stored
    (input dtype) in qf_ptr, kf_ptr, so the later kernels (and the sequential reverse scan) load them instead
    of recomputing them; else qf_ptr, kf_ptr hold the given features. Also the chunk-local part of the corrected values' gradient, s causal(Qf Kf^T)^T dO, stored in
    dvn_ptr (float32) for ``bwd_scan_kernel(LOCAL_IN=True)``, which adds Kf dH to it. The transposed score
    tile is its own product (Kf Qf^T), not a transposed computed tile. PRE_QDO: also the reverse scan's
    read-out term fw_scale * Qf^T dO of the chunk, stored in its slot of dh_ptr (``bwd_scan_kernel``)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase0 = (b * T * H + h) * DV
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = vnew_ptr.dtype.element_ty
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    hbase = (i_bh * NC + i_c) * DK * DV

    if FEATURIZE:
        qraw = load_rows(q_ptr, kbase, t0, T, skt, DK, 64, BK)
        qf = featurize_rows(qraw, EPS).to(DT)
        kf = featurize_rows(load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), EPS).to(DT)
        store_rows(qf_ptr, kbase, t0, T, skt, DK, qf, 64, BK)   # for the reverse scan and the dk kernels
        store_rows(kf_ptr, kbase, t0, T, skt, DK, kf, 64, BK)
    else:
        qf = load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
        kf = load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    at = tl.where(r[:, None] <= r[None, :], tl.dot(kf, tl.trans(qf)), 0.0).to(DT)   # at[j, i] = kf_j . qf_i, j <= i
    dq = tl.zeros((64, BK), dtype=tl.float32)
    dp = tl.zeros((64, 64), dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        m = tl.load(h_ptr + hbase + rk[:, None] * DV + cv[None, :], mask=(rk[:, None] < DK) & (cv[None, :] < DV),
                    other=0.0).to(DT)                                           # M_c (Dk x BV)
        vbase = vbase0 + i_v * BV
        dv_left = DV - i_v * BV
        vnew = load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        do = load_rows(do_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        dq += tl.dot(do, tl.trans(m))
        dp += tl.dot(do, tl.trans(vnew))
        store_rows(dvn_ptr, vbase, t0, T, svt, dv_left, fw_scale * tl.dot(at, do), 64, BV)
        if PRE_QDO:
            tl.store(dh_ptr + hbase + rk[:, None] * DV + cv[None, :],
                     (fw_scale * tl.dot(tl.trans(qf), do)).to(dh_ptr.dtype.element_ty),
                     mask=(rk[:, None] < DK) & (cv[None, :] < DV))
    dp = tl.where(r[None, :] <= r[:, None], dp, 0.0).to(DT)
    dq = fw_scale * (dq + tl.dot(dp, kf))
    if FEATURIZE:
        dq = _featurize_bwd(qraw, dq, EPS) + load_rows(dqkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    store_rows(dq_ptr, kbase, t0, T, skt, DK, dq, 64, BK)


@triton.jit
def wy_t_kernel(kf_ptr, beta_ptr, t_ptr, T, H, NC, DK, BK: tl.constexpr):
    """T = (I + A)^-1 of every chunk, grid (n, B*H), stored float32 as 64 x 64 per chunk for ``fw_bwd_wy_kernel``
    (``settings.FW_BWD_T`` "pre"): the same tile that kernel builds itself otherwise, built here by a program that
    holds nothing else."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    r = tl.arange(0, 64)
    tm = _chunk_t_matrix(kf_ptr, kf_ptr, beta_ptr, (b * T * H + h) * DK, b * T * H + h, i_c * 64, T, H, H * DK, DK,
                         BK, False, 0.0, kf_ptr.dtype.element_ty)
    tl.store(t_ptr + (i_bh * NC + i_c) * 4096 + r[:, None] * 64 + r[None, :], tm)


@triton.jit
def fw_bwd_wy_kernel(kf_ptr, v_ptr, beta_ptr, w_ptr, h_ptr, dvn_ptr, dvkv_ptr, dkw_ptr, dv_ptr, dbeta_ptr, t_ptr,
                     u_ptr, T, H, NC, DK, DV, BK: tl.constexpr, BV: tl.constexpr, T_PRE: tl.constexpr,
                     U_FWD: tl.constexpr):
    """WY side of the FW backward, grid (n, B*H), after the reverse scan (dv_new): dv, dbeta, and the WY part
    of dKf (stored float32 in dkw_ptr for ``fw_bwd_dk_kernel``).

    Per value block: dR_v = T^T dv_new, dR_k -= dR_v M^T (= T^T dW with dW = -dv_new M^T: dW is never formed),
    dV = beta dR_v (+ the KV dv, stored), dbeta += rowsum(V dR_v), dA += dR_v U^T with U = T diag(beta) V.
    After it: dA = -strict_lower(dA + dR_k W^T) with the forward's stored W; dKf_wy = beta (dR_k + dA Kf)
    + dA^T (beta Kf) (stored), dbeta += rowsum(Kf (dR_k + dA Kf)) (stored). Kf: the FW keys' features
    (given, or stored by ``fw_bwd_dq_kernel``). ``T_PRE``: T comes from ``wy_t_kernel`` or the forward (t_ptr)
    instead of being built here. ``U_FWD``: U is loaded from the forward's ``u`` (u_ptr, [B, T, H, Dv] in v's dtype;
    ``settings.FW_BWD_U`` "fwd") instead of being recomputed per value block."""
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

    if T_PRE:
        tm = tl.load(t_ptr + (i_bh * NC + i_c) * 4096 + r[:, None] * 64 + r[None, :])
    else:
        tm = _chunk_t_matrix(kf_ptr, kf_ptr, beta_ptr, kbase, bbase, t0, T, H, skt, DK, BK, False, 0.0, DT)
    tmt = tl.trans(tm)
    beta = load_beta(beta_ptr, bbase, t0, T, H, 64)
    drk = tl.zeros((64, BK), dtype=tl.float32)
    da = tl.zeros((64, 64), dtype=tl.float32)
    dbeta = tl.zeros((64,), dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        m = tl.load(h_ptr + hbase + rk[:, None] * DV + cv[None, :], mask=(rk[:, None] < DK) & (cv[None, :] < DV),
                    other=0.0).to(DT)                                           # M_c (Dk x BV)
        vbase = vbase0 + i_v * BV
        dv_left = DV - i_v * BV
        dvn = load_rows(dvn_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        vv = load_rows(v_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        drv = tl.dot(tmt, dvn)                                                # T^T dU (float32)
        drk -= tl.dot(drv.to(DT), tl.trans(m))                                # T^T dW, dW = -dU M^T
        dbeta += tl.sum(vv * drv, axis=1)
        if U_FWD:
            # the forward's U, as wy_kernel stored it (rounded to the inputs' dtype): the same U the forward's scan
            # used for v_new = U - W M, read instead of the 64 x 64 x BV product
            u = load_rows(u_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        else:
            u = tl.dot(tm, vv * beta[:, None])                                # U = T diag(beta) V, float32
        da += tl.dot(drv, tl.trans(u))
        dv = drv * beta[:, None] + load_rows(dvkv_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(tl.float32)
        store_rows(dv_ptr, vbase, t0, T, svt, dv_left, dv, 64, BV)

    # back through W = T diag(beta) Kf and A = strict_lower(diag(beta) Kf Kf^T)
    w = load_rows(w_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    da = tl.dot(drk.to(DT), tl.trans(w), acc=da)                              # + dR_k W^T
    da = tl.where(r[None, :] < r[:, None], -da, 0.0)
    kf = load_rows(kf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    g = tl.dot(da.to(DT), kf, acc=drk)                                        # dR_k + dA Kf
    dbeta += tl.sum(kf.to(tl.float32) * g, axis=1)
    tl.store(dbeta_ptr + bbase + (t0 + r) * H, dbeta, mask=t0 + r < T)
    dkw = tl.dot(tl.trans(da), kf.to(tl.float32) * beta[:, None], acc=g * beta[:, None])
    store_rows(dkw_ptr, kbase, t0, T, skt, DK, dkw, 64, BK)


@triton.jit
def fw_bwd_dk_kernel(k_ptr, qf_ptr, vnew_ptr, dh_ptr, do_ptr, dkw_ptr, dkkv_ptr, dk_ptr,
                     T, H, NC, DK, DV, fw_scale,
                     BK: tl.constexpr, BV: tl.constexpr, FEATURIZE: tl.constexpr, EPS: tl.constexpr):
    """dk of the FW branch, grid (n, B*H), last: dKf = v_new dH^T (state update) + s causal(dO v_new^T)^T Qf
    (read-out; accumulated as dP^T += v_new dO^T per value block, not as a transposed tile) + the WY part
    from ``fw_bwd_wy_kernel``; then through l2(silu(.)) of the raw k plus the KV partial (FEATURIZE). Qf: the FW
    queries' features (given, or stored by ``fw_bwd_dq_kernel``)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b = i_bh // H
    h = i_bh % H
    kbase = (b * T * H + h) * DK
    vbase0 = (b * T * H + h) * DV
    skt = H * DK
    svt = H * DV
    t0 = i_c * 64
    DT = vnew_ptr.dtype.element_ty
    r = tl.arange(0, 64)
    rk = tl.arange(0, BK)
    hbase = (i_bh * NC + i_c) * DK * DV

    dk = tl.zeros((64, BK), dtype=tl.float32)
    dpt = tl.zeros((64, 64), dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        dh = tl.load(dh_ptr + hbase + rk[:, None] * DV + cv[None, :], mask=(rk[:, None] < DK) & (cv[None, :] < DV),
                     other=0.0).to(DT)                                          # dL/dM_{c+1} (Dk x BV)
        vbase = vbase0 + i_v * BV
        dv_left = DV - i_v * BV
        vnew = load_rows(vnew_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        do = load_rows(do_ptr, vbase, t0, T, svt, dv_left, 64, BV).to(DT)
        dk += tl.dot(vnew, tl.trans(dh))
        dpt += tl.dot(vnew, tl.trans(do))
    qf = load_rows(qf_ptr, kbase, t0, T, skt, DK, 64, BK).to(DT)
    dk += fw_scale * tl.dot(tl.where(r[:, None] <= r[None, :], dpt, 0.0).to(DT), qf)   # dpt[j, i], j <= i
    dk += load_rows(dkw_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    if FEATURIZE:
        dk = _featurize_bwd(load_rows(k_ptr, kbase, t0, T, skt, DK, 64, BK), dk, EPS) \
            + load_rows(dkkv_ptr, kbase, t0, T, skt, DK, 64, BK).to(tl.float32)
    store_rows(dk_ptr, kbase, t0, T, skt, DK, dk, 64, BK)
