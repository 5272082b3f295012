"""The visibility table of hqlt-reference.md §4.5, checked by perturbation on both pure-torch backends.

Changing token j's inputs must change o_kv[t] / o_fw[t] exactly when j is visible to query t, and
leave it untouched (< 1e-12) otherwise. The expected sets below are written from the table, not from
the implementation. Perturbations are batched: batch row 0 is the base sequence, row 1 + j has token j
perturbed, so one call checks every (j, t) pair.
"""
import pytest
import torch

from hqlt.kernels import BLENDS, FW_KINDS, hybrid_memory
from hqlt.kernels.testing import random_inputs

T = 10
WINDOWS = (1, 3, 10, 13)          # W = 1, W not dividing T, W = T, W > T
BACKENDS = ("reference", "recurrent")
CHANGED, UNCHANGED = 1e-6, 1e-12


def kv_visible(blend, W, t, j):
    lo = (t // W) * W if blend == "delayed_chunk" else max(0, t - W + 1)
    return lo <= j <= t


def fw_visible(blend, W, t, j):
    """Token j's key/value is in the FW memory that query t reads."""
    last = {"sync": t, "delayed_stream": t - W, "delayed_chunk": (t // W) * W - 1}[blend]
    return j <= last


def fw_reads_step(blend, W, t, j):
    """Query t reads the FW state after stream step j (whose gates are beta_j, g_j)."""
    return j <= ((t // W) * W - 1 if blend == "delayed_chunk" else t)


def first_write(blend, W):
    """The first stream step that writes a real (non-zero) key: the delayed stream starts W late."""
    return W if blend == "delayed_stream" else 0


def perturbed_batch(fw, fields, seed=0):
    """Row 0: base inputs; row 1 + j: the same with `fields` of token j replaced by fresh values."""
    base = random_inputs(1, T, 1, 4, 3, fw=fw, seed=seed)
    fresh = random_inputs(1, T, 1, 4, 3, fw=fw, seed=seed + 1)
    batch = {n: None if x is None else x.repeat(T + 1, *[1] * (x.dim() - 1)) for n, x in base.items()}
    for j in range(T):
        for name in fields:
            batch[name][1 + j, j] = fresh[name][0, j]
    return batch


def outputs(batch, blend, W, fw, backend):
    names = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")
    o_kv, o_fw = hybrid_memory(*(batch[n] for n in names), g=batch["g"], blend=blend, window=W, fw=fw,
                               backend=backend, chunk_size=4)
    return o_kv[:, :, 0], o_fw[:, :, 0]


def assert_sensitivity(out, expect):
    """out: [1 + T, T, D]; expect(t, j) -> True (must change), False (must not), None (no claim)."""
    for j in range(T):
        for t in range(T):
            claim = expect(t, j)
            if claim is None:
                continue
            diff = (out[1 + j, t] - out[0, t]).abs().max().item()
            if claim:
                assert diff > CHANGED, f"perturbing token {j} should change output {t}"
            else:
                assert diff < UNCHANGED, f"perturbing token {j} must not change output {t} ({diff:.1e})"


# What perturbing each field of a token may change. A key alone cannot move an output that sees a
# single key (softmax over one key; sum-normalised linear attention over one key), hence `None`.
FIELDS = {"token": ("k_kv", "v", "k_fw"), "k_kv": ("k_kv",), "k_fw": ("k_fw",), "v": ("v",)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("W", WINDOWS)
@pytest.mark.parametrize("blend", BLENDS)
def test_visibility_table(blend, W, fw, backend):
    for field, names in FIELDS.items():
        o_kv, o_fw = outputs(perturbed_batch(fw, names), blend, W, fw, backend)

        def expect_kv(t, j):
            if not kv_visible(blend, W, t, j) or field == "k_fw":
                return False
            n_keys = sum(kv_visible(blend, W, t, i) for i in range(T))
            return None if field == "k_kv" and n_keys == 1 else True

        def expect_fw(t, j):
            if not fw_visible(blend, W, t, j) or field == "k_kv":
                return False
            n_keys = sum(fw_visible(blend, W, t, i) for i in range(T))
            return None if field == "k_fw" and fw == "linear" and n_keys == 1 else True

        assert_sensitivity(o_kv, expect_kv)
        assert_sensitivity(o_fw, expect_fw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("W", WINDOWS)
@pytest.mark.parametrize("blend", BLENDS)
def test_beta_is_unshifted(blend, W, fw, backend):
    """beta_j gates stream step j — for delayed_stream the write of token j - W, not of token j — so it
    moves o_fw[t] iff t reads step j and step j writes a real key; linear attention ignores beta."""
    o_kv, o_fw = outputs(perturbed_batch(fw, ("beta",)), blend, W, fw, backend)
    assert_sensitivity(o_kv, lambda t, j: False)
    assert_sensitivity(o_fw, lambda t, j: fw != "linear" and fw_reads_step(blend, W, t, j)
                       and j >= first_write(blend, W))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", WINDOWS)
@pytest.mark.parametrize("blend", BLENDS)
def test_decay_is_unshifted(blend, W, backend):
    """g_j decays the state before step j's write: it matters iff t reads step j and some earlier
    step wrote a real key."""
    o_kv, o_fw = outputs(perturbed_batch("gated_delta", ("g",)), blend, W, "gated_delta", backend)
    assert_sensitivity(o_kv, lambda t, j: False)
    assert_sensitivity(o_fw, lambda t, j: fw_reads_step(blend, W, t, j) and j > first_write(blend, W))


def test_delayed_stream_memories_partition_the_past():
    """Delayed-Streaming: KV and FW together see [0, t], with no overlap (the §4.2 invariant)."""
    for W in WINDOWS:
        for t in range(T):
            kv = {j for j in range(T) if kv_visible("delayed_stream", W, t, j)}
            fw = {j for j in range(T) if fw_visible("delayed_stream", W, t, j)}
            assert kv | fw == set(range(t + 1)) and not kv & fw
