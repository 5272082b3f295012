"""How the three blends map onto off-the-shelf attention / fast-weight ops (docs/hqlt-math.md §4).

Shared by the GPU backends, so each backend only supplies a sliding-window attention (and a causal
attention over short independent sequences for Delayed-Chunk); the FW branch is fla's when fla is
importable, else the reference chunked form (on whatever device the tensors live).

* Synchronous: KV = sliding window of W keys incl. the current one; FW = the plain stream.
* Delayed-Streaming: KV as sync; FW stream element i writes (k_{i-W}, v_{i-W}) — zero vectors for
  i < W, a no-op write — with the gates beta_i, g_i of the *current* position.
* Delayed-Chunk (FW granularity B = C): KV = causal attention inside each chunk of C tokens, which is
  plain causal attention over the batch of chunks ``[B*n, C, H, D]``. FW: query t reads the state
  before its chunk's first token. No fla op returns per-chunk states with autograd, so the stream is
  *interleaved*: per chunk, C read tokens (query q_t, zero key / value / beta / log-decay, i.e. no-op
  writes) then the chunk's C write tokens (zero query). A read token then sees exactly the writes of
  earlier chunks. Cost: the FW op runs over 2·n·C tokens (twice the work of sync); the fused kernel
  issue removes that. Every position is visible to one of the memories (no blind positions).

Precision: the fla kernels run bf16/fp16 only; float32 and float64 inputs run the reference chunked
form on the GPU (exact to float32 rounding). The kernel dtype is ``kernel_dtype``: the autocast dtype
under CUDA autocast, else the lowest precision among q, k, v (inputs are cast to it; outputs have
the dtype of v). Reasons (fla 0.6.0 on an H200): ``chunk_delta_rule`` asserts that its inputs are not
float32; the float32 sync case at d = 128 failed in ``parallel_attn`` (traceback not captured; its
128 x 128 float32 tiles probably exceed shared memory), while at d = 64 its TF32 dots gave 1.9e-3
relative error, not the contract's 1e-5; the float32 gated-delta case spent minutes autotuning.
Training runs bf16 autocast, where every op takes the fla kernels.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from ..contract import MAX_GRID_ROWS, KernelOps
from . import has_module

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLA_CHUNK_SIZES = (16, 32, 64)


# ---------------------------------------------------------------------------------------- time axis
def pad_time(x: Tensor, pad: int) -> Tensor:
    """Zero-pad the time axis (dim 1) of a [B, T, ...] tensor on the right."""
    if pad == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])


def shift_time(x: Tensor, shift: int) -> Tensor:
    """[B, T, ...] shifted right by `shift` along T, zeros in front (a delayed FW stream)."""
    if shift == 0:
        return x
    T = x.shape[1]
    if shift >= T:
        return torch.zeros_like(x)
    return F.pad(x[:, :T - shift], [0, 0] * (x.dim() - 2) + [shift, 0])


def chunk_batch(x: Tensor, C: int) -> Tensor:
    """[B, T, H, D] -> [B*n, C, H, D] (zero-padded at the end), n = ceil(T / C)."""
    B, T = x.shape[:2]
    n = math.ceil(T / C)
    return pad_time(x, n * C - T).reshape(B * n, C, *x.shape[2:])


def unchunk_batch(x: Tensor, B: int, T: int) -> Tensor:
    """Inverse of ``chunk_batch``."""
    return x.reshape(B, -1, *x.shape[2:])[:, :T]


def interleave_reads(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, g: Tensor | None, C: int):
    """The read/write stream of Delayed-Chunk (module docstring): per chunk C read tokens, then C writes."""
    B, T = v.shape[:2]
    n = math.ceil(T / C)

    def chunks(x):
        return pad_time(x, n * C - T).unflatten(1, (n, C))

    def stream(read, write):
        return torch.stack([read, write], dim=2).flatten(1, 3)       # [B, n, 2, C, ...] -> [B, 2nC, ...]

    def writes(x):
        if x is None:
            return None
        xc = chunks(x)
        return stream(torch.zeros_like(xc), xc)

    qc = chunks(q)
    return stream(qc, torch.zeros_like(qc)), writes(k), writes(v), writes(beta), writes(g)


def take_reads(o: Tensor, C: int, T: int) -> Tensor:
    """The read tokens' outputs of an interleaved stream, back in sequence order."""
    return o.unflatten(1, (-1, 2, C))[:, :, 0].flatten(1, 2)[:, :T]


# ---------------------------------------------------------------------------------------- FW branch
def fla_available() -> bool:
    return has_module("fla") and has_module("triton")


def fla_fw_ok(fw: str, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """Whether the fla kernels run `dtype` (bf16/fp16 only, see the module docstring on float32) and `fw` on
    `device` (see ``fla_gated_refused``)."""
    if dtype not in LOW_PRECISION:
        return False
    if fw == "gated_delta" and device is not None and device.type == "cuda":
        return not fla_gated_refused(torch.cuda.get_device_capability(device), _triton_version(),
                                     has_module("tilelang"))
    return True


def fla_gated_refused(capability: tuple[int, int], triton_version: tuple[int, ...], tilelang: bool) -> bool:
    """fla 0.6.0 raises in ``chunk_gated_delta_rule`` on Hopper (compute capability 9.x) with
    3.4.0 <= Triton < 3.7.1 unless tilelang is installed: its backward ``chunk_bwd_dqkwg`` gives wrong results
    there (fla issue #640). Seen on an H200 with Triton 3.6.0. Such calls take the reference FW form."""
    return capability[0] == 9 and (3, 4, 0) <= tuple(triton_version[:3]) < (3, 7, 1) and not tilelang


@functools.lru_cache(maxsize=1)
def _triton_version() -> tuple[int, ...]:
    import triton
    parts = []
    for p in triton.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def kernel_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype a fused kernel should run in.

    Under CUDA autocast, the autocast dtype (as torch's own attention does): in a bf16-autocast model
    the FW queries/keys arrive in float32 (their l2 norm autocasts up) while v is bf16. Otherwise the
    lowest precision among the inputs, so that a mix of bf16 and float32 runs bf16 kernels and pure
    float32/float64 inputs stay exact.
    """
    present = [t for t in tensors if t is not None]
    if present and present[0].is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return getattr(torch, kernel_dtype_name(tuple(dtype_name(t.dtype) for t in present)))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def kernel_dtype_name(dtypes: tuple[str, ...], autocast: str = "") -> str:
    """``kernel_dtype`` from dtype names ("bfloat16", ...) and the CUDA autocast dtype name ("" when off or
    not on CUDA): the same rule on plain values, for decisions taken at trace time (``dispatch.plan``)."""
    if autocast:
        return autocast
    for low in ("bfloat16", "float16"):
        if low in dtypes:
            return low
    return "float32" if "float32" in dtypes else dtypes[0]


def same_dtype(dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def fw_stream(q, k, v, beta, g, *, fw, scale, delay=0, read_every=None, chunk_size=64, use_fla=True):
    """FW memory output [B, T, H, Dv] (dtype of v) for a possibly delayed, possibly chunk-start-read
    stream."""
    dtype = kernel_dtype(q, k, v)
    if not (use_fla and fla_available() and fla_fw_ok(fw, dtype, v.device)):
        return reference_fw(q, k, v, beta, g, fw=fw, scale=scale, delay=delay, read_every=read_every,
                            chunk_size=chunk_size)
    out_dtype = v.dtype
    q, k, v = same_dtype(dtype, q, k, v)
    T = v.shape[1]
    if delay:
        k, v = shift_time(k, delay), shift_time(v, delay)
    if read_every is not None:
        if read_every >= T:          # every query reads the empty state before the first chunk
            return v * 0.0           # zeros that stay in the graph (zero gradients, like the reference)
        q, k, v, beta, g = interleave_reads(q, k, v, beta, g, read_every)
    o = fla_fw(q, k, v, beta, g, fw=fw, scale=scale, chunk_size=chunk_size)
    if read_every is not None:
        o = take_reads(o, read_every, T)
    return o.to(out_dtype)


def fla_fw(q, k, v, beta, g, *, fw, scale, chunk_size=64):
    """One fla FW op over the stream as given (q, k already featurised: no in-kernel l2)."""
    cs = chunk_size if chunk_size in FLA_CHUNK_SIZES else 64
    if fw == "delta":
        from fla.ops.delta_rule import chunk_delta_rule
        o, _ = chunk_delta_rule(q, k, v, beta.to(q.dtype), scale=scale, use_qk_l2norm_in_kernel=False,
                                chunk_size=cs)
    elif fw == "gated_delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        o, _ = chunk_gated_delta_rule(q, k, v, g.float(), beta.to(q.dtype), scale=scale, chunk_size=cs)
    elif fw == "linear":
        # The numerator from fla, the normaliser scale * q . cumsum(k) + 1e-10 (the reference's, §4.4) here in float32:
        # fla's normalize=True forms it in the inputs' dtype, and with bf16 cumulative sums over whole streams
        # (T 130-200) the gradients missed bf16's 1e-2 on an H100 while chunk-local streams (<= 64 tokens) met it
        # (kernels/FUSED_NOTES.md "Round 8").
        from fla.ops.linear_attn import chunk_linear_attn
        o, _ = chunk_linear_attn(q, k, v, scale=scale, normalize=False)
        z = (q.float() * scale * k.float().cumsum(1)).sum(-1, keepdim=True)
        o = (o.float() / (z + 1e-10)).to(o.dtype)
    else:
        raise ValueError(f"fw must be 'delta', 'gated_delta' or 'linear'; got {fw!r}")
    return o


@ref.without_autocast
def reference_fw(q, k, v, beta, g, *, fw, scale, delay=0, read_every=None, chunk_size=64):
    """The reference chunked FW form, on the tensors' own device."""
    dtype = ref.compute_dtype(q, k, v, beta, g)
    qh, kh, vh, bh, gh = (ref.to_heads(x, dtype) for x in (q, k, v, beta, g))
    o = ref.chunked_fw(qh, ref.delay_stream(kh, delay), ref.delay_stream(vh, delay), bh, gh, kind=fw,
                       scale=scale, chunk_size=chunk_size, read_every=read_every)
    return ref.to_seq(o, v.dtype)


# ---------------------------------------------------------------------------------------- KV branch
@ref.without_autocast
def reference_kv(q, k, v, *, scale, window, chunk_local=False):
    dtype = ref.compute_dtype(q, k, v)
    qh, kh, vh = (ref.to_heads(x, dtype) for x in (q, k, v))
    o = ref.local_attention(qh, kh, vh, scale, window=window, chunk_local=chunk_local)
    return ref.to_seq(o, v.dtype)


def sdpa_causal(q, k, v, *, scale):
    """Full causal attention through torch SDPA (FlashAttention/cuDNN for bf16 on CUDA; exact math
    kernels for float32)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale)
    return o.transpose(1, 2).to(v.dtype)


# CUDA caps a grid's y and z dimensions at 65535 (MAX_GRID_ROWS) and attention kernels put batch x heads there;
# chunk-local attention makes the batch B * T / C (1024 sequences of 256 tokens in chunks of 8: 32768 x heads).


def in_grid_slices(fn, q, k, v, *args):
    """fn(q, k, v, *args) over slices of the batch small enough that batch x heads fits one grid axis."""
    rows = max(1, MAX_GRID_ROWS // q.shape[2])
    if q.shape[0] <= rows:
        return fn(q, k, v, *args)
    return torch.cat([fn(q[i:i + rows], k[i:i + rows], v[i:i + rows], *args) for i in range(0, q.shape[0], rows)])


def kv_attention(q, k, v, *, scale, window, chunk_local, sliding, causal):
    """KV memory through a backend's two attention primitives.

    sliding(q, k, v, scale, W) -> sliding-window attention (W < T); causal(q, k, v, scale) -> full
    causal attention. Chunk-local attention is causal attention over the batch of chunks. Both run on
    batch slices that fit a CUDA grid axis (``in_grid_slices``).
    """
    B, T = v.shape[:2]
    sliding = functools.partial(in_grid_slices, sliding)
    causal = functools.partial(in_grid_slices, causal)
    if window is None or (not chunk_local and window >= T):
        return causal(q, k, v, scale)
    if not chunk_local:
        return sliding(q, k, v, scale, window)
    if window >= T:
        return causal(q, k, v, scale)
    o = causal(chunk_batch(q, window), chunk_batch(k, window), chunk_batch(v, window), scale)
    return unchunk_batch(o, B, T)


def low_precision_kv_attention(q, k, v, *, scale, window, chunk_local, sliding, causal):
    """`kv_attention` for kernels that run bf16/fp16 with head dims <= 256; everything else (float32/64
    inputs, larger heads) takes the exact reference form."""
    dtype = kernel_dtype(q, k, v)
    if dtype not in LOW_PRECISION or q.shape[-1] > 256:
        return reference_kv(q, k, v, scale=scale, window=window, chunk_local=chunk_local)
    q, k, v = same_dtype(dtype, q, k, v)
    return kv_attention(q, k, v, scale=scale, window=window, chunk_local=chunk_local, sliding=sliding,
                        causal=causal)


# ---------------------------------------------------------------------------------------- blends
def blend_plan(blend: str, window: int):
    """(kv_chunk_local, fw_delay, fw_read_every) of a blend — the same plan as the reference's."""
    plan = ref.visibility(blend, window)
    return plan.kv_chunk_local, plan.fw_delay, plan.fw_read_every


def make_ops(kv_attn, *, use_fla=True):
    """KernelOps from a KV implementation ``kv_attn(q, k, v, *, scale, window, chunk_local)``.

    The fla / flash_attn ops are opaque Triton/CUDA launches with their own autograd: under torch.compile
    the api calls them through the custom ops of ``hqlt.kernels.ops`` (one graph node each, no graph
    break), never directly.
    """
    def hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g=None,
                      chunk_size=64):
        chunk_local, delay, read_every = blend_plan(blend, window)
        o_kv = kv_attn(q_kv, k_kv, v, scale=kv_scale, window=window, chunk_local=chunk_local)
        o_fw = fw_stream(q_fw, k_fw, v, beta, g, fw=fw, scale=fw_scale, delay=delay, read_every=read_every,
                         chunk_size=chunk_size, use_fla=use_fla)
        return o_kv.to(v.dtype), o_fw.to(v.dtype)

    def kv_memory(q, k, v, *, window, scale):
        return kv_attn(q, k, v, scale=scale, window=window, chunk_local=False).to(v.dtype)

    def fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
        return fw_stream(q, k, v, beta, g, fw=fw, scale=scale, chunk_size=chunk_size,
                         use_fla=use_fla).to(v.dtype)

    return KernelOps(hybrid_memory, kv_memory, fw_memory)
