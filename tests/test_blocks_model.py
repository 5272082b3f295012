"""The model over every registry combination: forward + backward of tiny models, causality per blend,
initialisation (docs/hqlt-math.md §3.7) and construction paths.

Combinations (d_model 16, 2 heads, T 12, window 3 so that T > W and several KV/FW chunks exist):
* H layers: the full product blend × fw × mix (fw = delta β∈(0,1), delta β∈(0,2), gated_delta, linear),
  with pos / short_conv / output_gate rotated so each of their values meets every blend, fw and mix.
* Every layer pattern (H, K, F, HKF) × kv window (3, or null where allowed: K and F) × pos × short_conv ×
  output_gate × fw (where layers have an FW memory), with the blend / mix entries rotated through the
  registries.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hqlt.blocks import BLEND, FW, KV, MIX, HybridLM, build_model
from hqlt.blocks.model_schema import ModelConfig, model_config

V, D, HEADS, T, W = 11, 16, 2, 12, 3
BLENDS = BLEND.names()
MIXES = MIX.names()
FWS = [{"name": "delta", "beta_range": 1}, {"name": "delta", "beta_range": 2},
       {"name": "gated_delta", "beta_range": 2}, "linear"]
EXTRAS = list(itertools.product(["rope", "none"], [False, True], [False, True]))  # pos, short_conv, output_gate


def tiny(layers="H", *, window=W, pos="rope", fw="delta", blend="sync", mix="vector", short_conv=False,
         output_gate=False, n_layers=2, tie=False, **extra):
    cfg = {"vocab_size": V, "d_model": D, "n_heads": HEADS, "n_layers": n_layers, "layers": layers,
           "mlp_multiple_of": 16, "chunk_size": 4, "tie_embeddings": tie,
           "mixer": {"kv": {"name": "softmax", "window": window, "pos": pos}, "fw": fw, "blend": blend, "mix": mix,
                     "short_conv": short_conv, "conv_size": 3, "output_gate": output_gate}}
    cfg.update(extra)
    return cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine OpenMP barriers (e.g. in
    the depthwise conv1d backward) cost ~50 ms a call. Restored afterwards for the other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registries_cover_the_documented_entries():
    assert KV.names() == ["softmax"]
    assert FW.names() == ["delta", "gated_delta", "linear"]
    assert BLENDS == ["delayed_chunk", "delayed_stream", "sync"]
    assert MIXES == ["dynamic_scalar", "static_scalar", "sum", "vector"]


def fwd_bwd(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    tokens = torch.randint(0, V, (2, T))
    logits = model(tokens)
    assert logits.shape == (2, T, V)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    return model


H_COMBOS = [(blend, fw, mix, *EXTRAS[(i + j + k) % len(EXTRAS)])
            for (i, blend), (j, fw), (k, mix) in itertools.product(enumerate(BLENDS), enumerate(FWS), enumerate(MIXES))]


def _id(fw):
    return fw if isinstance(fw, str) else f"{fw['name']}{fw['beta_range']}"


@pytest.mark.parametrize("blend,fw,mix,pos,short_conv,output_gate", H_COMBOS,
                         ids=[f"{b}-{_id(f)}-{m}-{p}-c{int(c)}-g{int(g)}" for b, f, m, p, c, g in H_COMBOS])
def test_hybrid_layers_every_blend_fw_mix(blend, fw, mix, pos, short_conv, output_gate):
    model = fwd_bwd(tiny("H", fw=fw, blend=blend, mix=mix, pos=pos, short_conv=short_conv, output_gate=output_gate))
    mixer = model.blocks[0].mixer
    assert mixer.blend == blend and type(mixer.mix) is MIX.get(mix).impl
    fw_name = fw if isinstance(fw, str) else fw["name"]
    assert (mixer.beta_proj is None) == (fw_name == "linear")
    assert (mixer.decay is None) == (fw_name != "gated_delta")
    assert (mixer.convs is None) != short_conv and (mixer.gate_proj is None) != output_gate


def _pattern_combos():
    combos = []
    for layers, window, (pos, conv, gate), fw in itertools.product(["H", "K", "F", "HKF"], [W, None], EXTRAS, FWS):
        if window is None and "H" in layers:
            continue  # hybrid layers need a window (validated; see test_blocks_config)
        if layers == "K" and fw != FWS[0]:
            continue  # KV-only layers ignore the fw entry
        i = len(combos)
        combos.append((layers, window, pos, conv, gate, fw, BLENDS[i % 3], MIXES[(i // 3) % 4]))
    return combos


PATTERN_COMBOS = _pattern_combos()


@pytest.mark.parametrize("layers,window,pos,short_conv,output_gate,fw,blend,mix", PATTERN_COMBOS,
                         ids=[f"{c[0]}-w{c[1]}-{c[2]}-c{int(c[3])}-g{int(c[4])}-{_id(c[5])}-{c[6]}-{c[7]}"
                              for c in PATTERN_COMBOS])
def test_layer_patterns_windows_pos_conv_gate(layers, window, pos, short_conv, output_gate, fw, blend, mix):
    n_layers = len(layers) if len(layers) > 1 else 2
    model = fwd_bwd(tiny(layers, window=window, pos=pos, fw=fw, blend=blend, mix=mix, short_conv=short_conv,
                         output_gate=output_gate, n_layers=n_layers))
    kinds = "".join(b.mixer.kind for b in model.blocks)
    assert kinds == (layers if len(layers) > 1 else layers * 2)
    for block in model.blocks:
        m = block.mixer
        assert m.use_kv == (m.kind in "HK") and m.use_fw == (m.kind in "HF")
        assert (m.mix is not None) == (m.kind == "H")  # single-memory layers have no mix parameters
        if m.kind == "K":
            assert m.beta_proj is None and m.decay is None


def test_tied_embeddings_share_one_tensor_and_train():
    model = fwd_bwd(tiny("HKF", n_layers=3, tie=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())  # parameters() dedups shared


def test_documented_zero_gradient_delayed_stream_window_covers_sequence():
    """The one documented exception to 'every parameter gets a non-zero gradient': with delayed_stream and
    W >= T the FW stream holds only zero (delayed) keys, so o_fw = 0 and the β projection gets an exactly
    zero — but not None — gradient. Every other parameter still learns."""
    torch.manual_seed(0)
    model = build_model(tiny("H", window=T, blend="delayed_stream", mix="sum"))
    tokens = torch.randint(0, V, (2, T))
    model(tokens).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.endswith("beta_proj.weight"):
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layers,blend", [("H", b) for b in BLENDS] + [("K", "sync"), ("F", "sync"), ("HKF", "delayed_chunk")])
@pytest.mark.parametrize("short_conv", [False, True])
def test_causality(layers, blend, short_conv):
    """Changing token j never changes the logits at t < j, and does change them at t = j."""
    torch.manual_seed(1)
    n_layers = len(layers) if len(layers) > 1 else 2
    model = build_model(tiny(layers, blend=blend, fw="gated_delta" if layers == "F" else "delta",
                             short_conv=short_conv, n_layers=n_layers)).eval()
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        base = model(tokens)
        for j in (0, 1, W - 1, W, 5, 8, T - 1):
            changed = tokens.clone()
            changed[0, j] = (changed[0, j] + 1) % V
            out = model(changed)
            # (masked contributions are exact zeros, so earlier positions are bit-identical in practice)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6, msg=f"position {j} leaked")
            assert (out[:, j] - base[:, j]).abs().max() > 1e-4


def test_init_out_projections_norms_and_scalars():
    """N(0, 0.02²) everywhere, except mixer o_proj and MLP down_proj: Kaiming-uniform(a=√5) =
    U(±1/sqrt(fan_in)) divided by sqrt(2L); RMSNorm weights 1; static mix scalars 1."""
    L, Dm = 4, 128
    torch.manual_seed(0)
    model = build_model({"vocab_size": 64, "d_model": Dm, "n_heads": 4, "n_layers": L, "layers": "HKFH",
                         "mixer": {"mix": "static_scalar", "output_gate": True, "short_conv": True}})
    scale = math.sqrt(2 * L)
    for name, p in model.named_parameters():
        w = p.detach()
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            bound = 1 / math.sqrt(w.shape[1]) / scale
            assert w.abs().max() <= bound + 1e-7, name
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        elif name.endswith("norm.weight"):
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith(("s_fw", "s_kv")):
            assert w.item() == 1.0, name
        elif name.endswith(("A_log", "dt_bias")):
            continue  # Mamba-2-style special init (checked below)
        else:  # every other Linear / Conv1d / Embedding
            assert w.mean().abs().item() < 0.003, name
            assert w.std().item() == pytest.approx(0.02, rel=0.1 if w.numel() > 1000 else 0.25), name
    # Uniform, not normal: U(±b) has no mass beyond b, N(0, 0.02²) over 16k draws would exceed 0.031.
    assert model.blocks[0].mixer.o_proj.weight.abs().max().item() <= 1 / math.sqrt(Dm) / scale + 1e-7


def test_init_decay_rate_ranges():
    model = build_model(tiny("F", fw={"name": "gated_delta"}, d_model=64, n_heads=64, mlp_multiple_of=16))
    dec = model.blocks[0].mixer.decay
    A = dec.A_log.exp()
    dt = F.softplus(dec.dt_bias)
    assert ((A >= 1) & (A <= 16)).all()
    assert ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    g = dec(torch.randn(1, 5, 64))
    assert (g < 0).all()


def test_directly_constructed_config_builds():
    """HybridLM validates a directly constructed ModelConfig (its MixerConfig included) like a dict."""
    from hqlt.blocks.model_schema import MixerConfig
    model = HybridLM(ModelConfig(vocab_size=V, d_model=D, n_heads=HEADS, layers="HK",
                                 mixer=MixerConfig(kv={"name": "softmax", "window": 4}, mix="sum")))
    assert model.cfg.pattern == "HK" and model.cfg.short_id() == "HK_S4-dn2-sum_SWA4"
    assert model(torch.randint(0, V, (1, 5))).shape == (1, 5, V)


def test_vocab_zero_is_rejected_at_build():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model({"vocab_size": 0})


def test_layer_list_aliases():
    cfg = model_config(tiny(["hqlt", "kv", "fw", "attn"], n_layers=4))
    assert cfg.pattern == "HKFK"


def test_torch_save_whole_model_round_trip():
    import io

    model = build_model(tiny("HKF", n_layers=3, fw="gated_delta", mix="static_scalar")).eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.cfg.short_id() == model.cfg.short_id()


# ------------------------------------------------------------------------------ recipe options (issue #18)
@pytest.mark.parametrize("layers", ["H", "K", "F", "HKF"])
def test_no_mlp_and_learned_positions_forward_backward(layers):
    n_layers = len(layers) if len(layers) > 1 else 2
    window = None if layers == "K" else W
    for extra in ({"mlp": "none"}, {"pos_emb": "learned", "max_len": T}, {"mlp": "none", "pos_emb": "learned",
                                                                          "max_len": T + 5, "tie": True}):
        model = fwd_bwd(tiny(layers, window=window, pos="none", n_layers=n_layers, **extra))
        names = [n for n, _ in model.named_parameters()]
        assert any(n.startswith("pos_embed") for n in names) == ("pos_emb" in extra)
        assert any(".mlp" in n for n in names) == ("mlp" not in extra)


def test_learned_positions_init_give_position_information_and_check_the_length():
    torch.manual_seed(0)
    model = build_model(tiny("K", window=None, pos="none", pos_emb="learned", max_len=T))
    assert model.pos_embed.weight.shape == (T, D)
    assert abs(model.pos_embed.weight.std().item() - 0.02) < 0.01          # N(0, init_std²) like every embedding
    same = torch.full((1, T), 3)
    with torch.no_grad():
        logits = model(same)
        assert (logits[0, 1] - logits[0, 2]).abs().max() > 1e-6            # NoPos attention would give equal rows
        with pytest.raises(ValueError, match="exceeds model.max_len=12"):
            model(torch.zeros(1, T + 1, dtype=torch.long))


def test_delayed_chunk_read_interval_forward_backward_and_reads_less():
    """fw_chunk = R: every parameter trains; R = the window equals the default; a larger R changes the output
    (the FW memory is read every R tokens) and leaves the first R positions without FW content."""
    for fw in ("delta", "gated_delta", "linear"):
        fwd_bwd(tiny("H", blend={"name": "delayed_chunk", "fw_chunk": 8}, fw=fw))
    tokens = torch.randint(0, V, (2, T))
    outs = {}
    for key, blend in (("default", "delayed_chunk"), ("R=W", {"name": "delayed_chunk", "fw_chunk": W}),
                       ("R=8", {"name": "delayed_chunk", "fw_chunk": 8})):
        torch.manual_seed(0)
        with torch.no_grad():
            outs[key] = build_model(tiny("H", blend=blend)).eval()(tokens)
    assert torch.equal(outs["default"], outs["R=W"])
    assert torch.allclose(outs["default"][:, :W], outs["R=8"][:, :W])     # both read the empty state there
    assert not torch.allclose(outs["default"], outs["R=8"])
