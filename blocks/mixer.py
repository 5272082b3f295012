"""HybridMixer: one token-mixing layer holding a KV memory, an FW memory, or both (docs/hqlt-math.md §3).

shared q/k/v projections (+ optional short causal conv) → KV branch (raw q, k, optional RoPE) and FW
branch (featurised q, k; β, decay) → `hqlt.kernels` → mix → per-head RMSNorm → optional output gate →
out projection. Transformer (kind K) and DeltaNet (kind F) are this layer with one branch off, so
baselines and hybrids share code and parameter counting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hqlt import kernels

from .memories import DecayRate
from .model_schema import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16/bf16 up to fp32; fp64 stays fp64
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class ShortConv(nn.Module):
    """Depthwise causal conv1d over time, no bias; x is [B, T, C]."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x.transpose(1, 2), (self.size - 1, 0))).transpose(1, 2)


class HybridMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        if kind not in ("H", "K", "F"):
            raise ValueError(f"layer kind: got {kind!r}; allowed: H, K, F")
        D, H, d = cfg.d_model, cfg.n_heads, cfg.head_dim
        m = cfg.mixer
        self.kind, self.n_heads, self.head_dim = kind, H, d
        self.use_kv, self.use_fw = kind in "HK", kind in "HF"
        self.backend, self.chunk_size = cfg.backend, cfg.chunk_size
        self.kv_entry, self.kv_cfg = m.part("kv")
        self.fw_entry, self.fw_cfg = m.part("fw")
        self.blend = m.part("blend")[0].name
        self.fw_chunk = getattr(m.part("blend")[1], "fw_chunk", None)  # delayed_chunk's FW read interval
        self.fw_mem = self.fw_entry.impl
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.convs = nn.ModuleList([ShortConv(D, m.conv_size) for _ in range(3)]) if m.short_conv else None
        self.beta_proj = nn.Linear(D, H, bias=False) if self.use_fw and self.fw_mem.uses_beta else None
        self.decay = DecayRate(D, H) if self.use_fw and self.fw_mem.uses_decay else None
        if self.use_kv and self.use_fw:
            mix_entry, _ = m.part("mix")
            self.mix = mix_entry.impl(D, H, d)
        else:
            self.mix = None
        self.head_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(D, D, bias=False) if m.output_gate else None
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs is not None:
            q, k, v = (conv(t) for conv, t in zip(self.convs, (q, k, v)))
        heads = (self.n_heads, self.head_dim)
        q, k, v = q.unflatten(-1, heads), k.unflatten(-1, heads), F.silu(v).unflatten(-1, heads)

        o_kv = o_fw = None
        if self.use_fw:
            q_fw, k_fw = self.fw_mem.featurize(q, k)
            ftype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 up to fp32; fp64 stays fp64
            beta = (torch.sigmoid(self.beta_proj(x).to(ftype)) * self.fw_cfg.beta_range
                    if self.beta_proj is not None else None)
            g = self.decay(x) if self.decay is not None else None
            if beta is None:  # linear attention ignores β; the kernel still takes the tensor
                beta = torch.ones(B, T, self.n_heads, device=x.device, dtype=torch.float32)
        if self.use_kv:
            q_kv, k_kv = self.kv_entry.impl.prepare(q, k, self.kv_cfg)

        if self.use_kv and self.use_fw:
            o_kv, o_fw = kernels.hybrid_memory(
                q_kv, k_kv, q_fw, k_fw, v, beta.to(v.dtype), blend=self.blend, window=self.kv_cfg.window,
                fw=self.fw_mem.kernel_name, g=g, backend=self.backend, chunk_size=self.chunk_size,
                fw_chunk=self.fw_chunk)
            o = self.mix(x, o_kv, o_fw)
        elif self.use_kv:
            o = kernels.kv_memory(q_kv, k_kv, v, window=self.kv_cfg.window, backend=self.backend)
        else:
            o = kernels.fw_memory(q_fw, k_fw, v, beta.to(v.dtype), fw=self.fw_mem.kernel_name, g=g,
                                  backend=self.backend, chunk_size=self.chunk_size)

        y = self.head_norm(o)
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x)).unflatten(-1, heads)
        return self.o_proj(y.flatten(-2))
