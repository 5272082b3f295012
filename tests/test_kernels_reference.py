"""The chunked reference form against the step-by-step oracle: values (float64, every blend x fw kind,
edge cases), gradients (gradcheck), the pure KV / FW ops, precision handling, backends, bad arguments."""
import subprocess
import sys

import pytest
import torch

from hqlt.kernels import (BLENDS, FW_KINDS, available_backends, fw_memory, hybrid_memory, kv_memory,
                          l2_normalize, resolve_backend)
from hqlt.kernels.testing import max_relative_error, random_inputs

# (B, T, H, Dk, Dv, window, chunk_size)
CASES = {
    "ragged": (2, 37, 3, 8, 5, 5, 8),          # T a multiple of neither W nor the chunk; Dk != Dv
    "window1": (1, 13, 2, 4, 6, 1, 4),         # W = 1: KV sees only the current token
    "window_ge_T": (2, 29, 2, 6, 4, 40, 16),   # W >= T: full causal KV, delayed FW stays empty
    "exact": (1, 64, 2, 8, 8, 16, 16),         # everything divides
    "default_chunk": (2, 100, 2, 8, 8, 24, 64),  # delayed_chunk internal chunk 48 = 2 * C
    "chunk_lt_window": (1, 45, 1, 4, 4, 10, 4),  # internal chunk smaller than W / C
}


def run(inputs, backend, **kwargs):
    names = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")
    return hybrid_memory(*(inputs[n] for n in names), g=inputs["g"], backend=backend, **kwargs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("blend", BLENDS)
def test_chunked_matches_recurrent(blend, fw, case):
    B, T, H, dk, dv, window, chunk = CASES[case]
    inputs = random_inputs(B, T, H, dk, dv, fw=fw, seed=hash((blend, fw, case)) % 1000)
    fast = run(inputs, "reference", blend=blend, window=window, fw=fw, chunk_size=chunk)
    slow = run(inputs, "recurrent", blend=blend, window=window, fw=fw)
    for name, a, b in zip(("o_kv", "o_fw"), fast, slow):
        assert a.shape == (B, T, H, dv) and a.dtype == torch.float64
        assert max_relative_error(a, b) <= 1e-9, name


@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("blend", BLENDS)
def test_gradcheck_chunked(blend, fw):
    # T=7 with chunk 2 and W=3: several chunks, padding, a window that divides nothing.
    inputs = random_inputs(1, 7, 1, 3, 2, fw=fw, seed=1, requires_grad=True)
    names = [n for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta", "g") if inputs[n] is not None]

    def f(*tensors):
        args = dict(zip(names, tensors))
        return hybrid_memory(args["q_kv"], args["k_kv"], args["q_fw"], args["k_fw"], args["v"],
                             args["beta"], g=args.get("g"), blend=blend, window=3, fw=fw,
                             backend="reference", chunk_size=2)

    assert torch.autograd.gradcheck(f, [inputs[n] for n in names])


@pytest.mark.parametrize("case", ["ragged", "default_chunk"])
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("blend", BLENDS)
def test_gradients_match_recurrent(blend, fw, case):
    # Longer sequences than gradcheck affords: attention blocks that look back, several FW chunks.
    B, T, H, dk, dv, window, chunk = CASES[case]
    inputs = random_inputs(B, T, H, dk, dv, fw=fw, seed=3, requires_grad=True)
    # linear attention ignores beta, so it gets no gradient
    leaves = [x for n, x in inputs.items() if x is not None and not (n == "beta" and fw == "linear")]
    upstream = [torch.randn(B, T, H, dv, dtype=torch.float64) for _ in range(2)]
    grads = {}
    for backend in ("reference", "recurrent"):
        outs = run(inputs, backend, blend=blend, window=window, fw=fw, chunk_size=chunk)
        grads[backend] = torch.autograd.grad(outs, leaves, upstream)
    for a, b in zip(grads["reference"], grads["recurrent"]):
        assert max_relative_error(a, b) <= 1e-9


def test_gradcheck_full_causal_kv():
    x = random_inputs(1, 6, 2, 3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: kv_memory(q, k, v, backend="reference"),
                                    [x["q_kv"], x["k_kv"], x["v"]])


def naive_attention(q, k, v, scale, window=None):
    T = q.shape[1]
    i = torch.arange(T)
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[None, :] > i[:, None] - window
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("backend", ["reference", "recurrent"])
@pytest.mark.parametrize("window", [None, 1, 5, 300])
def test_kv_memory_matches_naive_softmax(backend, window):
    x = random_inputs(2, 150, 2, 8, 6)
    out = kv_memory(x["q_kv"], x["k_kv"], x["v"], window=window, backend=backend)
    expected = naive_attention(x["q_kv"], x["k_kv"], x["v"], 8 ** -0.5, window)
    assert max_relative_error(out, expected) <= 1e-12


def test_kv_memory_scale_and_hybrid_kv_branch():
    x = random_inputs(1, 40, 2, 4)
    out = kv_memory(x["q_kv"], x["k_kv"], x["v"], window=6, scale=0.3)
    assert max_relative_error(out, naive_attention(x["q_kv"], x["k_kv"], x["v"], 0.3, 6)) <= 1e-12
    o_kv, _ = run(x, "reference", blend="sync", window=6, kv_scale=0.3)
    assert torch.equal(o_kv, out)


@pytest.mark.parametrize("backend", ["reference", "recurrent"])
@pytest.mark.parametrize("fw", FW_KINDS)
def test_fw_memory_equals_sync_fw_branch(fw, backend):
    x = random_inputs(2, 50, 2, 6, 4, fw=fw)
    out = fw_memory(x["q_fw"], x["k_fw"], x["v"], x["beta"], g=x["g"], fw=fw, backend=backend,
                    chunk_size=16)
    _, o_fw = run(x, backend, blend="sync", window=7, fw=fw, chunk_size=16)
    assert max_relative_error(out, o_fw) <= 1e-12


def test_delta_rule_first_steps_by_hand():
    # Two tokens, one head: S1 = b1 v1 k1^T, S2 = S1 + b2 (v2 - S1 k2) k2^T, o_t = scale * S_t q_t.
    k = l2_normalize(torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64))
    q = l2_normalize(torch.tensor([[0.5, 1.0], [1.0, 1.0]], dtype=torch.float64))
    v = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([0.7, 1.6], dtype=torch.float64)
    S1 = b[0] * torch.outer(v[0], k[0])
    S2 = S1 + b[1] * torch.outer(v[1] - S1 @ k[1], k[1])
    expected = torch.stack([S1 @ q[0], S2 @ q[1]]) * 0.25
    for backend in ("reference", "recurrent"):
        out = fw_memory(q[None, :, None], k[None, :, None], v[None, :, None], b[None, :, None],
                        scale=0.25, backend=backend)
        assert torch.allclose(out[0, :, 0], expected, rtol=1e-14, atol=1e-14)


def test_linear_is_sum_normalised():
    x = random_inputs(1, 9, 1, 3, 2, fw="linear")
    q, k, v = x["q_fw"][0, :, 0], x["k_fw"][0, :, 0], x["v"][0, :, 0]
    weights = 3 ** -0.5 * (q @ k.T).tril()       # the scale cancels except against the eps
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-10)
    out = fw_memory(x["q_fw"], x["k_fw"], x["v"], None, fw="linear")
    assert max_relative_error(out[0, :, 0], expected) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype):
    x = random_inputs(2, 70, 2, 8, fw="gated_delta", dtype=torch.float32)
    low = {n: None if t is None else t.to(dtype) for n, t in x.items()}
    outs = run(low, "reference", blend="sync", window=16, fw="gated_delta")
    # Same low-precision inputs, computed in float32 by hand: only the final cast may differ.
    upcast = {n: None if t is None else t.float() for n, t in low.items()}
    expected = run(upcast, "reference", blend="sync", window=16, fw="gated_delta")
    for o, e in zip(outs, expected):
        assert o.dtype == dtype
        assert torch.equal(o, e.to(dtype))


def test_float32_close_to_float64_and_float64_preserved():
    x = random_inputs(2, 130, 2, 16, fw="delta")
    o64 = run(x, "reference", blend="delayed_chunk", window=32)
    x32 = {n: None if t is None else t.float() for n, t in x.items()}
    o32 = run(x32, "reference", blend="delayed_chunk", window=32)
    for a, b in zip(o32, o64):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        assert max_relative_error(a, b) <= 1e-5


def test_backend_registry():
    avail = available_backends()
    assert avail["reference"] and avail["recurrent"]
    assert {"fla", "flex", "flash_attn"} <= set(avail)       # GPU backends: registered, probed lazily
    if not torch.cuda.is_available():
        assert not any(avail[n] for n in ("fla", "flex", "flash_attn"))
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("recurrent", torch.device("cpu")) == "recurrent"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fla_typo", "cpu")


def test_import_does_not_pull_gpu_packages():
    code = "import sys, hqlt.kernels; print(sorted({'triton', 'fla', 'flash_attn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _bad(change):
    x = random_inputs(1, 8, 2, 4, fw="delta")
    kwargs = dict(blend="sync", window=3, fw="delta", g=None, backend="auto", chunk_size=64)
    args = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
    change(args, kwargs)
    return args, kwargs


BAD_ARGUMENTS = {
    "blend": lambda a, k: k.update(blend="delayed"),
    "fw": lambda a, k: k.update(fw="deltanet"),
    "backend": lambda a, k: k.update(backend="triton"),
    "window": lambda a, k: k.update(window=0),
    "chunk_size": lambda a, k: k.update(chunk_size=-4),
    "kv_scale": lambda a, k: k.update(kv_scale="0.5"),
    "k_kv": lambda a, k: a.__setitem__(1, a[1][..., :3]),
    "q_fw": lambda a, k: a.__setitem__(2, a[2][:, :5]),
    "beta": lambda a, k: a.__setitem__(5, a[5][..., :1]),
    "g": lambda a, k: k.update(g=torch.zeros(1, 8, 2, dtype=torch.float64)),
    "v": lambda a, k: a.__setitem__(4, a[4][None]),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(name):
    args, kwargs = _bad(BAD_ARGUMENTS[name])
    with pytest.raises(ValueError, match=name):
        hybrid_memory(*args, **kwargs)


def test_more_bad_arguments():
    x = random_inputs(1, 8, 2, 4, fw="gated_delta")
    q, k, v = x["q_fw"], x["k_fw"], x["v"]
    with pytest.raises(ValueError, match="g"):
        fw_memory(q, k, v, x["beta"], fw="gated_delta")                      # g missing
    with pytest.raises(ValueError, match="beta"):
        fw_memory(q, k, v, None, fw="delta")                                 # beta missing
    with pytest.raises(ValueError, match="window"):
        kv_memory(q, k, v, window=True)
    with pytest.raises(ValueError, match="window"):
        hybrid_memory(q, k, q, k, v, x["beta"], blend="sync", window=2.0)
    with pytest.raises(ValueError, match="q"):
        kv_memory(q.long(), k, v)
    with pytest.raises(ValueError, match="fw"):
        fw_memory(q, k, v, x["beta"], fw=None)
