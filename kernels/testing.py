"""Helpers for testing and benchmarking kernel backends against the reference: random inputs shaped and
featurised the way the HQLT layer produces them, and the error measure the tests use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import l2_normalize

INPUT_NAMES = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta", "g")


def random_inputs(batch: int, seq: int, heads: int, dk: int, dv: int | None = None, *, fw: str = "delta",
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0,
                  requires_grad: bool = False) -> dict[str, Tensor | None]:
    """Keyword arguments for ``hybrid_memory``'s tensors, [B, T, H, D] each.

    FW queries/keys are featurised like the layer does (l2(silu(.)) for the delta kinds, elu+1 for
    linear); beta in (0, 2) (the HQLT range); g (gated_delta only) log-decays <= 0 that include strong
    ones, so masking of large decay differences is exercised.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    feature = (lambda x: F.elu(x) + 1) if fw == "linear" else (lambda x: l2_normalize(F.silu(x)))
    shape = (batch, seq, heads, dk)
    inputs = {
        "q_kv": randn(*shape), "k_kv": randn(*shape),
        "q_fw": feature(randn(*shape)), "k_fw": feature(randn(*shape)),
        "v": randn(batch, seq, heads, dv or dk),
        "beta": 2 * torch.sigmoid(randn(batch, seq, heads)),
        "g": F.logsigmoid(2 * randn(batch, seq, heads) + 1) if fw == "gated_delta" else None,
    }
    if requires_grad:
        inputs = {k: None if x is None else x.detach().requires_grad_() for k, x in inputs.items()}
    return inputs


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are exactly zero)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_opcheck(op, args) -> None:
    """``torch.library.opcheck`` of one custom op call, with every check's outcome asserted."""
    result = torch.library.opcheck(op, args)
    failed = {name: outcome for name, outcome in result.items() if outcome != "SUCCESS"}
    assert result and not failed, failed
