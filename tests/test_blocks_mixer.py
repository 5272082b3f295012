"""HybridMixer against docs/hqlt-math.md §3: RoPE, what each branch sees, shared v, β range, the order
mix → per-head RMSNorm → output gate, and a full hand re-implementation of the layer's forward from its
weights (with the step-by-step kernel oracle, backend "recurrent") compared with the module output."""
import math

import pytest
import torch
import torch.nn.functional as F

import hqlt.kernels
from hqlt.blocks import MIX
from hqlt.blocks.memories import apply_rope
from hqlt.blocks.mixer import RMSNorm
from hqlt.blocks.mixer import HybridMixer
from hqlt.blocks.model_schema import model_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (see test_blocks_model)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_mixer(kind="H", *, D=16, H=2, window=3, pos="rope", fw="delta", beta_range=2, blend="sync", mix="vector",
               short_conv=False, output_gate=False, chunk_size=4, seed=0):
    fw_spec = {"name": fw, "beta_range": beta_range} if fw != "linear" else "linear"
    cfg = model_config({"vocab_size": 8, "d_model": D, "n_heads": H, "n_layers": 1, "layers": kind,
                        "chunk_size": chunk_size,
                        "mixer": {"kv": {"name": "softmax", "window": window, "pos": pos}, "fw": fw_spec,
                                  "blend": blend, "mix": mix, "short_conv": short_conv, "conv_size": 3,
                                  "output_gate": output_gate}})
    torch.manual_seed(seed)
    mixer = HybridMixer(cfg, kind).double()
    with torch.no_grad():  # O(1) random weights everywhere so that every term matters numerically
        for name, p in mixer.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0) + (1.0 if "norm" in name else 0.0))
    return mixer


def inputs(B=2, T=11, D=16, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ RoPE
def rope_by_hand(x, theta=10000.0, offset=0):
    """Rotate-half (GPT-NeoX) RoPE written per channel pair (i, i + D/2), angle p·θ^(−i/(D/2))."""
    B, T, H, D = x.shape
    half = D // 2
    out = x.clone()
    for p in range(T):
        for i in range(half):
            ang = (p + offset) * theta ** (-i / half)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[:, p, :, i], x[:, p, :, i + half]
            out[:, p, :, i] = a * c - b * s
            out[:, p, :, i + half] = b * c + a * s
    return out


def test_rope_matches_rotate_half_by_hand():
    x = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, 10000.0), rope_by_hand(x))
    torch.testing.assert_close(apply_rope(x, 500.0, offset=7), rope_by_hand(x, 500.0, offset=7))
    torch.testing.assert_close(apply_rope(x, 10000.0)[:, 0], x[:, 0])  # position 0 is the identity


def test_rope_odd_head_dim_leaves_last_channel():
    x = torch.randn(1, 6, 2, 7, dtype=torch.float64)
    y = apply_rope(x, 10000.0)
    torch.testing.assert_close(y[..., 6], x[..., 6])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_preserves_norm():
    x = torch.randn(3, 40, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, 10000.0).norm(dim=-1), x.norm(dim=-1))


def test_rope_scores_depend_only_on_position_difference():
    gen = torch.Generator().manual_seed(3)
    T, D = 24, 16
    q = torch.randn(D, generator=gen, dtype=torch.float64).expand(1, T, 1, D)
    k = torch.randn(D, generator=gen, dtype=torch.float64).expand(1, T, 1, D)
    scores = apply_rope(q, 10000.0)[0, :, 0] @ apply_rope(k, 10000.0)[0, :, 0].T  # [m, n] = <R_m q, R_n k>
    for delta in range(-T + 1, T):
        diag = torch.diagonal(scores, offset=delta)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))  # Toeplitz: a function of n − m
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 5)[0])
    # An offset shifts positions: rope(x, offset=s) == rope(x at positions s..)
    x = torch.randn(1, 10, 2, D, dtype=torch.float64)
    long = torch.cat([torch.zeros(1, 4, 2, D, dtype=torch.float64), x], dim=1)
    torch.testing.assert_close(apply_rope(x, 10000.0, offset=4), apply_rope(long, 10000.0)[:, 4:])


# ------------------------------------------------------------------------------ branch inputs
class Capture:
    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(hqlt.kernels, name)

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            return out

        monkeypatch.setattr(hqlt.kernels, name, spy)


def projections(mixer, x):
    H, d = mixer.n_heads, mixer.head_dim
    q = (x @ mixer.q_proj.weight.T).unflatten(-1, (H, d))
    k = (x @ mixer.k_proj.weight.T).unflatten(-1, (H, d))
    v = F.silu(x @ mixer.v_proj.weight.T).unflatten(-1, (H, d))
    return q, k, v


def l2(z):
    return z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)


def test_kv_branch_gets_rope_fw_branch_does_not_and_v_is_shared(monkeypatch):
    spy = Capture(monkeypatch, "hybrid_memory")
    mixer = make_mixer()
    x = inputs()
    mixer(x)
    (q_kv, k_kv, q_fw, k_fw, v, beta), kwargs, _ = spy.calls[0]
    q, k, v_want = projections(mixer, x)
    torch.testing.assert_close(q_kv, rope_by_hand(q))   # raw q, rotated
    torch.testing.assert_close(k_kv, rope_by_hand(k))
    assert not torch.allclose(q_kv, q)
    torch.testing.assert_close(q_fw, l2(F.silu(q)))     # unrotated, silu + l2
    torch.testing.assert_close(k_fw, l2(F.silu(k)))
    torch.testing.assert_close(v, v_want)               # one v = silu(W_v x) for both memories
    assert kwargs["blend"] == "sync" and kwargs["window"] == 3 and kwargs["fw"] == "delta" and kwargs["g"] is None


def test_pos_none_leaves_kv_raw_and_rope_never_changes_fw(monkeypatch):
    """Perturbation: the same weights with pos rope vs none give the identical FW output, a different KV output."""
    spy = Capture(monkeypatch, "hybrid_memory")
    x = inputs()
    make_mixer(pos="rope")(x)
    make_mixer(pos="none")(x)
    (args_r, _, (o_kv_r, o_fw_r)), (args_n, _, (o_kv_n, o_fw_n)) = spy.calls
    q, k, _ = projections(make_mixer(pos="none"), x)
    torch.testing.assert_close(args_n[0], q)
    torch.testing.assert_close(args_n[1], k)
    torch.testing.assert_close(o_fw_r, o_fw_n, rtol=0, atol=0)
    assert not torch.allclose(o_kv_r, o_kv_n)


def test_kv_only_and_fw_only_layers_see_the_same_preprocessing(monkeypatch):
    kv_spy = Capture(monkeypatch, "kv_memory")
    fw_spy = Capture(monkeypatch, "fw_memory")
    x = inputs()
    k_mixer = make_mixer("K", window=None)
    k_mixer(x)
    q, k, v = projections(k_mixer, x)
    (q_kv, k_kv, v_kv), kw, _ = kv_spy.calls[0]
    torch.testing.assert_close(q_kv, rope_by_hand(q))
    torch.testing.assert_close(k_kv, rope_by_hand(k))
    torch.testing.assert_close(v_kv, v)
    assert kw["window"] is None
    f_mixer = make_mixer("F", beta_range=1)
    f_mixer(x)
    q, k, v = projections(f_mixer, x)
    (q_fw, k_fw, v_fw, beta), kw, _ = fw_spy.calls[0]
    torch.testing.assert_close(q_fw, l2(F.silu(q)))
    torch.testing.assert_close(k_fw, l2(F.silu(k)))
    torch.testing.assert_close(v_fw, v)
    torch.testing.assert_close(beta, torch.sigmoid(x @ f_mixer.beta_proj.weight.T))


@pytest.mark.parametrize("beta_range", [1, 2])
def test_beta_range(monkeypatch, beta_range):
    """β = beta_range·σ(W_β x): in (0, 1) or (0, 2); large logits push it to the top of its range."""
    spy = Capture(monkeypatch, "hybrid_memory")
    mixer = make_mixer(beta_range=beta_range)
    x = inputs()
    with torch.no_grad():
        mixer.beta_proj.weight.mul_(4.0)  # logits up to ~±20: saturating, yet below float64's σ(37) = 1
    mixer(x)
    beta = spy.calls[0][0][5]
    assert beta.shape == (2, 11, 2) and beta.dtype == torch.float64
    assert (beta > 0).all() and (beta < beta_range).all()
    assert beta.max() > beta_range - 1e-3
    assert beta.min() < 1e-3  # and small logits to the bottom
    torch.testing.assert_close(beta, beta_range * torch.sigmoid(x @ mixer.beta_proj.weight.T))


def test_linear_fw_gets_elu_features_on_raw_qk(monkeypatch):
    spy = Capture(monkeypatch, "hybrid_memory")
    mixer = make_mixer(fw="linear")
    x = inputs()
    mixer(x)
    q_fw, k_fw, beta = spy.calls[0][0][2], spy.calls[0][0][3], spy.calls[0][0][5]
    q, k, _ = projections(mixer, x)
    torch.testing.assert_close(q_fw, F.elu(q) + 1)
    torch.testing.assert_close(k_fw, F.elu(k) + 1)
    assert mixer.beta_proj is None and torch.equal(beta, torch.ones_like(beta))  # β unused (§4.4)


def test_norm_after_mix_then_gate():
    """Hooks: the per-head RMSNorm's input is exactly the mix output; its output has unit RMS per head
    (weight 1); the output gate multiplies after the norm; o_proj reads the gated, normed heads."""
    mixer = make_mixer(mix="dynamic_scalar", output_gate=True)
    with torch.no_grad():
        mixer.head_norm.weight.fill_(1.0)
    seen = {}
    mixer.mix.register_forward_hook(lambda m, a, out: seen.__setitem__("mix", out))
    mixer.head_norm.register_forward_hook(lambda m, a, out: seen.update(norm_in=a[0], norm_out=out))
    mixer.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0]))
    x = inputs()
    mixer(x)
    assert seen["norm_in"] is seen["mix"] and seen["mix"].shape == (2, 11, 2, 8)
    ms = seen["mix"].pow(2).mean(-1)
    torch.testing.assert_close(seen["norm_out"].pow(2).mean(-1), ms / (ms + 1e-6))  # unit RMS up to eps
    gate = F.silu(x @ mixer.gate_proj.weight.T)
    torch.testing.assert_close(seen["o_in"], seen["norm_out"].flatten(-2) * gate)


# ------------------------------------------------------------------------------ full hand re-implementation
def causal_depthwise_conv(x, weight):
    """x [B, T, C], weight [C, 1, K]: y[t, c] = Σ_i w[c, i]·x[t − (K − 1) + i, c] (zeros before t = 0)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(K):
            s = t - (K - 1) + i
            if s >= 0:
                y[:, t] += weight[:, 0, i] * x[:, s]
    return y


def mixer_by_hand(m, x):
    H, d = m.n_heads, m.head_dim
    q, k, v = (x @ p.weight.T for p in (m.q_proj, m.k_proj, m.v_proj))
    if m.convs is not None:
        q, k, v = (causal_depthwise_conv(t, c.conv.weight) for t, c in zip((q, k, v), m.convs))
    q, k = q.unflatten(-1, (H, d)), k.unflatten(-1, (H, d))
    v = F.silu(v).unflatten(-1, (H, d))
    kv_cfg, fw_name = m.kv_cfg, m.fw_entry.name
    q_kv, k_kv = (rope_by_hand(q, kv_cfg.rope_theta), rope_by_hand(k, kv_cfg.rope_theta)) if kv_cfg.pos == "rope" else (q, k)
    g = None
    if m.kind == "K":
        pass  # no FW memory: no featurised q, k, no β
    elif fw_name == "linear":
        q_fw, k_fw = F.elu(q) + 1, F.elu(k) + 1
        beta = torch.ones(*x.shape[:2], H, dtype=x.dtype)
    else:
        q_fw, k_fw = l2(F.silu(q)), l2(F.silu(k))
        beta = m.fw_cfg.beta_range * torch.sigmoid(x @ m.beta_proj.weight.T)
    if fw_name == "gated_delta" and m.kind != "K":
        g = -m.decay.A_log.exp() * F.softplus(x @ m.decay.proj.weight.T + m.decay.dt_bias)
    if m.kind == "H":
        o_kv, o_fw = hqlt.kernels.hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=m.blend, window=kv_cfg.window,
                                                fw=fw_name, g=g, backend="recurrent")
        mix = next(n for n in MIX.names() if MIX.get(n).impl is type(m.mix))
        if mix == "sum":
            o = o_fw + o_kv
        elif mix == "static_scalar":
            o = m.mix.s_fw * o_fw + m.mix.s_kv * o_kv
        elif mix == "dynamic_scalar":
            s = torch.sigmoid(x @ m.mix.proj.weight.T)
            o = s[..., :H, None] * o_fw + s[..., H:, None] * o_kv
        else:
            gate = torch.sigmoid(x @ m.mix.proj.weight.T).unflatten(-1, (H, d))
            o = gate * o_fw + (1 - gate) * o_kv
    elif m.kind == "K":
        o = hqlt.kernels.kv_memory(q_kv, k_kv, v, window=kv_cfg.window, backend="recurrent")
    else:
        o = hqlt.kernels.fw_memory(q_fw, k_fw, v, beta, fw=fw_name, g=g, backend="recurrent")
    y = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.head_norm.weight
    if m.gate_proj is not None:
        y = y * F.silu(x @ m.gate_proj.weight.T).unflatten(-1, (H, d))
    return y.flatten(-2) @ m.o_proj.weight.T


HAND_CASES = {
    "sync-vector": dict(),
    "delayed_chunk-dynamic_scalar-conv-gate": dict(blend="delayed_chunk", mix="dynamic_scalar", short_conv=True,
                                                   output_gate=True),
    "delayed_stream-static_scalar-gated_delta-nopos": dict(blend="delayed_stream", mix="static_scalar",
                                                           fw="gated_delta", pos="none"),
    "sync-sum-linear-beta1": dict(mix="sum", fw="linear", window=5),
    "delayed_chunk-vector-window4": dict(blend="delayed_chunk", window=4, beta_range=1),
    "K-full-causal-gate": dict(kind="K", window=None, output_gate=True),
    "K-swa-nopos-conv": dict(kind="K", window=4, pos="none", short_conv=True),
    "F-delta1-conv": dict(kind="F", beta_range=1, short_conv=True),
    "F-gated_delta": dict(kind="F", fw="gated_delta"),
}


@pytest.mark.parametrize("case", HAND_CASES)
def test_mixer_forward_equals_hand_reimplementation(case):
    kw = dict(HAND_CASES[case])
    mixer = make_mixer(**kw)
    x = inputs()
    with torch.no_grad():
        got = mixer(x)
        want = mixer_by_hand(mixer, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["sync-vector", "delayed_chunk-dynamic_scalar-conv-gate",
                                  "delayed_stream-static_scalar-gated_delta-nopos"])
def test_mixer_gradcheck_float64(case):
    """The whole layer's backward in float64 (every sub-step keeps float64: norms, β, decay, RoPE angles)."""
    mixer = make_mixer(**{**HAND_CASES[case], "D": 8})
    x = inputs(B=1, T=7, D=8).requires_grad_()
    assert torch.autograd.gradcheck(mixer, (x,), eps=1e-6, atol=1e-6)


def test_rmsnorm_precision():
    """fp16/bf16 are normalised in fp32 and returned in their dtype; fp64 is not downcast."""
    norm = RMSNorm(8, 1e-6).double()
    x = torch.randn(3, 8, dtype=torch.float64) * 1e-3
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-14, atol=0)
    y = RMSNorm(8, 1e-6).bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
