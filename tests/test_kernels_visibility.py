"""The visibility table of docs/hqlt-math.md §4.5, checked by perturbation on both pure-torch backends.

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


# Delayed-Chunk with an FW read interval R other than the KV chunk C (`fw_chunk`, §4.3: the reference
# kernel reads its FW state every 64 tokens whatever C is). Written from the definition: KV sees the
# current C-chunk, FW holds every j < R*floor(t/R); with R > C some positions are visible to neither.
CHUNK_PAIRS = ((2, 4), (3, 5), (4, 2), (1, 10), (3, 13))   # (C, R): R a multiple of C, neither, R < C, R >= T


def fw_visible_every(R, t, j):
    return j <= (t // R) * R - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fw", FW_KINDS)
@pytest.mark.parametrize("C,R", CHUNK_PAIRS)
def test_delayed_chunk_read_interval(C, R, fw, backend):
    for field, names in FIELDS.items():
        batch = perturbed_batch(fw, names)
        args = [batch[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
        o_kv, o_fw = hybrid_memory(*args, g=batch["g"], blend="delayed_chunk", window=C, fw=fw, backend=backend,
                                   chunk_size=4, fw_chunk=R)
        o_kv, o_fw = o_kv[:, :, 0], o_fw[:, :, 0]

        def expect_kv(t, j):
            if not kv_visible("delayed_chunk", C, t, j) or field == "k_fw":
                return False
            n_keys = sum(kv_visible("delayed_chunk", C, t, i) for i in range(T))
            return None if field == "k_kv" and n_keys == 1 else True

        def expect_fw(t, j):
            if not fw_visible_every(R, t, j) or field == "k_kv":
                return False
            n_keys = sum(fw_visible_every(R, t, i) for i in range(T))
            return None if field == "k_fw" and fw == "linear" and n_keys == 1 else True

        assert_sensitivity(o_kv, expect_kv)
        assert_sensitivity(o_fw, expect_fw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,R", CHUNK_PAIRS)
def test_delayed_chunk_read_interval_gates(C, R, backend):
    """beta_j and g_j matter iff query t reads the state after step j, i.e. j < R*floor(t/R)."""
    for field in ("beta", "g"):
        batch = perturbed_batch("gated_delta", (field,))
        args = [batch[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
        o_kv, o_fw = hybrid_memory(*args, g=batch["g"], blend="delayed_chunk", window=C, fw="gated_delta",
                                   backend=backend, chunk_size=4, fw_chunk=R)
        assert_sensitivity(o_kv[:, :, 0], lambda t, j: False)
        # g_0 decays the empty state: no effect; beta_0 writes token 0
        assert_sensitivity(o_fw[:, :, 0], lambda t, j: fw_visible_every(R, t, j) and (field == "beta" or j > 0))


def test_fw_chunk_equal_to_the_window_is_the_default_and_other_blends_refuse_it():
    x = random_inputs(2, T, 2, 4, 3, seed=3)
    args = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
    a = hybrid_memory(*args, blend="delayed_chunk", window=3)
    b = hybrid_memory(*args, blend="delayed_chunk", window=3, fw_chunk=3)
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    c = hybrid_memory(*args, blend="delayed_chunk", window=3, fw_chunk=6)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])   # KV unchanged, FW reads less often
    for blend in ("sync", "delayed_stream"):
        with pytest.raises(ValueError, match="fw_chunk is only for blend='delayed_chunk'"):
            hybrid_memory(*args, blend=blend, window=3, fw_chunk=6)
    with pytest.raises(ValueError, match="fw_chunk must be an integer >= 1"):
        hybrid_memory(*args, blend="delayed_chunk", window=3, fw_chunk=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        hybrid_memory(*args, blend="delayed_chunk", window=3, fw_chunk=6, backend="nope")
