"""Launch configuration and the launchers of the fused kernels, without autograd:
``fused_forward`` (kernels 1-3 of ``fwd``) and ``fused_backward`` (kernels 4-7 of ``bwd``)."""
from __future__ import annotations

import contextlib
import functools

import torch

from ..contract import FEATURE_EPS, MAX_GRID_ROWS
from .bwd import (bwd_scan_carry_kernel, bwd_scan_kernel, bwd_scan_phi_kernel, fw_bwd_dk_kernel, fw_bwd_dq_kernel,
                  fw_bwd_kernel, fw_bwd_wy_kernel, kv_bwd_dkdv_kernel, kv_bwd_dq_kernel, kv_bwd_kernel, wy_t_kernel)
from .fwd import out_kernel, scan_kernel, wy_kernel
from .settings import (BWD_PARTIALS, BWD_SCAN_QDO, CHUNK, FW_BWD_T, FW_BWD_U, FW_BWD_VARIANTS, KV_BWD,
                       KV_BWD_FUSED_WARPS, KV_BWD_ROWS, MAX_HEAD_DIM, MIN_BWD_SCAN_STAGES, OUT_ORDERS, SCAN_FEATURES,
                       WY_PARTS, backward_kernels, check_config_keys, device_limits, forward_keeps_u, forward_kernels,
                       forward_stores_t, fw_bwd_dk_regs, interpreting, kv_rows, pow2, smem_needs)
from .settings import default_config as settings_default_config


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function in Triton 3.6: several µs a call)."""
    return -(-a // b)


def _device_limits(device) -> tuple[int, int]:
    """``settings.device_limits`` of a CUDA tensor's device: (shared memory per block, multiprocessors)."""
    return device_limits(torch.cuda.current_device() if device.index is None else device.index)


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return _device_limits(device)[1]


def default_config(B: int, H: int, dk: int, dv: int, device, elem_bytes: int = 2) -> dict:
    """``settings.default_config`` for a device (its multiprocessor count)."""
    return settings_default_config(B, H, dk, dv, _sm_count(device), elem_bytes)


def check_shared_memory(cfg: dict, elem_bytes: int, dk: int, dv: int, featurize: bool, device, kernels) -> None:
    """Refuse (ValueError) a launch whose kernels need more shared memory per block than the CUDA device has
    (``settings.smem_needs``), instead of Triton's OutOfResources in the middle of a forward or backward."""
    if device.type != "cuda":
        return
    limit = _device_limits(device)[0]
    key = (tuple(sorted(cfg.items())), elem_bytes, dk, dv, bool(featurize), tuple(kernels), limit)
    try:   # the same answer for every call of a shape and configuration: cached (a step's host time counts)
        over = dict(_over_limit(*key))
    except TypeError:   # a caller's unhashable value: its own error comes from the launcher's checks
        over = dict(_over_limit.__wrapped__(*key))
    if over:
        raise ValueError(f"the fused kernels {', '.join(f'{k} ({n} B)' for k, n in over.items())} need more shared "
                         f"memory than this device's {limit} B per block (inputs of {elem_bytes} bytes, Dk={dk}, "
                         f"Dv={dv}, features {'in the kernel' if featurize else 'given'}); use bf16/fp16 inputs "
                         f"or the backend 'fused', which routes such calls to its fallback")


@functools.lru_cache(maxsize=4096)
def _over_limit(cfg_items: tuple, elem_bytes: int, dk: int, dv: int, featurize: bool, kernels: tuple,
                limit: int) -> tuple:
    """((kernel, bytes), ...) of the kernels whose shared memory per program exceeds ``limit``."""
    needs = smem_needs(elem_bytes, dk, dv, featurize=featurize, config=dict(cfg_items), kernels=kernels)
    return tuple((k, n) for k, n in needs.items() if n > limit)


def _config(B: int, H: int, dk: int, dv: int, device, elem_bytes: int, config: dict | None) -> dict:
    """The default configuration with a caller's overrides (``settings.check_config_keys``: no unknown keys)."""
    try:
        check_config_keys(config or {})
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None
    return dict(default_config(B, H, dk, dv, device, elem_bytes), **(config or {}))


def _check_choice(cfg: dict, key: str, allowed: tuple[str, ...]) -> None:
    """A launch config's named variant (a switch's value or a caller's override) must be one it knows."""
    if cfg[key] not in allowed:
        raise ValueError(f"config[{key!r}] must be one of {allowed}; got {cfg[key]!r}")


def _check_int(cfg: dict, key: str, low: int, meaning: str) -> int:
    """A launch config's integer entry, at least ``low`` (``meaning`` explains it in the error)."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config[{key!r}] must be an integer >= {low} ({meaning}); got {value!r}")
    return value


def _check_segment_chunks(cfg: dict, key: str) -> int:
    """A launch config's chunks per segment of a scan (``key``: "scan_segment_chunks" of the forward scan,
    "bwd_scan_segment_chunks" of the reverse scan; 0: not segmented)."""
    scan = "reverse" if key.startswith("bwd") else "forward"
    return _check_int(cfg, key, 0, f"chunks of 64 tokens per segment of the {scan} scan; 0: one segment")


def _buffer(shape, dtype, device, poison: bool) -> torch.Tensor:
    """A launcher's buffer: uninitialised, or NaN-filled with ``poison`` (tests: catches unwritten elements)."""
    return (torch.full(shape, float("nan"), dtype=dtype, device=device) if poison
            else torch.empty(shape, dtype=dtype, device=device))


def _segmented_scan(scan_pass, k, kf, w, *, featurize: bool, cfg: dict, T: int, H: int, NC: int, L: int, dk: int,
                    dv: int, poison: bool, forward: bool) -> None:
    """A scan in segments of L chunks (bwd.py, FUSED_NOTES.md "Round 9"): the transitions of the segments that
    pass something on (the forward scan's 0 .. S-2, the reverse scan's 1 .. S-1) and their local passes, each over
    all of those segments at once; the walk over the segments; every segment's final pass.
    ``scan_pass(carry, segments, seg)`` launches the scan's kernel with SEG ``seg`` over ``segments`` segments.
    The transitions and the walk run at the reverse scan's tiles ("bwd_scan_bv",
    "bwd_scan_warps", "bwd_scan_carry_warps") in both directions."""
    S = _cdiv(NC, L)
    BH = kf.shape[0] * H
    carry = _buffer((BH, S, dk, dv), torch.float32, kf.device, poison)
    phi = _buffer((BH, S, dk, dk), torch.float32, kf.device, poison)
    bp = cfg["bwd_scan_bv"]
    bwd_scan_phi_kernel[(_cdiv(dk, bp), BH, S - 1)](
        k, kf, w, phi, T, H, NC, L, dk, 0 if forward else 1, BK=cfg["BK"], BP=bp, num_warps=cfg["bwd_scan_warps"],
        num_stages=cfg["bwd_scan_stages"], FEATURIZE=featurize, EPS=FEATURE_EPS)
    scan_pass(carry, S - 1, 1)
    bwd_scan_carry_kernel[(_cdiv(dv, bp), BH)](phi, carry, NC, L, dk, dv, BK=cfg["BK"], BV=bp,
                                                     num_warps=cfg["bwd_scan_carry_warps"], num_stages=1,
                                                     FORWARD=forward)
    scan_pass(carry, S, 2)


def kernel_dim(d: int) -> int:
    """The head dim the kernels run at for a head dim ``d``: ``d`` when it is a power of two >= 16, else the next
    such one. The launchers zero-pad other dims up to it and slice the results: with the FW features given and
    Dk 24 / Dv 40, ``scan_kernel``'s state update read shared memory out of range on sm_90 (compute-sanitizer,
    FUSED_NOTES.md "Round 4"), while every power-of-two dim passed. Zero columns change nothing: q.k and the
    features' norms are the same, the state's extra rows and columns stay zero, the outputs' extra columns are
    zero and dropped."""
    return pow2(d)


def _padded(t: torch.Tensor | None, *dims: int) -> torch.Tensor | None:
    """``t`` zero-padded in its last ``len(dims)`` dimensions to ``dims`` (None stays None)."""
    if t is None or tuple(t.shape[-len(dims):]) == dims:
        return t
    pad = []
    for have, want in zip(reversed(t.shape[-len(dims):]), reversed(dims)):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad)


def _cut(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """``t`` cut back to ``dims`` in its last dimensions, contiguous (the op's fake shapes and strides)."""
    index = (Ellipsis, *(slice(0, d) for d in dims))
    return t[index].contiguous()


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
    ``return_aux``: return ``(o_kv, o_fw, aux)`` with aux = dict(lse, w, v_new, states[, t][, u]) — what the fused
    backward needs: ``lse`` ``[B*H, T]`` float32 (log2-domain log-sum-exp of the KV scores, written only
    when stages == 3), ``w``, ``v_new`` ``[B, T, H, D]``, the chunk-start states ``[B*H, NC, Dk, Dv]``, where
    the configuration says so (``settings.forward_stores_t``) every chunk's T ``[B*H, NC, 64, 64]`` float32
    (else no ``t`` entry) and, where it says so (``settings.forward_keeps_u``), wy_kernel's U ``[B, T, H, Dv]`` in
    v's dtype (else no ``u`` entry).
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
    pk, pv = kernel_dim(dk), kernel_dim(dv)
    if (pk, pv) != (dk, dv):   # the kernels run at power-of-two head dims (kernel_dim)
        out = fused_forward(_padded(q, pk), _padded(k, pk), _padded(v, pv), beta, window=window, kv_scale=kv_scale,
                            fw_scale=fw_scale, q_fw=_padded(q_fw, pk), k_fw=_padded(k_fw, pk), poison=poison,
                            config=config, stages=stages, return_aux=True)
        o_kv, o_fw, aux = _cut(out[0], dv), _cut(out[1], dv), out[2]
        aux = dict(lse=aux["lse"], w=_cut(aux["w"], dk), v_new=_cut(aux["v_new"], dv),
                   states=_cut(aux["states"], dk, dv), **({"t": aux["t"]} if "t" in aux else {}),
                   **({"u": _cut(aux["u"], dv)} if "u" in aux else {}))
        return (o_kv, o_fw, aux) if return_aux else (o_kv, o_fw)
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    q_fw, k_fw = (q, k) if featurize else (q_fw.contiguous(), k_fw.contiguous())
    cfg = _config(B, H, dk, dv, q.device, q.element_size(), config)
    _check_choice(cfg, "scan_features", SCAN_FEATURES)
    seg_chunks = _check_segment_chunks(cfg, "scan_segment_chunks")
    if not config:   # overrides (benchmark sweeps) are the caller's experiment: Triton says if one does not fit
        check_shared_memory(cfg, q.element_size(), dk, dv, featurize, q.device, forward_kernels(cfg, stages))
    NC = _cdiv(T, CHUNK)

    def buf(*shape, dtype=v.dtype):
        return _buffer(shape, dtype, q.device, poison)

    w = buf(B, T, H, dk, dtype=q.dtype)
    u = buf(B, T, H, dv)
    v_new = buf(B, T, H, dv)
    states = buf(B * H, NC, dk, dv)
    o_kv = buf(B, T, H, dv)
    o_fw = buf(B, T, H, dv)
    lse = buf(B * H, T, dtype=torch.float32) if return_aux else o_kv   # o_kv: an unused placeholder
    _check_choice(cfg, "fw_bwd", FW_BWD_VARIANTS)
    _check_choice(cfg, "fw_bwd_t", FW_BWD_T)
    _check_choice(cfg, "fw_bwd_u", FW_BWD_U)
    _check_choice(cfg, "wy_parts", WY_PARTS)
    store_t = return_aux and forward_stores_t(cfg)
    t_mat = buf(B * H, NC, CHUNK, CHUNK, dtype=torch.float32) if store_t else w   # w: an unused placeholder
    # u is written by wy_kernel for the scan either way; "fw_bwd_u" "fwd" only keeps it as a residual
    keep_u = return_aux and forward_keeps_u(cfg)
    aux = dict(lse=lse, w=w, v_new=v_new, states=states, **({"t": t_mat} if store_t else {}),
               **({"u": u} if keep_u else {}))
    # "stored": the wy kernel writes the key features it computes anyway, and the scan reads them instead of
    # featurising on its sequential path (settings.scan_features); a transient buffer the size of k
    store_kf = featurize and cfg["scan_features"] == "stored"
    kf_scan = buf(B, T, H, dk, dtype=q.dtype) if store_kf else k_fw

    def result():
        return (o_kv, o_fw, aux) if return_aux else (o_kv, o_fw)

    if T == 0:
        return result()
    common = dict(FEATURIZE=featurize, EPS=FEATURE_EPS)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        wy_kernel[(NC, B * H, cfg["wy_parts"])](k, k_fw, v, beta, w, u, kf_scan, t_mat, T, H, NC, dk, dv,
                                                BK=cfg["BK"], BVW=cfg["BVW"], num_warps=cfg["wy_warps"],
                                                STORE_KF=store_kf, STORE_T=store_t, PARTS=cfg["wy_parts"], **common)
        if stages < 2:
            return result()
        feat_scan = featurize and not store_kf

        def scan_pass(carry, segments, seg):
            scan_kernel[(_cdiv(dv, cfg["scan_bv"]), B * H, segments)](
                k, kf_scan, w, u, v_new, states, carry, T, H, NC, seg_chunks if seg else NC, dk, dv, BK=cfg["BK"],
                BV=cfg["scan_bv"], num_warps=cfg["scan_warps"], num_stages=cfg["scan_stages"], FEATURIZE=feat_scan,
                EPS=FEATURE_EPS, SEG=seg)

        if seg_chunks and NC > seg_chunks:
            _segmented_scan(scan_pass, k, kf_scan, w, featurize=feat_scan, cfg=cfg, T=T, H=H, NC=NC, L=seg_chunks,
                            dk=dk, dv=dv, poison=poison, forward=True)
        else:
            scan_pass(states, 1, 0)   # states: an unused placeholder for the carry
        if stages < 3:
            return result()
        _check_choice(cfg, "out_order", OUT_ORDERS)
        nvb = _cdiv(dv, cfg["out_bv"])
        v_first = cfg["out_order"] == "value" and NC <= MAX_GRID_ROWS   # the chunks then take a 65535-row axis
        out_kernel[(nvb, NC, B * H) if v_first else (NC, B * H, nvb)](
            q, k, q_fw, k_fw, v, v_new, states, o_kv, o_fw, lse, T, H, NC, dk, dv, int(window),
            float(kv_scale), float(fw_scale), BK=cfg["BK"], BV=cfg["out_bv"],
            num_warps=cfg["out_warps"], num_stages=cfg["num_stages"], STORE_LSE=return_aux, V_FIRST=v_first,
            **common)
    return result()


def fused_backward(q, k, v, beta, o_kv, lse, do_kv, do_fw, *, window: int, kv_scale: float, fw_scale: float,
                   q_fw=None, k_fw=None, w=None, v_new=None, states=None, t=None, u=None, poison: bool = False,
                   config: dict | None = None, stages: int | None = None):
    """Gradients of ``fused_forward``'s (o_kv, o_fw) given (do_kv, do_fw); no autograd.

    ``o_kv`` and ``lse`` come from ``fused_forward(..., return_aux=True)``; ``w``, ``v_new``, ``states``
    too when kept, else (any of them None) the forward's wy + scan kernels run again to recompute them; ``t``
    (the forward's ``aux["t"]`` where it has one, or None) is every chunk's T, which the split variant loads under
    ``"fw_bwd_t": "fwd"`` instead of launching wy_t; ``u`` (the forward's ``aux["u"]``, or None) is U = T diag(beta)
    V, which the split variant's fw_bwd_wy loads under ``"fw_bwd_u": "fwd"`` instead of recomputing it (without a
    ``u`` it recomputes).
    Returns ``(dq, dk, dv, dbeta)`` when q_fw, k_fw are None (the FW features l2(silu(q)), l2(silu(k))
    computed in the kernel: dq, dk hold both branches), else ``(dq_kv, dk_kv, dq_fw, dk_fw, dv, dbeta)``.
    Gradients have the dtype of their input. ``poison`` fills every buffer with NaN first (tests).
    The FW backward runs as one kernel or split (``settings.fw_bwd_variant``, ``HQLT_FUSED_FW_BWD``; a
    ``config`` entry ``"fw_bwd": "single" | "split"`` overrides it). ``stages``: run only the first that many
    launches (benchmarks time the kernels one by one; the gradients are then not all written): kv_dq,
    kv_dkdv, bwd_scan, fw_bwd (single) or kv_dq, kv_dkdv, fw_bwd_dq, bwd_scan, fw_bwd_wy, fw_bwd_dk (split; with
    ``"fw_bwd_t"`` "pre", or "fwd" without a ``t``, wy_t before fw_bwd_wy).
    """
    featurize = q_fw is None
    B, T, H, dk_ = q.shape
    dv_ = v.shape[-1]
    if u is not None and (u.shape != v.shape or u.dtype != v.dtype or not u.is_contiguous()):
        # checked before the padding below, so that the message names the caller's shapes
        raise ValueError(f"u must be the forward's aux['u'], contiguous {v.dtype} {tuple(v.shape)} (v's dtype and "
                         f"shape); got {u.dtype} {tuple(u.shape)}{'' if u.is_contiguous() else ', not contiguous'}")
    pk, pv = kernel_dim(dk_), kernel_dim(dv_)
    if (pk, pv) != (dk_, dv_):   # the kernels run at power-of-two head dims (kernel_dim); zero columns stay zero
        g = fused_backward(_padded(q, pk), _padded(k, pk), _padded(v, pv), beta, _padded(o_kv, pv), lse,
                           _padded(do_kv, pv), _padded(do_fw, pv), window=window, kv_scale=kv_scale,
                           fw_scale=fw_scale, q_fw=_padded(q_fw, pk), k_fw=_padded(k_fw, pk), w=_padded(w, pk),
                           v_new=_padded(v_new, pv), states=_padded(states, pk, pv), t=t, u=_padded(u, pv),
                           poison=poison, config=config, stages=stages)
        dims = (dk_, dk_, dv_) if featurize else (dk_, dk_, dk_, dk_, dv_)
        return (*(_cut(x, d) for x, d in zip(g, dims)), g[-1])
    q, k, v, beta, o_kv = (t.contiguous() for t in (q, k, v, beta, o_kv))
    q_fw, k_fw = (q, k) if featurize else (q_fw.contiguous(), k_fw.contiguous())
    do_kv = do_kv.to(v.dtype).contiguous()
    do_fw = do_fw.to(v.dtype).contiguous()
    cfg = _config(B, H, dk_, dv_, q.device, q.element_size(), config)
    _check_choice(cfg, "fw_bwd", FW_BWD_VARIANTS)
    _check_choice(cfg, "bwd_scan_qdo", BWD_SCAN_QDO)
    _check_choice(cfg, "fw_bwd_t", FW_BWD_T)
    _check_choice(cfg, "fw_bwd_u", FW_BWD_U)
    _check_choice(cfg, "bwd_partials", BWD_PARTIALS)
    _check_choice(cfg, "kv_bwd", KV_BWD)
    _check_int(cfg, "bwd_scan_stages", MIN_BWD_SCAN_STAGES, "1 faults on sm_90")
    dk_regs = fw_bwd_dk_regs(cfg["fw_bwd_dk_maxnreg"], featurize)   # "given" resolved here, where the mode is known
    for key in ("kv_dq_rows", "kv_dkdv_rows"):   # 0 (by the window) resolved here, where the window is known
        _check_choice(cfg, key, KV_BWD_ROWS)
        cfg[key] = kv_rows(cfg[key], window, q.element_size())
    split = cfg["fw_bwd"] == "split"
    pre_qdo = split and cfg["bwd_scan_qdo"] == "pre"
    pre_t = split and cfg["fw_bwd_t"] != "wy"   # T loaded by fw_bwd_wy: built by wy_t, or the forward's
    seg_chunks = _check_segment_chunks(cfg, "bwd_scan_segment_chunks")
    if not config:
        check_shared_memory(cfg, q.element_size(), dk_, dv_, featurize, q.device, backward_kernels(cfg))
    NC = _cdiv(T, CHUNK)
    if w is None or v_new is None or states is None:
        _, _, aux = fused_forward(q, k, v, beta, window=window, kv_scale=kv_scale, fw_scale=fw_scale,
                                  q_fw=None if featurize else q_fw, k_fw=None if featurize else k_fw,
                                  poison=poison, config=config, stages=2, return_aux=True)
        w, v_new, states, t, u = aux["w"], aux["v_new"], aux["states"], aux.get("t"), aux.get("u")
    # the forward's T ("fwd"), else wy_t builds it (a T from a forward run under another configuration is still T)
    t_given = pre_t and cfg["fw_bwd_t"] == "fwd" and t is not None
    if t_given and (tuple(t.shape) != (B * H, NC, CHUNK, CHUNK) or t.dtype != torch.float32 or not t.is_contiguous()):
        raise ValueError(f"t must be the forward's aux['t'], contiguous float32 {(B * H, NC, CHUNK, CHUNK)}; got "
                         f"{t.dtype} {tuple(t.shape)}")
    # the forward's U ("fw_bwd_u" "fwd"); without one fw_bwd_wy recomputes it as under "wy"
    u_given = split and cfg["fw_bwd_u"] == "fwd" and u is not None

    def buf(shape, dtype):
        return _buffer(shape, dtype, q.device, poison)

    f32 = torch.float32
    # partial gradients (settings.BWD_PARTIALS): float32, or the inputs' dtype
    pq, pv_ = (f32, f32) if cfg["bwd_partials"] == "float32" else (q.dtype, v.dtype)
    dq_kv = buf(q.shape, pq if featurize else q.dtype)     # partial (summed in the FW kernels) or final
    dk_kv = buf(k.shape, pq if featurize else k.dtype)
    dv_kv = buf(v.shape, pv_)
    dh = buf((B * H, NC, dk_, dv_), states.dtype)
    dvn = buf(v.shape, pv_)
    dq = buf(q.shape, q.dtype if featurize else q_fw.dtype)
    dk = buf(k.shape, k.dtype if featurize else k_fw.dtype)
    dv = buf(v.shape, v.dtype)
    dbeta = buf(beta.shape, f32)
    if T > 0:
        common = dict(FEATURIZE=featurize, EPS=FEATURE_EPS)
        nv = _cdiv(dv_, cfg["bwd_scan_bv"])
        # segments only in the split variant: the single variant's segmented scan crashed (d 128) and gave wrong
        # gradients (d 64) on an H100 while the interpreter agreed (FUSED_NOTES.md "Round 9"); unresolved
        segmented = split and seg_chunks and NC > seg_chunks

        def reverse_scan(qf_, kf_, feat: bool, local_in: bool):
            """The reverse scan (bwd_scan_kernel) over the whole sequence, or in segments (_segmented_scan)."""
            kw = dict(BK=cfg["BK"], BV=cfg["bwd_scan_bv"], num_warps=cfg["bwd_scan_warps"],
                      num_stages=cfg["bwd_scan_stages"], FEATURIZE=feat, EPS=FEATURE_EPS, LOCAL_IN=local_in,
                      PRE_QDO=pre_qdo)

            def scan_pass(carry, segments, seg):
                bwd_scan_kernel[(nv, B * H, segments)](q, k, qf_, kf_, w, do_fw, dvn, dh, carry, T, H, NC,
                                                       seg_chunks if seg else NC, dk_, dv_, float(fw_scale), SEG=seg,
                                                       **kw)

            if segmented:
                _segmented_scan(scan_pass, k, kf_, w, featurize=feat, cfg=cfg, T=T, H=H, NC=NC, L=seg_chunks, dk=dk_,
                                dv=dv_, poison=poison, forward=False)
            else:
                scan_pass(dvn, 1, 0)   # dvn: an unused placeholder for the carry

        def kv(rows: int) -> dict:
            # 128-row programs run 8 warps: with 4 they spill 1-6 KB per thread on sm_90 (settings.KV_BWD_ROWS)
            return dict(BK=cfg["BK"], BVW=cfg["BVW"], BM=rows, num_warps=cfg["kv_bwd_warps"] if rows == 64 else 8,
                        num_stages=cfg["num_stages"])

        dq_rows, dkdv_rows = cfg["kv_dq_rows"], cfg["kv_dkdv_rows"]
        if cfg["kv_bwd"] == "fused" and dq_rows == dkdv_rows == 64:   # one launch, 8 warps (settings.KV_BWD)
            launches = [lambda: kv_bwd_kernel[(NC, B * H)](
                q, k, v, o_kv, do_kv, lse, dq_kv, dk_kv, dv_kv, T, H, NC, dk_, dv_, int(window), float(kv_scale),
                BK=cfg["BK"], BVW=cfg["BVW"], num_warps=KV_BWD_FUSED_WARPS, num_stages=cfg["num_stages"])]
        else:
            delta = buf((B * H, T), f32)   # rowsum(dO * O) per query, from kv_bwd_dq for kv_bwd_dkdv
            launches = [
                lambda: kv_bwd_dq_kernel[(_cdiv(T, dq_rows), B * H)](
                    q, k, v, o_kv, do_kv, lse, delta, dq_kv, T, H, dk_, dv_, int(window), float(kv_scale),
                    **kv(dq_rows)),
                lambda: kv_bwd_dkdv_kernel[(_cdiv(T, dkdv_rows), B * H)](
                    q, k, v, do_kv, lse, delta, dk_kv, dv_kv, T, H, NC, dk_, dv_, int(window), float(kv_scale),
                    **kv(dkdv_rows))]
        if not split:
            launches += [
                lambda: reverse_scan(q_fw, k_fw, featurize, False),
                lambda: fw_bwd_kernel[(NC, B * H)](
                    q, k, q_fw, k_fw, v, beta, v_new, states, dh, dvn, do_fw, dq_kv, dk_kv, dv_kv, dq, dk, dv,
                    dbeta, T, H, NC, dk_, dv_, float(fw_scale), BK=cfg["BK"], BV=cfg["fw_bwd_bv"],
                    num_warps=cfg["fw_bwd_warps"], num_stages=cfg["num_stages"], **common)]
        else:
            # features computed in the kernel: fw_bwd_dq_kernel stores them once for the later kernels
            qf_b, kf_b = ((buf(q.shape, q.dtype), buf(k.shape, k.dtype)) if featurize else (q_fw, k_fw))
            dkw = buf(k.shape, pq)
            if t_given:
                t_mat = t
            else:   # dkw: an unused placeholder where fw_bwd_wy builds T itself
                t_mat = buf((B * H, NC, CHUNK, CHUNK), f32) if pre_t else dkw
            bv = cfg["fw_bwd_split_bv"]
            launches += [
                lambda: fw_bwd_dq_kernel[(NC, B * H)](
                    q, k, qf_b, kf_b, v_new, states, do_fw, dq_kv, dq, dvn, dh, T, H, NC, dk_, dv_, float(fw_scale),
                    BK=cfg["BK"], BV=bv, num_warps=cfg["fw_bwd_dq_warps"], num_stages=cfg["num_stages"],
                    PRE_QDO=pre_qdo, **common),
                lambda: reverse_scan(qf_b, kf_b, False, True),
                *([lambda: wy_t_kernel[(NC, B * H)](kf_b, beta, t_mat, T, H, NC, dk_, BK=cfg["BK"],
                                                    num_warps=cfg["wy_t_warps"])] if pre_t and not t_given
                  else []),
                lambda: fw_bwd_wy_kernel[(NC, B * H)](   # v: an unused placeholder for u where U is recomputed
                    kf_b, v, beta, w, states, dvn, dv_kv, dkw, dv, dbeta, t_mat, u if u_given else v, T, H, NC, dk_,
                    dv_, BK=cfg["BK"], BV=bv, num_warps=cfg["fw_bwd_wy_warps"], num_stages=cfg["num_stages"],
                    T_PRE=pre_t, U_FWD=u_given),
                lambda: fw_bwd_dk_kernel[(NC, B * H)](
                    k, qf_b, v_new, dh, do_fw, dkw, dk_kv, dk, T, H, NC, dk_, dv_, float(fw_scale), BK=cfg["BK"],
                    BV=bv, num_warps=cfg["fw_bwd_dk_warps"], num_stages=cfg["num_stages"],
                    **({"maxnreg": dk_regs} if dk_regs else {}), **common)]
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            for launch in launches[:stages]:
                launch()
    dbeta = dbeta.to(beta.dtype)
    if featurize:
        return dq, dk, dv, dbeta
    return dq_kv, dk_kv, dq, dk, dv, dbeta
