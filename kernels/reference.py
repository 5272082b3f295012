"""Pure-PyTorch reference kernels: the oracle every other backend is tested against.

Two forms of the same math (docs/hqlt-math.md §3.3-3.4 and the visibility table §4):

* ``recurrent_*`` — a step-by-step oracle that loops over positions and literally applies the
  definitions. Slow; used by tests and benchmarks (backend ``"recurrent"``).
* ``chunked_*`` — a chunk-parallel form, differentiable by autograd and fast enough for CPU training
  (backend ``"reference"``):
    - KV memory: blocked local attention, O(T*W) instead of O(T^2).
    - Delta / gated delta: per chunk the WY (UT) representation from one unit-lower-triangular solve,
      then a short recurrence over chunk states plus an intra-chunk causal term.
    - Linear attention: the same chunk machinery with a column of ones appended to the values, which
      carries the sum-normaliser along with the numerator.

Both take fla-layout tensors ``[B, T, H, D]`` that the public API (``hqlt.kernels.api``) has validated,
with scales resolved to numbers. Internally everything runs head-major ``[B, H, T, D]`` in float32
(float64 stays float64), and results are cast back to the dtype of ``v``.

Where the three blends differ is captured once, by ``visibility``; the forms only implement four
primitives: sliding-window or chunk-local softmax attention, and a fast-weight stream that may be delayed
(keys/values shifted by W, gates not) and may be read at chunk starts instead of after every token.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import BLENDS, FEATURE_EPS, LINEAR_EPS, check_choice

# Query block of the chunked sliding-window attention when W is small: tiny blocks would mean many
# tiny matmuls; 64 keeps them efficient while the cost stays O(T * max(W, 64)).
_MIN_ATTN_BLOCK = 64


def without_autocast(fn):
    """Run a pure-torch form with autocast off: it picks its own compute dtype (float32 for half inputs),
    and under autocast its matmuls would drop to bf16, whose triangular solve torch does not implement."""

    @functools.wraps(fn)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)
    return run


def l2_normalize(x: Tensor, eps: float = FEATURE_EPS) -> Tensor:
    """x / sqrt(||x||^2 + eps) over the last dim (the FW feature map's normalisation, §1)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------------
# Visibility plan: the only place that knows what the blend names mean (§4.5).

@dataclass(frozen=True)
class Visibility:
    kv_window: int              # sliding: keys per query incl. the current one; chunk-local: chunk length
    kv_chunk_local: bool        # True: query t sees [C*floor(t/C), t]; False: [t-W+1, t]
    fw_delay: int               # FW stream element i writes k, v of position i - fw_delay (gates unshifted)
    fw_read_every: int | None   # None: query t reads the state after element t;
                                # C: the state before element C*floor(t/C) (its chunk's start)


def visibility(blend: str, window: int, fw_chunk: int | None = None) -> Visibility:
    """The plan of a blend. ``fw_chunk`` (delayed_chunk only; None = ``window``) is the FW read interval R:
    query t reads the FW state before position R*floor(t/R) while its KV memory is the chunk of C = window
    tokens (the reference kernel's R = 64 with C != 64 leaves positions visible to neither memory, §4.3)."""
    check_choice("blend", blend, BLENDS)
    if fw_chunk is not None and blend != "delayed_chunk":
        raise ValueError(f"fw_chunk is only for blend='delayed_chunk'; got fw_chunk={fw_chunk!r} with blend={blend!r}")
    return {
        "sync": Visibility(window, False, 0, None),
        "delayed_stream": Visibility(window, False, window, None),
        "delayed_chunk": Visibility(window, True, 0, window if fw_chunk is None else fw_chunk),
    }[blend]


# --------------------------------------------------------------------------------------------------
# Layout and precision.

def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: low precision is never accumulated in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def to_heads(x: Tensor | None, dtype: torch.dtype, *, contiguous: bool = False) -> Tensor | None:
    """[B, T, H, ...] -> [B, H, T, ...] in the compute dtype; a view unless `contiguous` (the chunked
    forms make their own contiguous blocked copies; the oracle's per-step slices want a copy)."""
    if x is None:
        return None
    x = x.to(dtype).transpose(1, 2)
    return x.contiguous() if contiguous else x


def to_seq(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, H, T, D] -> [B, T, H, D] in the output dtype."""
    return x.transpose(1, 2).contiguous().to(dtype)


def delay_stream(x: Tensor, shift: int) -> Tensor:
    """Shift [B, H, T, D] right by `shift` positions along T, filling with zeros (a no-op FW write)."""
    if shift == 0:
        return x
    T = x.shape[2]
    return F.pad(x, (0, 0, min(shift, T), 0))[:, :, :T]


def _pad_time(x: Tensor, pad: int) -> Tensor:
    """Zero-pad the time axis (dim 2) of a head-major tensor on the right."""
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 3) + [0, pad]
    return F.pad(x, widths)


# ==================================================================================================
# Step-by-step oracle.

@without_autocast
def recurrent_hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale,
                            g=None, chunk_size=None, fw_chunk=None):
    """Oracle for ``hybrid_memory``; ``chunk_size`` is accepted for a uniform signature and unused;
    ``fw_chunk``: the Delayed-Chunk FW read interval (None = window, see ``visibility``)."""
    dtype = compute_dtype(q_kv, k_kv, q_fw, k_fw, v, beta, g)
    q_kv, k_kv, q_fw, k_fw, vh, beta, g = (to_heads(x, dtype, contiguous=True)
                                           for x in (q_kv, k_kv, q_fw, k_fw, v, beta, g))
    plan = visibility(blend, window, fw_chunk)
    o_kv = _recurrent_attention(q_kv, k_kv, vh, kv_scale, window=plan.kv_window,
                                chunk_local=plan.kv_chunk_local)
    o_fw = _recurrent_fw(q_fw, k_fw, vh, beta, g, kind=fw, scale=fw_scale, delay=plan.fw_delay,
                         read_every=plan.fw_read_every)
    return to_seq(o_kv, v.dtype), to_seq(o_fw, v.dtype)


@without_autocast
def recurrent_kv_memory(q, k, v, *, window, scale):
    """Oracle for ``kv_memory``: full causal attention (window None) or a sliding window of W keys."""
    dtype = compute_dtype(q, k, v)
    qh, kh, vh = (to_heads(x, dtype, contiguous=True) for x in (q, k, v))
    return to_seq(_recurrent_attention(qh, kh, vh, scale, window=window, chunk_local=False), v.dtype)


@without_autocast
def recurrent_fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=None):
    """Oracle for ``fw_memory`` (the sync FW branch); ``chunk_size`` is unused."""
    dtype = compute_dtype(q, k, v, beta, g)
    qh, kh, vh, beta, g = (to_heads(x, dtype, contiguous=True) for x in (q, k, v, beta, g))
    o = _recurrent_fw(qh, kh, vh, beta, g, kind=fw, scale=scale, delay=0, read_every=None)
    return to_seq(o, v.dtype)


def _recurrent_attention(q, k, v, scale, *, window, chunk_local):
    """Softmax attention of each query over its visible keys, one query at a time."""
    outs = []
    for t in range(q.shape[2]):
        if window is None:
            lo = 0
        elif chunk_local:
            lo = (t // window) * window
        else:
            lo = max(0, t - window + 1)
        scores = torch.einsum("bhd,bhjd->bhj", q[:, :, t], k[:, :, lo:t + 1]) * scale
        outs.append(torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), v[:, :, lo:t + 1]))
    return torch.stack(outs, dim=2)


def _recurrent_fw(q, k, v, beta, g, *, kind, scale, delay, read_every):
    """Fast-weight memory, one stream element at a time.

    Stream element i writes (k_{i-delay}, v_{i-delay}) — zero vectors before the stream starts — with
    the gates beta_i, g_i of position i. Query i reads the state after element i, or, with
    ``read_every=C``, the state before element C*floor(i/C).
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    S = k.new_zeros(B, H, Dv, Dk)          # delta kinds: fast weights; linear: numerator
    z = k.new_zeros(B, H, Dk)              # linear only: normaliser
    read_S, read_z = S, z
    outs = []
    for i in range(T):
        if read_every is not None and i % read_every == 0:
            read_S, read_z = S, z
        k_i = k[:, :, i - delay] if i >= delay else torch.zeros_like(k[:, :, 0])
        v_i = v[:, :, i - delay] if i >= delay else torch.zeros_like(v[:, :, 0])
        if g is not None:
            S = S * g[:, :, i, None, None].exp()
        if kind == "linear":
            S = S + v_i[..., :, None] * k_i[..., None, :]
            z = z + k_i
        else:
            error = v_i - torch.einsum("bhvk,bhk->bhv", S, k_i)
            S = S + beta[:, :, i, None, None] * error[..., :, None] * k_i[..., None, :]
        if read_every is None:
            read_S, read_z = S, z
        outs.append(_read_fw(read_S, read_z, q[:, :, i], scale, kind))
    return torch.stack(outs, dim=2)


def _read_fw(S, z, q, scale, kind):
    o = scale * torch.einsum("bhvk,bhk->bhv", S, q)
    if kind == "linear":
        o = o / (scale * (z * q).sum(-1, keepdim=True) + LINEAR_EPS)
    return o


# ==================================================================================================
# Chunk-parallel form.

@without_autocast
def chunked_hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale,
                          g=None, chunk_size=64, fw_chunk=None):
    """Chunk-parallel ``hybrid_memory`` (backend "reference"); ``fw_chunk`` as in ``visibility``."""
    dtype = compute_dtype(q_kv, k_kv, q_fw, k_fw, v, beta, g)
    q_kv, k_kv, q_fw, k_fw, vh, beta, g = (to_heads(x, dtype) for x in (q_kv, k_kv, q_fw, k_fw, v, beta, g))
    plan = visibility(blend, window, fw_chunk)
    o_kv = local_attention(q_kv, k_kv, vh, kv_scale, window=plan.kv_window,
                           chunk_local=plan.kv_chunk_local)
    o_fw = chunked_fw(q_fw, delay_stream(k_fw, plan.fw_delay), delay_stream(vh, plan.fw_delay), beta, g,
                      kind=fw, scale=fw_scale, chunk_size=chunk_size, read_every=plan.fw_read_every)
    return to_seq(o_kv, v.dtype), to_seq(o_fw, v.dtype)


@without_autocast
def chunked_kv_memory(q, k, v, *, window, scale):
    """Chunk-parallel ``kv_memory``."""
    dtype = compute_dtype(q, k, v)
    qh, kh, vh = (to_heads(x, dtype) for x in (q, k, v))
    return to_seq(local_attention(qh, kh, vh, scale, window=window, chunk_local=False), v.dtype)


@without_autocast
def chunked_fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
    """Chunk-parallel ``fw_memory`` (the sync FW branch)."""
    dtype = compute_dtype(q, k, v, beta, g)
    qh, kh, vh, beta, g = (to_heads(x, dtype) for x in (q, k, v, beta, g))
    o = chunked_fw(qh, kh, vh, beta, g, kind=fw, scale=scale, chunk_size=chunk_size, read_every=None)
    return to_seq(o, v.dtype)


# ---- KV memory -----------------------------------------------------------------------------------

def local_attention(q, k, v, scale, *, window, chunk_local):
    """Softmax attention restricted to a sliding window or to the query's own chunk.

    Queries are cut into blocks; each block attends to its own keys and — for a sliding window — to
    the previous block's, with a boolean mask for the exact visible set. A block is at least W long,
    so the window never reaches further back than the previous block, and the cost is O(T * block).
    The masked softmax itself is torch's scaled_dot_product_attention (exact; a fused kernel on CPU,
    about twice as fast as materialising the scores, which page-faults on every large allocation).
    """
    B, H, T, _ = q.shape
    if window is None or (window >= T and not chunk_local):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if chunk_local:
        block, lookback = min(window, T), False         # chunks never look back
    else:
        block = min(max(window, _MIN_ATTN_BLOCK), T)
        lookback = block < T
    n = math.ceil(T / block)
    # [B*H, n, block, D]: the blocks take the place of heads, so one mask [n, block, keys] serves all.
    qb, kb, vb = (_pad_time(x, n * block - T).reshape(B * H, n, block, -1) for x in (q, k, v))
    if lookback:
        kb, vb = (torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2) for x in (kb, vb))

    q_pos = torch.arange(n * block, device=q.device).view(n, block, 1)
    first_key = (torch.arange(n, device=q.device) - int(lookback)) * block
    k_pos = (first_key[:, None] + torch.arange(kb.shape[2], device=q.device)).unsqueeze(1)
    visible = (k_pos <= q_pos) & (k_pos >= 0)
    if not chunk_local:
        visible &= k_pos > q_pos - window
    # Every query sees at least itself, so no softmax row is fully masked. (A 4-d mask: torch only
    # takes the fused CPU kernel for those.)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible[None], scale=scale)
    return out.reshape(B, H, n * block, -1)[:, :, :T]


# ---- FW memory -----------------------------------------------------------------------------------

def chunked_fw(q, k, v, beta, g, *, kind, scale, chunk_size, read_every):
    """Fast-weight memory over the stream (k_i, v_i, beta_i, g_i), all chunks in parallel.

    With M = S^T (d_k x d_v) and the state M0 at a chunk start, the delta rule inside the chunk writes
    M_i = e^{g_i} M_{i-1} + k_i d_i^T with corrected values d_i = beta_i (v_i - e^{g_i} M_{i-1}^T k_i).
    Unrolling gives a unit-lower-triangular system for D = [d_i]:
        (I + strict_lower(diag(beta) (K K^T * Gamma))) D = diag(beta) V - diag(beta * gamma) K M0,
    with gamma_i = exp(G_i), G = cumulative log-decay from the chunk start, Gamma_ij = exp(G_i - G_j).
    Solving once per chunk for U = A diag(beta) V and W = A diag(beta gamma) K (the WY/UT form) leaves
    D = U - W M0, so only the d_k x d_v chunk states need a sequential loop. Linear attention is the
    same recurrence with D = [V, 1] (no solve): the ones column accumulates the normaliser.

    Query i reads the state after position r_i of its chunk: r_i = i normally, or the last position
    before its read-chunk start when ``read_every`` is set (then the internal chunk is a multiple of
    ``read_every``, so every read point is either inside the chunk or its start state M0).
    """
    B, H, T, Dk = k.shape
    if kind == "linear":
        v = torch.cat([v, v.new_ones(B, H, T, 1)], dim=-1)
    L = chunk_size if read_every is None else read_every * max(1, chunk_size // read_every)
    L = min(L, T)  # a single chunk may have any length: its only read point before it is M0 = 0
    qc, kc, vc = (_to_chunks(x, L) for x in (q * scale, k, v))
    pos = torch.arange(L, device=k.device)
    G = decay = None
    if g is not None:
        G = _to_chunks(g, L).cumsum(-1)                       # log-decay from the chunk start through i
        decay = _masked_exp(G[..., :, None] - G[..., None, :], pos[None, :] <= pos[:, None])

    if kind == "linear":
        u, w = vc, None
    else:
        u, w = _wy_representation(kc, vc, _to_chunks(beta, L), G, decay)
    starts, d = _scan_chunks(kc, u, w, G)

    read = pos if read_every is None else (pos // read_every) * read_every - 1
    o = _read_chunks(qc, kc, d, starts, G, decay, read, read_is_current=read_every is None)
    o = o.movedim(0, 2).flatten(2, 3)[:, :, :T]
    if kind == "linear":
        o = o[..., :-1] / (o[..., -1:] + LINEAR_EPS)
    return o


def _to_chunks(x: Tensor, L: int) -> Tensor:
    """[B, H, T, ...] -> chunk-major [n, B, H, L, ...], zero-padded at the end.

    Zero keys, values and gates make padded positions no-ops, and they come after every real one.
    Chunk-major and contiguous so that each chunk of the sequential scan is a contiguous slice (CPU
    batched matmuls on strided slices fall back to slow per-matrix copies).
    """
    n = math.ceil(x.shape[2] / L)
    return _pad_time(x, n * L - x.shape[2]).unflatten(2, (n, L)).movedim(2, 0).contiguous()


def _wy_representation(k, v, beta, G, decay):
    """U = A diag(beta) V and W = A diag(beta gamma) K per chunk, A = (I + strict_lower(...))^-1.

    ``decay`` is Gamma_ij = exp(G_i - G_j) for j <= i (zero above the diagonal), None without gates.
    """
    lower = (beta[..., None] * k) @ k.transpose(-1, -2)
    if G is None:
        rhs = beta[..., None] * torch.cat([v, k], dim=-1)
    else:
        lower = lower * decay
        rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)
    # unitriangular=True: the solver reads only the strict lower triangle (the diagonal is taken as 1),
    # and its backward projects onto it, so the upper triangle of `lower` needs no masking.
    sol = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    return sol.split([v.shape[-1], k.shape[-1]], dim=-1)


def _scan_chunks(k, u, w, G):
    """The sequential part: the state at every chunk start and the corrected values D = U - W M0.

    Returns (starts, d), both stacked over chunks: starts [n, B, H, Dk, Dv], d like u. ``w is None``
    means the values need no correction (linear attention).
    """
    state = k.new_zeros(*k.shape[1:-2], k.shape[-1], u.shape[-1])
    if G is not None:
        k = k * (G[..., -1:] - G).exp()[..., None]              # decay of each write to the chunk end
        chunk_decay = G[..., -1].exp()[..., None, None].unbind(0)
    # unbind once rather than index per chunk: each index's backward would scatter into a full-size
    # zero tensor, one unbind's backward is a single stack.
    k, u = k.unbind(0), u.unbind(0)
    w = None if w is None else w.unbind(0)
    starts, ds = [], []
    for c in range(len(k)):
        d = u[c] if w is None else u[c] - w[c] @ state
        starts.append(state)
        ds.append(d)
        if G is not None:
            state = state * chunk_decay[c]
        state = state + k[c].transpose(-1, -2) @ d
    return torch.stack(starts), torch.stack(ds)


def _read_chunks(q, k, d, starts, G, decay, read, read_is_current):
    """o_i = q_i M_{r_i}: the decayed chunk-start state plus the chunk's writes j <= r_i."""
    pos = torch.arange(q.shape[-2], device=q.device)
    reads_write = pos[None, :] <= read[:, None]
    qk = q @ k.transpose(-1, -2)
    if G is None:
        return q @ starts + qk.masked_fill(~reads_write, 0.0) @ d
    if read_is_current:
        G_read = G
    else:
        G_read = F.pad(G, (1, 0))[..., read + 1]                  # G at r_i (0 at the chunk start)
        decay = _masked_exp(G_read[..., :, None] - G[..., None, :], reads_write)
    return (q * G_read.exp()[..., None]) @ starts + (qk * decay) @ d


def _masked_exp(log_decay: Tensor, keep: Tensor) -> Tensor:
    """exp where `keep`, exactly 0 elsewhere; masking before exp keeps the discarded entries (which may
    be large positive log-decays) from overflowing into inf * 0 = nan, in values and in gradients."""
    return log_decay.masked_fill(~keep, float("-inf")).exp()
