"""The language model: embedding (+ learned positions) → L pre-norm blocks (mixer + SwiGLU MLP, or the mixer
alone) → RMSNorm → LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .memories import DecayRate
from .mixer import HybridMixer, RMSNorm
from .model_schema import ModelConfig, model_config


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = HybridMixer(cfg, kind)
        has_mlp = cfg.mlp == "swiglu"  # `mlp: none`: the block is the mixer alone (no MLP, no second norm)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if has_mlp else None
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden) if has_mlp else None

    def forward(self, x):
        h = x + self.mixer(self.mixer_norm(x))
        return h if self.mlp is None else h + self.mlp(self.mlp_norm(h))


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig | dict):
        super().__init__()
        cfg = model_config(cfg)  # validates (and completes) a dict or a directly constructed ModelConfig
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size: got 0; set it or let the task provide it")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # learned absolute positions 0..max_len-1, added to the token embeddings (`pos_emb: learned`)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.blocks = nn.ModuleList([Block(cfg, kind) for kind in cfg.pattern])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, std²) for every linear/conv/embedding; out projections (mixer o_proj, MLP down_proj)
        Kaiming-uniform(a=√5) scaled by 1/√(2L) (docs/hqlt-math.md §3.7); norms 1, scalars 1."""
        std, L = self.cfg.init_std, self.cfg.n_layers
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if name.endswith(("o_proj", "down_proj")):
                    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                    with torch.no_grad():
                        module.weight.div_(math.sqrt(2 * L))
            elif isinstance(module, DecayRate):
                module.reset_special()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, V]."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            T = tokens.shape[1]
            if T > self.pos_embed.num_embeddings:
                raise ValueError(f"sequence length {T} exceeds model.max_len={self.pos_embed.num_embeddings} "
                                 f"(learned position embeddings)")
            x = x + self.pos_embed(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(cfg: ModelConfig | dict) -> HybridLM:
    return HybridLM(cfg)
