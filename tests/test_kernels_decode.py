"""Decode steps equal the parallel forms token by token (float64), for every blend x fw kind."""
import pytest
import torch

from hqlt.kernels import (BLENDS, FW_KINDS, FWState, HybridDecodeState, KVCache, fw_memory,
                          fw_memory_step, hybrid_memory, hybrid_memory_step, kv_memory, kv_memory_step)
from hqlt.kernels.testing import max_relative_error, random_inputs

NAMES = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")


def decode_all(x, **kwargs):
    state, o_kv, o_fw = None, [], []
    for t in range(x["v"].shape[1]):
        step = [x[n][:, t] for n in NAMES]
        g_t = None if x["g"] is None else x["g"][:, t]
        a, b, state = hybrid_memory_step(*step, state, g_t=g_t, **kwargs)
        o_kv.append(a)
        o_fw.append(b)
    return torch.stack(o_kv, 1), torch.stack(o_fw, 1), state


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("blend", BLENDS)
def test_hybrid_step_equals_parallel(blend, fw, window):
    x = random_inputs(2, 11, 2, 4, 3, fw=fw, seed=window)
    o_kv, o_fw, state = decode_all(x, blend=blend, window=window, fw=fw)
    p_kv, p_fw = hybrid_memory(*(x[n] for n in NAMES), g=x["g"], blend=blend, window=window, fw=fw,
                               chunk_size=4)
    assert max_relative_error(o_kv, p_kv) <= 1e-9
    assert max_relative_error(o_fw, p_fw) <= 1e-9
    assert state.position == 11
    # the KV cache holds the current chunk (delayed_chunk) or the last W tokens
    expected_cached = (11 - 1) % window + 1 if blend == "delayed_chunk" else min(window, 11)
    assert state.kv.k.shape[2] == expected_cached


def test_states_are_immutable_and_branchable():
    x = random_inputs(1, 6, 2, 4, fw="gated_delta")
    kwargs = dict(blend="delayed_stream", window=2, fw="gated_delta")
    *_, state = decode_all({n: None if t is None else t[:, :5] for n, t in x.items()}, **kwargs)
    snapshot = (state.fw_state.S.clone(), state.kv.k.clone())
    step = [x[n][:, 5] for n in NAMES]
    first = hybrid_memory_step(*step, state, g_t=x["g"][:, 5], **kwargs)
    second = hybrid_memory_step(*step, state, g_t=x["g"][:, 5], **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(state.fw_state.S, snapshot[0]) and torch.equal(state.kv.k, snapshot[1])
    assert isinstance(first[2], HybridDecodeState) and first[2].position == 6


@pytest.mark.parametrize("window", [None, 1, 4])
def test_kv_step_equals_kv_memory(window):
    x = random_inputs(2, 9, 3, 5, 2)
    cache, outs = None, []
    for t in range(9):
        o, cache = kv_memory_step(x["q_kv"][:, t], x["k_kv"][:, t], x["v"][:, t], cache, window=window)
        outs.append(o)
    assert isinstance(cache, KVCache) and cache.k.shape[2] == (9 if window is None else window)
    expected = kv_memory(x["q_kv"], x["k_kv"], x["v"], window=window)
    assert max_relative_error(torch.stack(outs, 1), expected) <= 1e-9


@pytest.mark.parametrize("fw", FW_KINDS)
def test_fw_step_equals_fw_memory(fw):
    x = random_inputs(2, 9, 2, 5, 3, fw=fw)
    state, outs = None, []
    for t in range(9):
        g_t = None if x["g"] is None else x["g"][:, t]
        o, state = fw_memory_step(x["q_fw"][:, t], x["k_fw"][:, t], x["v"][:, t], x["beta"][:, t], state,
                                  fw=fw, g_t=g_t)
        outs.append(o)
    assert isinstance(state, FWState) and state.S.shape == (2, 2, 3, 5)
    assert (state.z is not None) == (fw == "linear")
    expected = fw_memory(x["q_fw"], x["k_fw"], x["v"], x["beta"], fw=fw, g=x["g"], chunk_size=4)
    assert max_relative_error(torch.stack(outs, 1), expected) <= 1e-9


def test_low_precision_step_keeps_float32_state():
    x = random_inputs(1, 3, 2, 4, dtype=torch.float32)
    step = [x[n][:, 0].to(torch.bfloat16) for n in NAMES]
    o_kv, o_fw, state = hybrid_memory_step(*step, blend="sync", window=2)
    assert o_kv.dtype == o_fw.dtype == torch.bfloat16
    assert state.fw_state.S.dtype == state.kv.k.dtype == torch.float32


def test_step_argument_errors():
    x = random_inputs(1, 2, 2, 4, fw="delta")
    step = [x[n][:, 0] for n in NAMES]
    _, _, state = hybrid_memory_step(*step, blend="sync", window=2)
    with pytest.raises(ValueError, match="blend"):
        hybrid_memory_step(*step, state, blend="delayed_chunk", window=2)
    with pytest.raises(ValueError, match="window"):
        hybrid_memory_step(*step, blend="sync", window=0)
    with pytest.raises(ValueError, match="g_t"):
        hybrid_memory_step(*step, blend="sync", window=2, fw="gated_delta")
    with pytest.raises(ValueError, match="q_kv_t"):
        hybrid_memory_step(x["q_kv"], *step[1:], blend="sync", window=2)
    with pytest.raises(ValueError, match="beta_t"):
        fw_memory_step(step[2], step[3], step[4], None)


@pytest.mark.parametrize("window,fw_chunk", [(2, 4), (3, 5), (4, 2)])
@pytest.mark.parametrize("fw", FW_KINDS)
def test_delayed_chunk_read_interval_step_equals_parallel(fw, window, fw_chunk):
    x = random_inputs(2, 11, 2, 4, 3, fw=fw, seed=window)
    kw = dict(blend="delayed_chunk", window=window, fw=fw, fw_chunk=fw_chunk)
    o_kv, o_fw, state = decode_all(x, **kw)
    p_kv, p_fw = hybrid_memory(*(x[n] for n in NAMES), g=x["g"], chunk_size=4, **kw)
    assert max_relative_error(o_kv, p_kv) <= 1e-9
    assert max_relative_error(o_fw, p_fw) <= 1e-9
    assert state.fw_chunk == fw_chunk
    with pytest.raises(ValueError, match="fw_chunk"):
        hybrid_memory_step(*(x[n][:, 0] for n in NAMES), state, g_t=None if x["g"] is None else x["g"][:, 0],
                           blend="delayed_chunk", window=window, fw=fw)
