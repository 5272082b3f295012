"""The registered KV memories, FW memories and blends (docs/hqlt-math.md §3.3, §3.4, §4).

A KV entry says how the shared q, k reach softmax attention (window, positions); an FW entry says how
they are featurised and which per-token rates it needs (β, decay g). Blends are names the kernel
understands; their visibility semantics live in `hqlt.kernels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hqlt.kernels import l2_normalize

from .validation import join, require
from .registry import BLEND, FW, KV, NoOptions


# ----------------------------------------------------------------------------------------- KV memory
@dataclass(frozen=True)
class SoftmaxKVConfig:
    window: Optional[int] = 64  # W keys incl. the current one; null = full causal (KV-only layers)
    pos: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0

    def check(self, path: str) -> None:
        require(self.window is None or self.window >= 1, join(path, "window"),
                f"got {self.window}; allowed: an integer >= 1, or null for full causal attention")
        require(self.rope_theta > 0, join(path, "rope_theta"), f"got {self.rope_theta}; allowed: > 0")


def _kv_short(cfg: SoftmaxKVConfig) -> str:
    return ("T" if cfg.window is None else f"SWA{cfg.window}") + ("" if cfg.pos == "rope" else "-np")


@KV.register("softmax", config=SoftmaxKVConfig, short=_kv_short)
class SoftmaxKV:
    """Softmax attention on raw (optionally RoPE-rotated) q, k; values are the shared silu(W_v x)."""

    @staticmethod
    def prepare(q: torch.Tensor, k: torch.Tensor, cfg: SoftmaxKVConfig, offset: int = 0):
        if cfg.pos == "none":
            return q, k
        return apply_rope(q, cfg.rope_theta, offset), apply_rope(k, cfg.rope_theta, offset)


def apply_rope(x: torch.Tensor, theta: float, offset: int = 0) -> torch.Tensor:
    """GPT-NeoX rotate-half RoPE over the full head dim; x is [B, T, H, D], positions offset..offset+T-1."""
    _, T, _, D = x.shape
    half = D // 2
    ftype = torch.promote_types(x.dtype, torch.float32)  # angles in fp32, or fp64 for fp64 inputs
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=x.device, dtype=ftype) / half))
    pos = torch.arange(offset, offset + T, device=x.device, dtype=ftype)
    ang = torch.outer(pos, inv_freq)  # [T, half]
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)[None, :, None, :].to(x.dtype)
    if D % 2:  # odd head dims leave the last channel unrotated
        cos = F.pad(cos, (0, 1), value=1.0)
        sin = F.pad(sin, (0, 1), value=0.0)
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        rotated = torch.cat([-x2, x1, torch.zeros_like(rest)], dim=-1)
    else:
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------- FW memory
@dataclass(frozen=True)
class DeltaConfig:
    beta_range: Literal[1, 2] = 2  # 2: β ∈ (0,2), eigenvalues of I − βkkᵀ in (−1,1) — needed for parity


class FWMemory:
    """Base FW entry: which per-token rates it needs and how q, k are featurised."""

    kernel_name: str = ""
    uses_beta: bool = True
    uses_decay: bool = False

    @staticmethod
    def featurize(q: torch.Tensor, k: torch.Tensor):
        return l2_normalize(F.silu(q)), l2_normalize(F.silu(k))


@FW.register("delta", config=DeltaConfig, short=lambda c: f"dn{c.beta_range}")
class DeltaRule(FWMemory):
    kernel_name = "delta"


@FW.register("gated_delta", config=DeltaConfig, short=lambda c: f"gdn{c.beta_range}")
class GatedDeltaRule(FWMemory):
    """Gated DeltaNet: the state decays by exp(g_t) before each delta update."""

    kernel_name = "gated_delta"
    uses_decay = True


@FW.register("linear", short="lin")
class LinearAttention(FWMemory):
    """Sum-normalised causal linear attention with elu+1 features on raw q, k; β unused (§4.4)."""

    kernel_name = "linear"
    uses_beta = False

    @staticmethod
    def featurize(q: torch.Tensor, k: torch.Tensor):
        return F.elu(q) + 1.0, F.elu(k) + 1.0


class DecayRate(nn.Module):
    """g_t = −exp(A_log)·softplus(W_a x_t + dt_bias) per head (Gated DeltaNet / Mamba-2 parameterisation)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.reset_special()

    def reset_special(self) -> None:
        # A ~ U(1, 16) and softplus(dt_bias) ~ logU(1e-3, 1e-1): slow decays at init, as in Mamba-2.
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ftype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 up to fp32; fp64 stays fp64
        return -self.A_log.to(ftype).exp() * F.softplus(self.proj(x).to(ftype) + self.dt_bias.to(ftype))


# ----------------------------------------------------------------------------------------- blends
@dataclass(frozen=True)
class DelayedChunkConfig:
    # FW read interval R: query t reads the FW state before position R*floor(t/R); null = the KV chunk C
    # (model.mixer.kv.window), the paper's description. The reference kernel uses R = 64 whatever C is
    # (docs/hqlt-math.md §4.3). R != C runs the pure-torch kernel forms (hqlt.kernels.hybrid_memory).
    fw_chunk: Optional[int] = None

    def check(self, path: str) -> None:
        require(self.fw_chunk is None or self.fw_chunk >= 1, join(path, "fw_chunk"),
                f"got {self.fw_chunk}; allowed: an integer >= 1, or null (= the KV chunk, model.mixer.kv.window)")


for _name, _short in (("sync", "S"), ("delayed_stream", "D")):
    BLEND.register(_name, config=NoOptions, short=_short)(_name)
# short id: "C" + window ("C8"); with a read interval "R64C" + window ("R64C8")
BLEND.register("delayed_chunk", config=DelayedChunkConfig,
               short=lambda c: "C" if c.fw_chunk is None else f"R{c.fw_chunk}C")("delayed_chunk")
