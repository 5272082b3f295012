"""How the KV and FW outputs are combined inside one layer (docs/hqlt-math.md §3.5).

Each mix is a module built as `Mix(d_model, n_heads, head_dim)` and called as
`mix(x, o_kv, o_fw) -> o`, with x the pre-normed layer input [B, T, D] and o_* of shape [B, T, H, d].
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import MIX


@MIX.register("sum", short="sum")
class SumMix(nn.Module):
    """o = o_fw + o_kv (Based-style)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()

    def forward(self, x, o_kv, o_fw):
        return o_fw + o_kv


@MIX.register("static_scalar", short="ss")
class StaticScalarMix(nn.Module):
    """o = s_fw·o_fw + s_kv·o_kv with two learned layer-wide scalars, both initialised to 1."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.s_fw = nn.Parameter(torch.ones(()))
        self.s_kv = nn.Parameter(torch.ones(()))

    def forward(self, x, o_kv, o_fw):
        return self.s_fw * o_fw + self.s_kv * o_kv


@MIX.register("dynamic_scalar", short="ds")
class DynamicScalarMix(nn.Module):
    """[a; b] = σ(W_s x): per-head scalars, two independent sigmoids (not convex): o = a·o_fw + b·o_kv."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.proj = nn.Linear(d_model, 2 * n_heads, bias=False)

    def forward(self, x, o_kv, o_fw):
        a, b = torch.sigmoid(self.proj(x)).unsqueeze(-1).split(self.n_heads, dim=-2)
        return a * o_fw + b * o_kv


@MIX.register("vector", short="vec")
class VectorMix(nn.Module):
    """g = σ(W_g x) per channel: o = g⊙o_fw + (1−g)⊙o_kv (convex, LSTM-style gate)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.proj = nn.Linear(d_model, n_heads * head_dim, bias=False)

    def forward(self, x, o_kv, o_fw):
        g = torch.sigmoid(self.proj(x)).unflatten(-1, (self.n_heads, self.head_dim))
        return g * o_fw + (1.0 - g) * o_kv
