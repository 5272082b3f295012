"""Analytic size and cost estimates of a model config — no model is built, so a sweep can check budgets
inside Optuna's define-by-run in microseconds. Parameter counts are exact (a test compares them with
the built module); FLOPs follow docs/tasks.md §C7 (model FLOPs: a multiply-add is 2, backward 2×).
"""
from __future__ import annotations

from dataclasses import dataclass

from .model_schema import ModelConfig

_MIX_PARAMS = {"sum": lambda D, H: 0, "static_scalar": lambda D, H: 2,
               "dynamic_scalar": lambda D, H: D * 2 * H, "vector": lambda D, H: D * D}


def _layer_params(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(all parameters, matmul weights) of one block of `kind`."""
    D, H, d = cfg.d_model, cfg.n_heads, cfg.head_dim
    m = cfg.mixer
    fw_entry, _ = m.part("fw")
    use_fw = kind in "HF"
    has_mlp = cfg.mlp == "swiglu"
    matmul = 4 * D * D + (3 * D * cfg.mlp_hidden if has_mlp else 0)
    other = (2 if has_mlp else 1) * D + d  # block norms (no MLP norm without an MLP) + per-head output norm
    if m.short_conv:
        other += 3 * D * m.conv_size
    if use_fw and fw_entry.impl.uses_beta:
        matmul += D * H
    if use_fw and fw_entry.impl.uses_decay:
        matmul += D * H
        other += 2 * H
    if kind == "H":
        mix = m.part("mix")[0].name
        n = _MIX_PARAMS[mix](D, H)
        matmul, other = (matmul + n, other) if mix in ("dynamic_scalar", "vector") else (matmul, other + n)
    if m.output_gate:
        matmul += D * D
    return matmul + other, matmul


def param_count(cfg: ModelConfig) -> int:
    V, D = cfg.vocab_size, cfg.d_model
    total = V * D + D + (0 if cfg.tie_embeddings else V * D)
    if cfg.pos_emb == "learned":
        total += cfg.max_len * D
    return total + sum(_layer_params(cfg, kind)[0] for kind in cfg.pattern)


def pairs_scored(T: int, W: int | None, blend: str = "sync") -> int:
    """Query-key pairs of causal attention over T tokens: window W (incl. self), chunk-local for delayed_chunk."""
    if W is None:
        return T * (T + 1) // 2
    if blend == "delayed_chunk":
        full, rest = divmod(T, W)
        return full * W * (W + 1) // 2 + rest * (rest + 1) // 2
    if W >= T:
        return T * (T + 1) // 2
    return W * T - W * (W - 1) // 2


def fw_flops_per_token(d: int, C: int, fw: str, blend: str) -> float:
    """Forward FLOPs per token and head of the chunked FW memory (§C7)."""
    if fw == "linear":
        return 4 * C * d + 4 * d * d
    if blend == "delayed_chunk":  # no intra-chunk read-out term
        return 6 * C * d + 6 * d * d + (2 / 3) * C * C
    return 10 * C * d + 6 * d * d + (2 / 3) * C * C


@dataclass(frozen=True)
class Estimate:
    params: int
    fw_state_bytes: int
    kv_cache_bytes: int
    flops_per_token: float  # training (forward + backward) model FLOPs per token


def estimate(cfg: ModelConfig, seq_len: int, *, state_bytes: int = 4, cache_bytes: int = 2) -> Estimate:
    """Sizes per sequence at length `seq_len`: FW state in fp32, KV cache (k and v) in bf16 by default."""
    H, d = cfg.n_heads, cfg.head_dim
    kv = cfg.mixer.part("kv")[1]
    fw_entry, _ = cfg.mixer.part("fw")
    blend_entry, blend_opts = cfg.mixer.part("blend")
    blend = blend_entry.name
    # Delayed-Chunk's FW runs in chunks of its read interval R (fw_chunk; null = the KV chunk C = window)
    read_every = getattr(blend_opts, "fw_chunk", None) or kv.window
    fw_kind = fw_entry.impl.kernel_name
    fw_state = kv_cache = 0
    flops = 6.0 * cfg.d_model * cfg.vocab_size  # LM head (a matmul even when tied)
    for kind in cfg.pattern:
        flops += 6.0 * _layer_params(cfg, kind)[1]
        if kind in "HF":
            fw_state += H * d * d * state_bytes + (H * d * state_bytes if fw_kind == "linear" else 0)
            fw_blend = blend if kind == "H" else "sync"
            flops += 3.0 * H * fw_flops_per_token(d, cfg.chunk_size if fw_blend != "delayed_chunk" else read_every,
                                                  fw_kind, fw_blend)
        if kind in "HK":
            kv_blend = blend if kind == "H" else "sync"
            window = kv.window
            keys = seq_len if window is None else min(seq_len, window)
            kv_cache += 2 * H * d * keys * cache_bytes
            flops += 3.0 * H * 4 * d * pairs_scored(seq_len, window, kv_blend) / seq_len
    return Estimate(param_count(cfg), fw_state, kv_cache, flops)
