"""The kernel ops as torch.library custom ops (``hqlt.kernels.ops``), on CPU: ``torch.library.opcheck`` of every
op (schema, fake implementation, autograd registration, AOT dispatch with dynamic shapes), a compiled
HybridMixer / HybridLM with ``fullgraph=True`` (no graph break) equal to eager in values and gradients, and the
eager path left as it was (no custom op, no recomputation). The fused kernel's ops run only under the Triton
interpreter: tests/test_gpu_fused.py.
"""
from __future__ import annotations

import pytest
import torch

from hqlt.kernels import dispatch, fw_memory, hybrid_memory, kv_memory
from hqlt.kernels import ops as kops
from hqlt.kernels.testing import assert_opcheck, random_inputs

NAMES = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_plan_is_marked_constant_like_assume_constant_result():
    # dispatch marks plan by hand (torch.compiler.assume_constant_result would import torch._dynamo at import)
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", False)
    assert dispatch.plan._dynamo_marked_constant and dispatch.shape_matters._dynamo_marked_constant


# ------------------------------------------------------------------------------------------- opcheck
HYBRID_CASES = [  # dtype, fw, blend, backend
    (torch.float32, "delta", "sync", "reference"),
    (torch.float64, "gated_delta", "delayed_stream", "reference"),
    (torch.float32, "linear", "delayed_chunk", "reference"),
    (torch.float64, "delta", "sync", "recurrent"),
]


@pytest.mark.parametrize("dtype,fw,blend,backend", HYBRID_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{c[2]}-{c[3]}" for c in HYBRID_CASES])
def test_opcheck_hybrid_memory(dtype, fw, blend, backend):
    x = random_inputs(1, 9, 2, 4, 3, fw=fw, dtype=dtype, seed=1, requires_grad=True)
    beta = None if fw == "linear" else x["beta"]
    args = (*[x[n] for n in NAMES[:5]], beta, x["g"], backend, blend, 3, fw, 0.5, 0.4, 4, None, "")
    assert_opcheck(kops.hybrid_memory_op, args)


def test_opcheck_kv_fw_memory_and_the_backward_ops():
    x = random_inputs(1, 9, 2, 4, 3, seed=2, requires_grad=True)
    assert_opcheck(kops.kv_memory_op, (x["q_kv"], x["k_kv"], x["v"], "reference", None, 0.5, ""))
    assert_opcheck(kops.kv_memory_op, (x["q_kv"], x["k_kv"], x["v"], "reference", 3, 0.5, ""))
    assert_opcheck(kops.fw_memory_op, (x["q_fw"], x["k_fw"], x["v"], x["beta"], None, "reference", "delta",
                                              0.5, 4, ""))
    d = {k: None if t is None else t.detach() for k, t in x.items()}
    do = torch.randn_like(d["v"])
    needs = [True, False, True, True, True, True, False]
    assert_opcheck(kops.hybrid_memory_backward_op, (do, do, *[d[n] for n in NAMES], None, "reference", "sync",
                                                           3, "delta", 0.5, 0.5, 4, None, "", needs))
    assert_opcheck(kops.kv_memory_backward_op, (do, d["q_kv"], d["k_kv"], d["v"], "reference", 3, 0.5, "",
                                                       [True, True, True]))
    assert_opcheck(kops.fw_memory_backward_op, (do, d["q_fw"], d["k_fw"], d["v"], d["beta"], None, "reference",
                                                       "delta", 0.5, 4, "", [True, True, True, True, False]))


def test_backward_op_gives_what_autograd_gives():
    x = random_inputs(2, 11, 2, 4, 5, fw="gated_delta", seed=3, requires_grad=True)
    kw = dict(blend="delayed_chunk", window=4, fw="gated_delta", kv_scale=0.5, fw_scale=0.4, chunk_size=4)
    leaves = [x[n] for n in NAMES] + [x["g"]]
    want = torch.autograd.grad(hybrid_memory(*leaves[:6], g=x["g"], backend="reference", **kw), leaves,
                               [torch.ones_like(x["v"]), 2 * torch.ones_like(x["v"])])
    out = kops.hybrid_memory_op(*leaves[:6], x["g"], "reference", kw["blend"], 4, kw["fw"], 0.5, 0.4, 4, None, "")
    got = torch.autograd.grad(out, leaves, [torch.ones_like(x["v"]), 2 * torch.ones_like(x["v"])])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_eager_calls_do_not_go_through_the_ops():
    """CPU training runs eager: the reference's own autograd, no custom op and no recomputed forward."""
    x = random_inputs(1, 8, 2, 4, seed=4, requires_grad=True)
    o_kv, o_fw = hybrid_memory(*[x[n] for n in NAMES], blend="sync", window=3)
    assert "hqlt" not in o_kv.grad_fn.name() and "hqlt" not in o_fw.grad_fn.name()
    assert "hqlt" not in kv_memory(x["q_kv"], x["k_kv"], x["v"]).grad_fn.name()


# ------------------------------------------------------------------------------------ torch.compile
def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def _op_targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "hqlt" in str(n.target)}


def test_compiled_kernel_calls_are_one_op_node_each():
    x = random_inputs(1, 10, 2, 4, 6, seed=5, requires_grad=True)

    def f(q_kv, k_kv, q_fw, k_fw, v, beta):
        a, b = hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend="delayed_stream", window=3, chunk_size=4)
        c = kv_memory(q_kv, k_kv, v, window=None)
        d = fw_memory(q_fw, k_fw, v, beta, chunk_size=4)
        e, _ = hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend="delayed_chunk", window=4, fw_chunk=2)
        return (a * b + c - d + e).sum()

    graphs = []
    args = [x[n] for n in NAMES]
    got = torch.compile(f, fullgraph=True, backend=_recording_backend(graphs))(*args)
    assert len(graphs) == 1
    assert _op_targets(graphs[0]) == {"hqlt.hybrid_memory.default", "hqlt.kv_memory.default",
                                      "hqlt.fw_memory.default"}
    want = f(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, args), torch.autograd.grad(want, args), rtol=1e-10,
                               atol=1e-12)


def _mixer(kind, **kw):
    from test_blocks_mixer import make_mixer
    return make_mixer(kind, **kw)


MIXERS = [  # kind, blend, fw, extras
    ("H", "sync", "delta", dict(short_conv=True, output_gate=True)),
    ("H", "delayed_chunk", "linear", {}),
    ("H", "delayed_stream", "gated_delta", dict(mix="dynamic_scalar")),
    ("K", "sync", "delta", {}),
    ("F", "sync", "delta", {}),
]


@pytest.mark.parametrize("kind,blend,fw,extra", MIXERS, ids=[f"{m[0]}-{m[1]}-{m[2]}" for m in MIXERS])
def test_compiled_mixer_fullgraph_matches_eager(kind, blend, fw, extra):
    from test_blocks_mixer import inputs
    mixer = _mixer(kind, blend=blend, fw=fw, **extra)
    x = inputs().requires_grad_()
    y = mixer(x)
    gy = torch.randn_like(y)
    params = [x, *mixer.parameters()]
    want = torch.autograd.grad(y, params, gy)
    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    got = torch.autograd.grad(yc, params, gy)
    torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    explained = torch._dynamo.explain(mixer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_mixer_with_dynamic_shapes():
    """dynamic=True: the sizes stay symbolic (the reference's choice does not depend on them) and one graph
    serves two shapes."""
    from test_blocks_mixer import inputs
    mixer = _mixer("H", blend="sync", fw="delta")
    graphs = []
    compiled = torch.compile(mixer, fullgraph=True, dynamic=True, backend=_recording_backend(graphs))
    for B, T in ((2, 11), (3, 14)):
        x = inputs(B=B, T=T)
        torch.testing.assert_close(compiled(x), mixer(x), rtol=1e-12, atol=1e-12)
    assert len(graphs) == 1


def test_compiled_language_model_fullgraph_matches_eager():
    from hqlt.blocks.model import HybridLM
    from hqlt.blocks.model_schema import model_config
    cfg = model_config({"vocab_size": 11, "d_model": 16, "n_heads": 2, "n_layers": 3, "layers": "HKF",
                        "chunk_size": 4, "mixer": {"kv": {"name": "softmax", "window": 3, "pos": "rope"},
                                                   "fw": {"name": "delta"}, "blend": "sync", "mix": "vector"}})
    torch.manual_seed(0)
    model = HybridLM(cfg).double()
    tokens = torch.randint(0, 11, (2, 9))

    def loss_of(m):
        out = m(tokens)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        return logits.double().square().mean()

    want = loss_of(model)
    g_want = torch.autograd.grad(want, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = loss_of(compiled)
    g_got = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- op registry watch
def test_op_registry_intact_and_the_watch_sees_a_redefinition(tmp_path):
    from hqlt.kernels.testing import hqlt_op_libraries
    assert hqlt_op_libraries() and all(hqlt_op_libraries().values())
    # defining an op again destroys the registration its callers hold: the watch logs it and says which op
    # (in a child process: this one keeps its ops)
    import subprocess
    import sys
    log = tmp_path / "ops.log"
    code = ("import importlib, sys; from hqlt.kernels.testing import watch_op_registry, hqlt_op_libraries; "
            f"watch_op_registry({str(log)!r}); import hqlt.kernels.ops, hqlt.kernels.fused.ops as m; "
            "before = all(hqlt_op_libraries().values()); held = [m.fused_sync_hybrid, m.fused_sync_hybrid_backward]; "
            "importlib.reload(m); "
            "print(before, sorted(n for n, ok in hqlt_op_libraries(held).items() if not ok))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "True ['hqlt::fused_sync_hybrid', 'hqlt::fused_sync_hybrid_backward']"
    text = log.read_text()
    assert "== redefined hqlt::fused_sync_hybrid\n" in text and "== destroyed hqlt::fused_sync_hybrid\n" in text
    assert "kernels/fused/ops.py" in text      # the stack names the module that defined it again


def test_the_kernels_folder_imported_by_its_bare_name_is_hqlt_kernels(tmp_path):
    """From the repository root `kernels` is importable by its folder name, and transformers (imported by fla) probes
    for Hugging Face's `kernels` package with import_module. That import must not run the package a second time:
    it defined the hqlt:: ops again and destroyed the registrations the callers held (FUSED_NOTES.md, round 6)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "ops.log"
    code = ("import importlib, importlib.util; from hqlt.kernels.testing import watch_op_registry, hqlt_op_libraries; "
            f"watch_op_registry({str(log)!r}); import hqlt.kernels, hqlt.kernels.ops, hqlt.kernels.fused.ops; "
            "assert importlib.util.find_spec('kernels') is not None; m = importlib.import_module('kernels'); "
            "print(m is hqlt.kernels, all(hqlt_op_libraries().values()), getattr(m, '__version__', 'N/A'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "True True N/A"
    assert not log.exists() or "== " not in log.read_text()
