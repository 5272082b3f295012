"""The four mix formulas of docs/hqlt-math.md §3.5 against hand computations on small tensors.

Each mix is built as ``Mix(d_model, n_heads, head_dim)`` and called as ``mix(x, o_kv, o_fw)`` with x the
pre-normed layer input [B, T, D] and o_* [B, T, H, d]. The hand computations loop over heads and
channels with plain scalar arithmetic, so they do not share any reshape/split logic with the modules.
"""
import math

import pytest
import torch

from hqlt.blocks import MIX
from hqlt.blocks.mixing import DynamicScalarMix, StaticScalarMix, SumMix, VectorMix

B, T, H, d = 2, 3, 3, 2
D = 5  # the mix input width need not be H*d: only its projection's output is shaped per head


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    o_kv = torch.randn(B, T, H, d, generator=gen, dtype=torch.float64)
    o_fw = torch.randn(B, T, H, d, generator=gen, dtype=torch.float64)
    return x, o_kv, o_fw


def test_registry_holds_exactly_the_four_mixes():
    assert MIX.names() == ["dynamic_scalar", "static_scalar", "sum", "vector"]
    for name, cls in [("sum", SumMix), ("static_scalar", StaticScalarMix), ("dynamic_scalar", DynamicScalarMix),
                      ("vector", VectorMix)]:
        assert MIX.get(name).impl is cls


def test_sum(data):
    x, o_kv, o_fw = data
    mix = SumMix(D, H, d)
    assert list(mix.parameters()) == []
    out = mix(x, o_kv, o_fw)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for c in range(d):
                    assert out[b, t, h, c].item() == pytest.approx(o_fw[b, t, h, c].item() + o_kv[b, t, h, c].item())


def test_static_scalar_init_formula_and_gradients(data):
    x, o_kv, o_fw = data
    mix = StaticScalarMix(D, H, d).double()
    params = dict(mix.named_parameters())
    assert set(params) == {"s_fw", "s_kv"}
    assert all(p.shape == () and p.item() == 1.0 for p in params.values())  # two layer scalars, init 1
    # At init the formula reduces to the sum.
    torch.testing.assert_close(mix(x, o_kv, o_fw), o_fw + o_kv)
    with torch.no_grad():
        mix.s_fw.fill_(0.3)
        mix.s_kv.fill_(-1.7)
    out = mix(x, o_kv, o_fw)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for c in range(d):
                    want = 0.3 * o_fw[b, t, h, c].item() - 1.7 * o_kv[b, t, h, c].item()
                    assert out[b, t, h, c].item() == pytest.approx(want)
    # Gradients flow to both scalars: d/ds_fw sum(o) = sum(o_fw), d/ds_kv = sum(o_kv).
    out.sum().backward()
    assert mix.s_fw.grad.item() == pytest.approx(o_fw.sum().item())
    assert mix.s_kv.grad.item() == pytest.approx(o_kv.sum().item())


def test_dynamic_scalar_two_independent_per_head_sigmoids(data):
    x, o_kv, o_fw = data
    mix = DynamicScalarMix(D, H, d).double()
    assert mix.proj.weight.shape == (2 * H, D) and mix.proj.bias is None
    with torch.no_grad():
        mix.proj.weight.copy_(torch.randn(2 * H, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    W = mix.proj.weight.detach()
    out = mix(x, o_kv, o_fw)
    a_sum_to_one = True
    for b in range(B):
        for t in range(T):
            logits = [sum(W[r, i].item() * x[b, t, i].item() for i in range(D)) for r in range(2 * H)]
            for h in range(H):
                a = sig(logits[h])        # first H outputs: FW weight of head h
                bb = sig(logits[H + h])   # last H outputs: KV weight of head h
                a_sum_to_one &= abs(a + bb - 1) < 1e-6
                for c in range(d):
                    want = a * o_fw[b, t, h, c].item() + bb * o_kv[b, t, h, c].item()
                    assert out[b, t, h, c].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert not a_sum_to_one  # not convex: the two weights are independent


def test_dynamic_scalar_weights_are_per_head_not_per_channel(data):
    x, _, _ = data
    mix = DynamicScalarMix(D, H, d).double()
    ones = torch.ones(B, T, H, d, dtype=torch.float64)
    w_fw = mix(x, torch.zeros_like(ones), ones)   # = a broadcast over channels
    w_kv = mix(x, ones, torch.zeros_like(ones))   # = b
    assert torch.equal(w_fw[..., 0], w_fw[..., 1]) and torch.equal(w_kv[..., 0], w_kv[..., 1])
    assert ((w_fw > 0) & (w_fw < 1)).all() and ((w_kv > 0) & (w_kv < 1)).all()


def test_vector_convex_per_channel_gate(data):
    x, o_kv, o_fw = data
    mix = VectorMix(D, H, d).double()
    assert mix.proj.weight.shape == (H * d, D) and mix.proj.bias is None
    with torch.no_grad():
        mix.proj.weight.copy_(torch.randn(H * d, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    W = mix.proj.weight.detach()
    out = mix(x, o_kv, o_fw)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for c in range(d):
                    row = h * d + c  # heads are contiguous blocks of d channels
                    g = sig(sum(W[row, i].item() * x[b, t, i].item() for i in range(D)))
                    want = g * o_fw[b, t, h, c].item() + (1 - g) * o_kv[b, t, h, c].item()
                    assert out[b, t, h, c].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # Convex: equal inputs pass through unchanged whatever the gate.
    torch.testing.assert_close(mix(x, o_kv, o_kv), o_kv)


@pytest.mark.parametrize("name", ["dynamic_scalar", "vector"])
def test_dynamic_gates_read_the_layer_input(name, data):
    """The gates depend on x (and only on x): changing x changes the output, o_* fixed."""
    x, o_kv, o_fw = data
    mix = MIX.get(name).impl(D, H, d).double()
    out1 = mix(x, o_kv, o_fw)
    out2 = mix(x + 1.0, o_kv, o_fw)
    assert not torch.allclose(out1, out2)
    out1.sum().backward()
    assert mix.proj.weight.grad is not None and mix.proj.weight.grad.abs().sum() > 0


def test_gates_near_half_at_default_init():
    """With W ~ N(0, 0.02²) (the model's init) the gate is ≈ 0.5 everywhere (docs/hqlt-math.md §3.5)."""
    mix = VectorMix(64, 4, 16)
    torch.nn.init.normal_(mix.proj.weight, 0.0, 0.02)
    x = torch.randn(2, 5, 64)
    ones = torch.ones(2, 5, 4, 16)
    g = mix(x, torch.zeros_like(ones), ones)
    # logit std = 0.02·sqrt(64) = 0.16, so σ stays well inside (0.3, 0.7) and averages 0.5
    assert (g - 0.5).abs().max() < 0.2 and abs(g.mean().item() - 0.5) < 0.02
