"""CPU checks of the GPU backends' logic (no CUDA, no fla, no triton needed).

* The blend glue (delayed stream = shifted k, v; Delayed-Chunk = causal attention over the batch of
  chunks + the interleaved read/write FW stream) equals the step-by-step oracle, values and gradients,
  when the fused ops are stood in for by exact ops with fla's documented semantics.
* FlexAttention's analytic sliding-window BlockMask has exactly the tiles the window touches.
* The auto table: nearest entry, fastest available + verified backend, fallback.
* The benchmark's analytic FLOP counts.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hqlt.kernels import reference as R
from hqlt.kernels.backends import blend_compose as compose
from hqlt.kernels.testing import max_relative_error, random_inputs


def _exact_fla_fw(q, k, v, beta, g, *, fw, scale, chunk_size=64):
    """Stand-in for fla's chunk_* ops: the same function (query reads the state after its own write)."""
    return R.recurrent_fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g)


def _sliding(q, k, v, scale, window):
    """Stand-in for fla parallel_attn(window_size=W): keys i - W < j <= i."""
    T = q.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (i - j < window)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    return torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


def _causal(q, k, v, scale):
    return _sliding(q, k, v, scale, q.shape[1])


@pytest.fixture
def glue_ops(monkeypatch):
    monkeypatch.setattr(compose, "fla_available", lambda: True)
    monkeypatch.setattr(compose, "fla_fw_ok", lambda fw, dtype, device=None: True)
    monkeypatch.setattr(compose, "fla_fw", _exact_fla_fw)

    def kv(q, k, v, *, scale, window, chunk_local):
        return compose.kv_attention(q, k, v, scale=scale, window=window, chunk_local=chunk_local,
                                  sliding=_sliding, causal=_causal)
    return compose.make_ops(kv)


@pytest.mark.parametrize("fw", ["delta", "gated_delta", "linear"])
@pytest.mark.parametrize("blend", ["sync", "delayed_stream", "delayed_chunk"])
@pytest.mark.parametrize("T,W", [(37, 8), (20, 64), (24, 1)])
def test_blend_glue_matches_oracle(glue_ops, blend, fw, T, W):
    x = random_inputs(2, T, 2, 8, fw=fw, seed=T + W, requires_grad=True)
    args = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
    kw = dict(blend=blend, window=W, fw=fw, kv_scale=8 ** -0.5, fw_scale=8 ** -0.5, g=x["g"], chunk_size=64)
    got = glue_ops.hybrid_memory(*args, **kw)
    want = R.recurrent_hybrid_memory(*args, **kw)
    upstream = [torch.randn_like(got[0]), torch.randn_like(got[1])]
    leaves = [t for t in args + [x["g"]] if t is not None]
    g_got = torch.autograd.grad(got, leaves, upstream, allow_unused=True)
    g_want = torch.autograd.grad(want, leaves, upstream, allow_unused=True)
    for a, b in zip(got, want):
        assert max_relative_error(a, b) <= 1e-10
    for a, b in zip(g_got, g_want):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        a = torch.zeros_like(b) if a is None else a
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item())


def test_interleaved_stream_layout():
    q = torch.arange(5.0).view(1, 5, 1, 1)
    k = 10 + q
    qs, ks, *_ = compose.interleave_reads(q, k, k, None, None, 2)
    assert qs.flatten().tolist() == [0, 1, 0, 0, 2, 3, 0, 0, 4, 0, 0, 0]
    assert ks.flatten().tolist() == [0, 0, 10, 11, 0, 0, 12, 13, 0, 0, 14, 0]
    assert compose.take_reads(qs, 2, 5).flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("T,W", [(300, 100), (1000, 64), (129, 1), (700, 2000), (385, 257)])
def test_flex_window_block_mask_tiles(T, W):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from hqlt.kernels.backends import flex

    mask = flex.window_block_mask(T, W, "cpu")
    B, nb, We = flex.BLOCK, math.ceil(T / flex.BLOCK), min(W, T)
    i, j = torch.arange(nb * B)[:, None], torch.arange(nb * B)[None, :]
    pair = ((j <= i) & (i - j < We) & (i < T) & (j < T)).reshape(nb, B, nb, B)
    touched, all_visible = pair.any(3).any(1), pair.all(3).all(1)

    def dense(num, idx):
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for r in range(nb):
            out[r, idx[0, 0, r, :num[0, 0, r]].long()] = True
        return out
    partial = dense(mask.kv_num_blocks, mask.kv_indices)
    full = dense(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(partial | full, touched)
    assert not (full & ~all_visible).any()
    assert flex.window_block_mask(T, W, "cpu") is mask          # cached


def test_flex_window_mask_attention_on_cpu():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    from hqlt.kernels.backends import flex

    q, k, v = (torch.randn(1, 300, 2, 16) for _ in range(3))
    mask = flex.window_block_mask(300, 100, "cpu")
    o = fa.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                          scale=0.25).transpose(1, 2)
    assert max_relative_error(o, compose.reference_kv(q, k, v, scale=0.25, window=100)) <= 1e-5


def test_kernel_dtype_rules():
    x = torch.zeros(1)
    assert compose.kernel_dtype(x, x.bfloat16()) == torch.bfloat16
    assert compose.kernel_dtype(x, x) == torch.float32
    assert compose.kernel_dtype(x.double()) == torch.float64


def test_auto_table_lookup(tmp_path, monkeypatch):
    from hqlt.kernels import auto_table as auto

    entries = [{"blend": "sync", "window": 64, "seq_len": 2048, "head_dim": 128, "ms": {"fla": 2.0, "flex": 1.5}},
               {"blend": "sync", "window": 1024, "seq_len": 32768, "head_dim": 128, "ms": {"fla": 2.0, "flex": None}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "entries": entries}))
    monkeypatch.setenv("HQLT_AUTO_TABLE", str(path))
    auto.load_table.cache_clear()
    try:
        assert auto.lookup("sync", 64, 4096, 128, {"fla", "flex"})[0] == "flex"
        assert auto.lookup("sync", 64, 4096, 128, {"fla"})[0] == "fla"
        assert auto.lookup("sync", 1000, 30000, 128, {"fla", "flex"})[0] == "fla"   # flex not timed there
        assert auto.lookup("delayed_chunk", 64, 2048, 128, {"fla"}) is None
        path.write_text(json.dumps({"device": "test", "verified": ["fla"], "entries": entries}))
        auto.load_table.cache_clear()
        assert auto.lookup("sync", 64, 4096, 128, {"fla", "flex"})[0] == "fla"       # flex not verified
        assert auto.majority_winner({"fla", "flex"}) == "fla"
    finally:
        auto.load_table.cache_clear()


def test_shipped_auto_table_is_valid():
    from hqlt.kernels import auto_table as auto

    table = json.loads(auto.TABLE_PATH.read_text())
    assert table["entries"] and all({"blend", "window", "seq_len", "head_dim", "ms"} <= set(e) for e in table["entries"])


def test_bench_flop_formulas():
    from hqlt.benchmarks import kernels as bk

    assert bk.pairs(2048, 64) == 64 * 2048 - 64 * 63 // 2
    assert bk.pairs(100, 200) == bk.pairs(100, None) == 100 * 101 // 2
    assert bk.pairs(130, 64, "delayed_chunk") == 2 * 64 * 65 // 2 + 2 * 3 // 2
    assert bk.fw_flops_per_token(128, "delta", "sync") == 10 * 64 * 128 + 6 * 128 * 128 + (2 / 3) * 64 * 64
    assert bk.sdpa_flops(1, 4, 1, 2) == 3 * 4 * 2 * 10


@pytest.mark.parametrize("chunk_local", [False, True])
def test_attention_runs_in_batch_slices_that_fit_a_cuda_grid_axis(monkeypatch, chunk_local):
    """batch x heads above CUDA's 65535 grid rows (Delayed-Chunk's batch of chunks) is split, same values."""
    B, T, H, d, W = 5, 24, 2, 8, 4
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = compose.kv_attention(q, k, v, scale=0.3, window=W, chunk_local=chunk_local, sliding=_sliding,
                              causal=_causal)
    seen = []

    def tracked(fn):
        def run(q, k, v, *args):
            seen.append(q.shape[0] * q.shape[2])
            return fn(q, k, v, *args)
        return run
    monkeypatch.setattr(compose, "MAX_GRID_ROWS", 6)  # 3 sequences of 2 heads per call
    sliced = compose.kv_attention(q, k, v, scale=0.3, window=W, chunk_local=chunk_local, sliding=tracked(_sliding),
                                causal=tracked(_causal))
    assert max(seen) <= 6 and len(seen) == math.ceil((B * (T // W if chunk_local else 1)) / 3)
    torch.testing.assert_close(sliced, full)
    gq, = torch.autograd.grad(sliced.square().sum(), q)
    gq_full, = torch.autograd.grad(full.square().sum(), q)
    torch.testing.assert_close(gq, gq_full)


def test_auto_pick_asks_once_per_shape_and_falls_back(tmp_path, monkeypatch):
    from hqlt.kernels import auto_table as auto

    entries = [{"blend": "sync", "window": 64, "seq_len": 2048, "head_dim": 64, "ms": {"fla": 2.0, "flex": 1.5}}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "entries": entries}))
    monkeypatch.setenv("HQLT_AUTO_TABLE", str(path))
    monkeypatch.setattr(auto, "_CHOICES", {})
    auto.load_table.cache_clear()
    asked = []

    def available():
        asked.append(1)
        return {"fla", "flex"}
    try:
        kw = dict(available=available, fallback=lambda: "reference")
        assert auto.pick("hybrid_memory", "sync", 64, 2048, 64, **kw) == "flex"
        assert auto.pick("hybrid_memory", "sync", 64, 2048, 64, **kw) == "flex" and len(asked) == 1
        assert auto.pick("hybrid_memory", "delayed_chunk", 64, 2048, 64, **kw) == "reference"   # not measured
        auto.note_choice(("fw_memory", "sync", 0, 2048, 64, "delta", "bfloat16"), "fla")
        # keys: (op, blend, W, T, d, fw, kernel dtype)
        assert auto.choices() == {("hybrid_memory", "sync", 64, 2048, 64, "delta", "bfloat16"): "flex",
                                  ("hybrid_memory", "delayed_chunk", 64, 2048, 64, "delta", "bfloat16"): "reference",
                                  ("fw_memory", "sync", 0, 2048, 64, "delta", "bfloat16"): "fla"}
    finally:
        auto.load_table.cache_clear()


def test_auto_ops_run_the_picked_backend(monkeypatch):
    """The per-call "auto" ops of dispatch (CUDA only in use) on CPU tensors: no CPU backend is in the
    table, so every call falls back to the reference and says so."""
    from hqlt.kernels import auto_table, dispatch

    monkeypatch.setattr(auto_table, "_CHOICES", {})
    x = random_inputs(1, 20, 2, 8, seed=1)
    args = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
    kw = dict(blend="sync", window=4, fw="delta", kv_scale=0.3, fw_scale=0.3)
    got = dispatch._auto_ops().hybrid_memory(*args, **kw)
    want = R.chunked_hybrid_memory(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert set(auto_table.choices().values()) == {"reference"}


def test_fla_linear_normaliser_in_float32(monkeypatch):
    # fla's chunk_linear_attn(normalize=True) forms scale * q . cumsum(k) in the inputs' dtype; the backend asks fla for
    # the numerator only and normalises in float32. fla stood in for by an exact numerator (and, for the contrast,
    # fla's bf16 normaliser): at T 200 in bf16 the float32 one keeps every gradient within bf16's 1e-2, the bf16 one
    # does not (dq 0.012 here; H100: the fla linear cases over whole streams, kernels/FUSED_NOTES.md "Round 8").
    import sys
    import types
    calls = []

    def chunk_linear_attn(q, k, v, scale=None, normalize=True):
        calls.append(normalize)
        T = q.shape[1]
        s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * scale
        o = torch.einsum("bhts,bshd->bthd", s * torch.ones(T, T, dtype=s.dtype).tril(), v.double()).to(q.dtype)
        if normalize:
            o = o / (((q * scale) * k.cumsum(1)).sum(-1, keepdim=True) + 1e-10)
        return o, None

    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    lin = types.ModuleType("fla.ops.linear_attn")
    lin.chunk_linear_attn = chunk_linear_attn
    for name, m in (("fla", fla), ("fla.ops", ops), ("fla.ops.linear_attn", lin)):
        monkeypatch.setitem(sys.modules, name, m)
    x = random_inputs(2, 200, 2, 64, fw="linear", dtype=torch.float64, seed=3)

    def run(fn, dtype):
        # the same bf16-rounded inputs for both sides: only the arithmetic differs
        ins = [x[n].to(torch.bfloat16).to(dtype).detach().requires_grad_() for n in ("q_fw", "k_fw", "v")]
        o = fn(*ins, None, None, fw="linear", scale=64 ** -0.5)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return [o, *torch.autograd.grad(o, ins, go.to(o.dtype))]

    def errors(got, want):
        return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]

    ref = run(compose.reference_fw, torch.float64)
    ours = errors(run(compose.fla_fw, torch.bfloat16), ref)
    assert calls == [False]
    assert max(ours) <= 1e-2, ours
    bf16_normaliser = errors(run(lambda q, k, v, b, g, *, fw, scale: chunk_linear_attn(q, k, v, scale)[0],
                                 torch.bfloat16), ref)
    assert max(bf16_normaliser) > 1e-2 > max(ours), (bf16_normaliser, ours)
