"""What the fused backend claims, decided on CPU: the shared-memory budget of the fused kernels
(``hqlt.kernels.fused.settings``: a table of sm_90 compiles + an envelope), the backend's coverage rule
(``fused_covers``), the compile-time plan (``dispatch.plan``), and ``backend="auto"``'s shape-class rule (fused
only where a measured row of its class says it is fastest), with synthetic tables; the benchmark's table
writer. No GPU and no triton needed.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from hqlt.kernels import auto_table, dispatch
from hqlt.kernels.backends import fused as FB
from hqlt.kernels.fused import resources
from hqlt.kernels.fused import settings as S

H200, A100, SM89 = 232448, 166912, 101376   # shared_memory_per_block_optin, bytes


# ------------------------------------------------------------------------------------- shared memory
def test_table_has_every_default_configuration_and_the_envelope_bounds_it():
    table = S.smem_table()
    missing = [k for k, _ in resources.configurations() if k not in table]
    assert not missing, f"re-run python -m hqlt.kernels.fused.resources: {missing[:5]}"
    for key, measured in table.items():
        kernel, e, feat, bk, bv = key.split("/")[:5]
        group = (kernel, feat == "F")
        bound = sum(c * t for c, t in zip(S.SMEM_ENVELOPE[group], S.smem_terms(int(e[1:]), int(bk[2:]), int(bv[2:]))))
        assert bound >= measured, key


def test_spill_report_compiles_what_the_launch_runs(monkeypatch):
    # ``resources --spills`` must compile each kernel as the launcher runs it under the configuration: the register cap
    # on fw_bwd_dk (with features computed in the kernel the cap makes it spill, FUSED_NOTES.md "Round 18"), the
    # one-launch KV backward instead of the two split kernels when "kv_bwd" is "fused", and fw_bwd_wy loading the
    # forward's U (its own table name) when "fw_bwd_u" is "fwd"
    def items():
        return {label: kw for label, kw in resources.spill_configurations(dims=(128,), fw_bwd="split")}

    plain = items()
    # the default ("given"): the cap only where the features are given
    assert {kw["feat"]: kw["maxnreg"] for kw in plain.values() if kw["kernel"] == "fw_bwd_dk"} == {
        True: 0, False: S.FW_BWD_DK_GIVEN_REGS}
    assert all(kw["maxnreg"] == 0 for kw in plain.values() if kw["kernel"] != "fw_bwd_dk")
    assert {kw["kernel"] for kw in plain.values()} >= {"kv_dq", "kv_dkdv", "fw_bwd_wy"}
    assert S.KEPT_U_WY not in {kw["kernel"] for kw in plain.values()}
    monkeypatch.setenv("HQLT_FUSED_CONFIG", '{"fw_bwd_u": "fwd"}')
    kept_u = [kw["kernel"] for kw in items().values()]
    assert kept_u.count(S.KEPT_U_WY) == 1 and "fw_bwd_wy" not in kept_u
    monkeypatch.setenv("HQLT_FUSED_CONFIG", '{"fw_bwd_dk_maxnreg": 128, "kv_bwd": "fused"}')
    capped = items()
    kernels = {kw["kernel"] for kw in capped.values()}
    assert "kv_bwd" in kernels and not kernels & {"kv_dq", "kv_dkdv"}
    assert next(kw["warps"] for kw in capped.values() if kw["kernel"] == "kv_bwd") == 8
    assert {kw["maxnreg"] for kw in capped.values() if kw["kernel"] == "fw_bwd_dk"} == {128}
    assert {kw["maxnreg"] for kw in capped.values() if kw["kernel"] != "fw_bwd_dk"} == {0}
    assert sum(kw["kernel"] == "fw_bwd_dk" for kw in capped.values()) == 2   # features computed and given


def test_fw_bwd_dk_register_cap_by_feature_mode():
    assert S.default_config(8, 8, 128, 128, 132)["fw_bwd_dk_maxnreg"] == "given"
    assert (S.fw_bwd_dk_regs("given", featurize=False), S.fw_bwd_dk_regs("given", featurize=True)) == (128, 0)
    assert S.fw_bwd_dk_regs(96, featurize=True) == 96 and S.fw_bwd_dk_regs(0, featurize=False) == 0
    for bad in ("auto", -1, 1.5, True):
        with pytest.raises(ValueError, match=r"fw_bwd_dk_maxnreg.*\"given\" or an integer >= 0"):
            S.fw_bwd_dk_regs(bad, featurize=False)


def test_kept_u_counts_the_larger_of_the_wy_kernels_compiles():
    # under "fw_bwd_u" "fwd" fw_bwd_wy loads the forward's U, or recomputes it where a backward got none: its need is
    # the larger of the two sm_90 compiles. Loading needs less at the default tiles, more at float32, BK 128, BV 32,
    # 8 warps (FUSED_NOTES.md "U kept for fw_bwd_wy"); the key changes no other kernel's need
    table = S.smem_table()

    def needs(elem, **cfg):
        return S.smem_needs(elem, 128, 128, featurize=False, config=cfg, kernels=S.backward_kernels(
            dict(S.default_config(1, 1, 128, 128), **cfg)))

    w8 = {"fw_bwd_wy_warps": 8}
    assert needs(4, **w8)["fw_bwd_wy"] == table["fw_bwd_wy/e4/-/BK128/BV32/w8/s2"]
    assert needs(4, fw_bwd_u="fwd", **w8)["fw_bwd_wy"] == table["fw_bwd_wy_u/e4/-/BK128/BV32/w8/s2"] > \
        table["fw_bwd_wy/e4/-/BK128/BV32/w8/s2"]
    for elem in (2, 4):
        recompute, kept = needs(elem), needs(elem, fw_bwd_u="fwd")
        assert kept == recompute and table[f"fw_bwd_wy_u/e{elem}/-/BK128/BV32/w4/s2"] < recompute["fw_bwd_wy"]
    assert all(f"{S.KEPT_U_WY}/{k.split('/', 1)[1]}" in table for k in table if k.startswith("fw_bwd_wy/"))


def test_the_h200_failure_is_predicted():
    # float32, d = 128, features in the kernel, few (batch, head) pairs: the reverse scan runs 16-column value
    # blocks and needs 245760 B (what the H200 reported), more than its 232448 B
    needs = S.smem_needs(4, 128, 128, featurize=True, batch=1, heads=3, sms=132)
    assert needs["bwd_scan"] == 245760
    assert max(needs, key=needs.get) == "bwd_scan"
    for bh in ((1, 3), (8, 8), (64, 8)):
        assert not S.fits_shared_memory(4, 128, 128, H200, featurize=True, batch=bh[0], heads=bh[1], sms=132)
    assert S.fits_shared_memory(4, 64, 64, H200, featurize=True, batch=1, heads=3, sms=132)


@pytest.mark.parametrize("d", [16, 32, 64, 100, 128])
def test_half_precision_fits_h200_and_a100(d):
    for featurize in (False, True):
        for limit in (H200, A100):
            assert S.fits_shared_memory(2, d, d, limit, featurize=featurize, batch=8, heads=8, sms=132)


def test_small_shared_memory_cards_lose_d128_only():
    assert not S.fits_shared_memory(2, 128, 128, SM89, featurize=False, batch=8, heads=8, sms=128)
    assert S.fits_shared_memory(2, 64, 64, SM89, featurize=False, batch=8, heads=8, sms=128)


def test_a_configuration_outside_the_table_gets_the_envelope():
    cfg = {"fw_bwd_bv": 64}                      # not a default: no compile of it in the table
    need = S.smem_needs(2, 64, 64, featurize=False, config=cfg, kernels=("fw_bwd",))["fw_bwd"]
    assert need == round(sum(c * t for c, t in zip(S.SMEM_ENVELOPE[("fw_bwd", False)], S.smem_terms(2, 64, 64))))


def test_default_config_is_the_launchers():
    pytest.importorskip("triton")
    import torch
    from hqlt.kernels.fused import launch
    assert launch.default_config(2, 3, 40, 100, torch.device("cpu")) == S.default_config(2, 3, 40, 100, 1)


def test_process_config_overrides_the_defaults_and_names_bad_keys(monkeypatch):
    monkeypatch.setenv("HQLT_FUSED_CONFIG", '{"fw_bwd_t": "pre", "scan_warps": 8}')
    cfg = S.default_config(1, 8, 128, 128, 132)
    assert cfg["fw_bwd_t"] == "pre" and cfg["scan_warps"] == 8
    assert {k: v for k, v in cfg.items() if k not in ("fw_bwd_t", "scan_warps")} == {
        k: v for k, v in S._default_config(1, 8, 128, 128, 132).items() if k not in ("fw_bwd_t", "scan_warps")}
    monkeypatch.setenv("HQLT_FUSED_CONFIG", '{"fw_bwd_tt": "pre"}')
    with pytest.raises(ValueError, match=r"HQLT_FUSED_CONFIG: unknown keys \['fw_bwd_tt'\]; allowed: .*'fw_bwd_t'"):
        S.default_config(1, 8, 128, 128, 132)
    monkeypatch.setenv("HQLT_FUSED_CONFIG", "fw_bwd_t=pre")
    with pytest.raises(ValueError, match="HQLT_FUSED_CONFIG: not JSON"):
        S.default_config(1, 8, 128, 128, 132)
    monkeypatch.setenv("HQLT_FUSED_CONFIG", "")
    assert S.default_config(1, 8, 128, 128, 132) == S._default_config(1, 8, 128, 128, 132)


# --------------------------------------------------------------------------------------- coverage
BASE = dict(blend="sync", fw="delta", window=64, batch=8, heads=8, dk=128, dv=128, kernel_dtype="bfloat16",
            device_type="cuda", smem_limit=H200)


@pytest.mark.parametrize("change,covered", [
    ({}, True),
    ({"kernel_dtype": "float16"}, True),
    ({"kernel_dtype": "float32"}, False),        # TF32 products: short of the float32 contract
    ({"kernel_dtype": "float32", "dk": 64, "dv": 64}, False),
    ({"window": 1}, True), ({"window": 257}, True), ({"window": 1 << 20}, True), ({"window": 0}, False),
    ({"dk": 32, "dv": 64}, True), ({"dk": 160}, False), ({"dk": 16, "dv": 16}, True),
    ({"dk": 24, "dv": 40}, True), ({"dk": 64, "dv": 40}, True), ({"dk": 96}, True),  # zero-padded to 32/64/128
    ({"blend": "delayed_stream"}, False), ({"fw": "gated_delta", "has_g": True}, False), ({"fw": "linear"}, False),
    ({"has_beta": False}, False), ({"same_qk": False}, False),
    ({"batch": 10000, "heads": 8}, False),       # B*H over a CUDA grid axis
    ({"smem_limit": SM89}, False), ({"smem_limit": SM89, "dk": 64, "dv": 64}, True),
    ({"smem_limit": A100}, True),
])
def test_fused_covers(change, covered):
    assert FB.fused_covers(**dict(BASE, **change)) is covered


def test_fused_covers_on_cpu_only_under_the_interpreter(monkeypatch):
    cpu = dict(BASE, device_type="cpu", smem_limit=None, kernel_dtype="float32")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not FB.fused_covers(**cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert FB.fused_covers(**cpu)
    assert not FB.fused_covers(**dict(cpu, kernel_dtype="float64"))


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA backends "available" and an H200's limits, on a CPU machine (for the policy only)."""
    for name in ("fla", "flex", "fused"):
        monkeypatch.setitem(dispatch._PROBES, name, True)
    monkeypatch.setattr(FB, "cuda_smem_limit", lambda: H200)
    monkeypatch.setattr(FB, "cuda_sm_count", lambda: 132)
    monkeypatch.setattr(auto_table, "_CHOICES", {})
    yield


def _plan(backend="fused", **kw):
    args = dict(blend="sync", fw="delta", window=64, batch=8, seq_len=2048, heads=8, dk=128, dv=128,
                dtypes=("bfloat16",) * 5, autocast="", has_beta=True, has_g=False)
    args.update(kw)
    return dispatch.plan("hybrid_memory", backend, "cuda", **args)


def test_compile_plan_routes_to_the_fused_op_only_where_it_applies(fake_gpu, monkeypatch):
    assert _plan() == ("fused", True, "bfloat16", True)
    assert _plan(dtypes=("float32",) * 5) == ("fused", False, "float32", True)      # fused backend's fallback
    assert _plan(dtypes=("float32",) * 5, autocast="bfloat16")[1:3] == (True, "bfloat16")
    assert _plan(dtypes=("float32",) * 4 + ("bfloat16",))[1:3] == (True, "bfloat16")
    assert _plan(window=1024)[1] and not _plan(blend="delayed_chunk")[1]
    monkeypatch.setenv("HQLT_FUSED_SAVE_STATES", "0")
    assert _plan()[3] is False
    monkeypatch.setenv("HQLT_FUSED_BACKWARD", "0")
    assert _plan()[1] is False          # the old recompute backward: the generic op runs the backend
    assert _plan(backend="fla") == ("fla", False, "bfloat16", True)
    with pytest.raises(ValueError):
        _plan(backend="nope")


# ------------------------------------------------------------------------------------ auto policy
def _table(tmp_path, monkeypatch, entries, **extra):
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"device": "test", "dtype": "bfloat16", "entries": entries, **extra}))
    monkeypatch.setenv("HQLT_AUTO_TABLE", str(path))
    auto_table.load_table.cache_clear()
    return path


def _row(blend, W, T, d, **ms):
    return {"blend": blend, "window": W, "seq_len": T, "heads": 8, "head_dim": d, "batch": max(1, 16384 // T),
            "ms": ms}


def _pick(op="hybrid_memory", blend="sync", W=64, T=2048, d=128, fw="delta", dtype="bfloat16", heads=8, batch=8,
          device=None):
    return auto_table.pick(op, blend, W, T, d, available=lambda: {"fla", "flex", "fused"},
                           fallback=lambda: "fla", fw=fw, dtype=dtype, heads=heads, batch=batch,
                           eligible=dispatch.eligible, device=device)


def test_auto_takes_fused_only_where_a_row_of_its_class_has_it_fastest(tmp_path, monkeypatch, fake_gpu):
    _table(tmp_path, monkeypatch, [
        _row("sync", 64, 2048, 128, fla=2.8, flex=3.7, fused=1.1),        # in class, fused fastest
        _row("sync", 64, 2048, 256, fla=3.3, flex=3.5, fused=3.2),        # out of class (d > 128): a fallback time
        dict(_row("sync", 64, 4096, 128, fla=3.0, flex=3.6, fused=1.0), dtype="float32"),   # out of class (float32):
        #                                                                   fused "fastest" is the fallback's noise
        _row("sync", 64, 32768, 128, fla=3.9, flex=4.0, fused=4.5),       # in class, fused slower
        _row("delayed_stream", 64, 2048, 128, fla=4.3, flex=4.3, fused=1.0),   # blend the kernel does not run
    ])
    try:
        assert _pick() == "fused"
        assert _pick(W=128) == "fused"                      # nearest row of the class: W = 64
        assert _pick(W=1024) == "fused"                     # any window is in the class; nearest row: W = 64
        assert _pick(d=256) == "fla"                        # the call is outside the class
        assert _pick(T=4096) == "fla"                       # in class, but the nearest row (float32) is not
        assert _pick(T=32768) == "fla"                      # in class, but measured slower
        assert _pick(fw="gated_delta") == "fla"
        assert _pick(dtype="float32") == "fla"
        assert _pick(blend="delayed_stream") == "fla"
        assert _pick(op="kv_memory") == "fla"
        monkeypatch.setattr(FB, "cuda_smem_limit", lambda: SM89)   # a card whose shared memory the kernels exceed
        monkeypatch.setattr(auto_table, "_CHOICES", {})
        assert _pick() == "fla"
        assert _pick(d=64) == "fused"                       # nearest row d = 128 is in class (it ran there)
    finally:
        auto_table.load_table.cache_clear()


def test_auto_rows_measured_with_another_fw_or_dtype_do_not_count_for_fused(tmp_path, monkeypatch, fake_gpu):
    _table(tmp_path, monkeypatch, [dict(_row("sync", 64, 2048, 128, fla=2.8, fused=1.1), fw="gated_delta")])
    try:
        assert _pick() == "fla"
        _table(tmp_path, monkeypatch, [_row("sync", 64, 2048, 128, fla=2.8, fused=1.1)], dtype="float32")
        monkeypatch.setattr(auto_table, "_CHOICES", {})
        assert _pick() == "fla"
    finally:
        auto_table.load_table.cache_clear()


def test_auto_needs_fused_verified_when_the_table_has_a_verified_list(tmp_path, monkeypatch, fake_gpu):
    rows = [_row("sync", 64, 2048, 128, fla=2.8, flex=3.7, fused=1.1)]
    _table(tmp_path, monkeypatch, rows, verified=["fla", "flex"])
    try:
        assert _pick() == "fla"
        _table(tmp_path, monkeypatch, rows, verified=["fla", "flex", "fused"])
        monkeypatch.setattr(auto_table, "_CHOICES", {})
        assert _pick() == "fused"
    finally:
        auto_table.load_table.cache_clear()


def test_verified_map_gates_each_calling_card_by_its_own_parity_run(tmp_path, monkeypatch, fake_gpu):
    rows = [_row("sync", 64, 2048, 128, fla=2.8, fused=1.1)]
    _table(tmp_path, monkeypatch, rows, verified={"H200": ["fla", "fused"], "H100": ["fla"]})
    try:
        table = auto_table.load_table()
        assert auto_table.verified_on(table, "H200") == {"fla", "fused"}
        assert auto_table.verified_on(table, "H100") == {"fla"}
        assert auto_table.verified_on(table, "A100") == {"fla"}        # unnamed card: verified on every named one
        assert auto_table.verified_on(table, None) == {"fla"}
        both = {"verified": {"H200": ["fla", "fused"], "H100": ["fla", "fused"]}}
        assert auto_table.verified_on(both, "A100") == {"fla", "fused"}   # passed on every named card
        starred = {"verified": dict(both["verified"], **{auto_table.OTHER_CARDS: ["fla"]})}
        assert auto_table.verified_on(starred, "A100") == auto_table.verified_on(starred, None) == {"fla"}
        assert auto_table.verified_on(starred, "H100") == {"fla", "fused"}
        assert auto_table.verified_on({"verified": ["fla"]}, "H200") == {"fla"}
        assert auto_table.verified_on({}, "H200") is None
        avail = lambda: {"fla", "fused"}
        pick = lambda dev: auto_table.pick("hybrid_memory", "sync", 64, 2048, 128, available=avail,
                                           fallback=lambda: "fla", heads=8, batch=8, eligible=dispatch.eligible,
                                           device=dev)
        assert pick("H200") == "fused"
        monkeypatch.setattr(auto_table, "_CHOICES", {})
        assert pick("H100") == "fla"
        monkeypatch.setattr(auto_table, "_CHOICES", {})
        assert auto_table.majority_winner({"fla", "fused"}, device="H200") == "fused"
        assert auto_table.majority_winner({"fla", "fused"}, device="H100") == "fla"
    finally:
        auto_table.load_table.cache_clear()


def test_resolve_auto_never_names_a_backend_with_a_shape_class(tmp_path, monkeypatch, fake_gpu):
    _table(tmp_path, monkeypatch, [_row("sync", 64, 2048, 128, fla=2.8, flex=3.7, fused=1.1),
                                   _row("sync", 64, 8192, 128, fla=2.8, flex=2.7, fused=1.1)])
    try:
        assert dispatch.resolve_backend("auto", "cuda") in ("fla", "flex")
    finally:
        auto_table.load_table.cache_clear()


def test_shipped_table_picks_fused_only_on_its_verified_card_where_its_row_is_fastest(monkeypatch, fake_gpu):
    """The committed table: on each card whose gate lists fused, each measured sync shape picks that card's faster
    backend of fla and fused (kernels/results/auto_table.json); on a card the table does not name, never fused."""
    monkeypatch.delenv("HQLT_AUTO_TABLE", raising=False)
    auto_table.load_table.cache_clear()
    try:
        table = auto_table.load_table()
        gate = table["verified"]
        cards = sorted(c for c, names in gate.items() if "fused" in names)
        assert isinstance(gate, dict) and cards == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
        sync = [e for e in table["entries"] if e["blend"] == "sync"]
        shape = lambda e: (e["window"], e["seq_len"], e["head_dim"], e["heads"], e["batch"])   # noqa: E731
        fastest = {(auto_table.entry_device(table, e), shape(e)): min(("fla", "fused"), key=lambda n: e["ms"].get(
            n) or float("inf")) for e in sync}
        picked = {c: [] for c in cards}
        for e in sync:
            for device in (*cards, "NVIDIA A100-SXM4-80GB"):
                auto_table._CHOICES.clear()   # the choice is kept per shape; here the same shape asks again per card
                got = _pick(W=e["window"], T=e["seq_len"], d=e["head_dim"], heads=e["heads"], batch=e["batch"],
                            device=device)
                if device in cards:   # every verified card has its own row of each shape
                    assert got == fastest[(device, shape(e))], (device, e, got)
                    picked[device].append(got)
                else:
                    assert got != "fused", (device, e)
        # the H200 rows (round 11) have both outcomes: fla at 16 x 64 with W 1024 at T 2048 and 8192; the H100 rows
        # (round 15) pick fused everywhere
        assert set(picked["NVIDIA H200"]) == {"fla", "fused"} and set(picked["NVIDIA H100 80GB HBM3"]) == {"fused"}
    finally:
        auto_table.load_table.cache_clear()


# ------------------------------------------------------------------------------------ benchmark writer
def test_benchmark_times_fused_and_keeps_the_verified_gate(tmp_path):
    from hqlt.benchmarks import kernels as bk
    avail = {"reference": True, "recurrent": True, "fla": True, "flex": True, "flash_attn": False, "fused": True}
    assert bk.default_backends(avail, lambda n, dev: n not in ("reference", "recurrent")) == ["fla", "flex", "fused"]
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"verified": ["fla"], "verified_note": "gate", "entries": []}))
    meta = {"device": "H", "torch": "t", "fla": "f", "dtype": "bfloat16", "date": "d", "fw": "delta"}
    results = [{"blend": "sync", "window": 64, "seq_len": 2048, "heads": 8, "head_dim": 128, "batch": 8,
                "backend": n, "ms": t} for n, t in (("fla", 2.8), ("fused", 1.1))]
    bk._write_auto_table(str(path), meta, results)
    table = json.loads(path.read_text())
    assert table["verified"] == ["fla"] and table["verified_note"] == "gate"
    (entry,) = table["entries"]
    assert entry["fw"] == "delta" and entry["ms"] == {"fla": 2.8, "fused": 1.1} and entry["winner"] == "fused"
    # a later run of part of the table on the same card and versions updates it: the row it timed again is
    # replaced whole (its backends compared within one run), a new row is added, the gate stays
    later = [{"blend": "sync", "window": 64, "seq_len": 2048, "heads": 8, "head_dim": 128, "batch": 8,
              "backend": "flex", "ms": 0.9},
             {"blend": "sync", "window": 64, "seq_len": 8192, "heads": 8, "head_dim": 128, "batch": 2,
              "backend": "fla", "ms": 3.0}]
    bk._write_auto_table(str(path), {**meta, "date": "d2"}, later)
    table = json.loads(path.read_text())
    assert table["verified"] == ["fla"] and "merged into the table of d" in table["source"]
    rows = {e["seq_len"]: e for e in table["entries"]}
    assert rows[2048]["ms"] == {"flex": 0.9} and rows[2048]["winner"] == "flex"
    assert rows[8192]["ms"] == {"fla": 3.0} and rows[8192]["winner"] == "fla"
    # another card with the same versions: its rows join the table, each naming its card
    bk._write_auto_table(str(path), {**meta, "device": "other", "date": "d3"}, later[:1])
    table = json.loads(path.read_text())
    assert table["devices"] == ["H", "other"] and len(table["entries"]) == 3
    assert sorted((e["device"], e["seq_len"]) for e in table["entries"]) == [("H", 2048), ("H", 8192),
                                                                               ("other", 2048)]
    # other torch / fla versions: the table is replaced, nothing of the earlier runs kept
    bk._write_auto_table(str(path), {**meta, "device": "other", "torch": "t2"}, later[:1])
    table = json.loads(path.read_text())
    assert [e["ms"] for e in table["entries"]] == [{"flex": 0.9}] and "merged" not in table["source"]


def test_auto_prefers_the_calling_cards_rows_at_equal_shape(tmp_path, monkeypatch):
    """Rows are per card: at the same distance the calling card's row decides; a row of another card counts as
    far as a 2x shape difference (OTHER_CARD_DISTANCE), so a sibling card's row at the call's shape beats the
    card's own row 4x away."""
    row = lambda dev, T, fla, fused: {"device": dev, "blend": "sync", "window": 64, "seq_len": T,  # noqa: E731
                                      "heads": 8, "head_dim": 128, "batch": 1, "ms": {"fla": fla, "fused": fused}}
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"device": "A", "entries": [row("A", 2048, 3.0, 2.0), row("B", 2048, 2.0, 3.0),
                                                           row("B", 8192, 2.0, 3.0)]}))
    monkeypatch.setenv("HQLT_AUTO_TABLE", str(path))
    auto_table.load_table.cache_clear()
    try:
        look = lambda T, dev: auto_table.lookup("sync", 64, T, 128, {"fla", "fused"}, device=dev)  # noqa: E731
        assert look(2048, "A")[0] == "fused" and look(2048, "B")[0] == "fla"
        assert look(8192, "A")[1]["device"] == "B"   # B at T 8192: 1.0; A's own row at T 2048: 2.0
        assert look(8192, "C")[1]["seq_len"] == 8192  # a third card: every row is another card's
        assert auto_table.majority_winner({"fla", "fused"}, device="A") == "fused"
        assert auto_table.majority_winner({"fla", "fused"}, device="B") == "fla"
        assert auto_table.majority_winner({"fla", "fused"}, device=None) == "fla"  # entries of no card: all rows
    finally:
        auto_table.load_table.cache_clear()


# ---- fla's gated delta rule on Hopper -----------------------------------------------------------
def test_fla_gated_delta_refusal_rule():
    """fla 0.6.0 refuses chunk_gated_delta_rule on Hopper with Triton in [3.4.0, 3.7.1) without tilelang;
    the composition then takes the reference FW form instead of raising (seen on an H200, Triton 3.6.0)."""
    from hqlt.kernels.backends.blend_compose import fla_fw_ok, fla_gated_refused
    assert fla_gated_refused((9, 0), (3, 6, 0), tilelang=False)
    assert fla_gated_refused((9, 0), (3, 4, 0), tilelang=False)
    assert not fla_gated_refused((9, 0), (3, 7, 1), tilelang=False)
    assert not fla_gated_refused((9, 0), (3, 3, 1), tilelang=False)
    assert not fla_gated_refused((9, 0), (3, 6, 0), tilelang=True)
    assert not fla_gated_refused((8, 0), (3, 6, 0), tilelang=False)   # A100: fla runs it
    assert not fla_gated_refused((10, 0), (3, 6, 0), tilelang=False)
    # dtype first: float32 never runs fla's kernels; a CPU device never asks for the capability
    assert not fla_fw_ok("gated_delta", torch.float32, torch.device("cpu"))
    assert fla_fw_ok("gated_delta", torch.bfloat16, torch.device("cpu"))
    assert fla_fw_ok("delta", torch.bfloat16, None)


def test_profile_driver_refuses_unknown_config_keys(capsys):
    from hqlt.benchmarks import fused_profile
    for bad, says in (('{"scan_feature": "stored"}', "unknown keys ['scan_feature']; allowed: ['BK'"),
                      ("scan_features=stored", "not JSON"), ('["stored"]', "a JSON object")):
        with pytest.raises(SystemExit) as exc:
            fused_profile.main(["--config", bad])
        assert exc.value.code == 2 and says in capsys.readouterr().err


def test_fused_benchmark_refuses_unknown_config_keys(capsys):
    from hqlt.benchmarks import fused as bench
    for flag in ("--configs", "--bwd-configs"):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--device", "cpu", flag, '{"fw_bwd_t": "wy"}', '{"fw_bwd_tt": "wy"}'])
        assert exc.value.code == 2 and "unknown keys ['fw_bwd_tt']; allowed: ['BK'" in capsys.readouterr().err


def test_fused_ab_checks_its_arguments_before_any_work(capsys, monkeypatch):
    # the A/B runner: an unknown config key or a malformed row stops it at parsing (exit 2, naming what is wrong);
    # without a CUDA device it says so and does nothing
    from hqlt.benchmarks import fused_ab
    for argv, says in ((["--configs", '{"fw_bwd_tt": "fwd"}', "--rows", "2048:8x128:64"],
                        "unknown keys ['fw_bwd_tt']; allowed: ['BK'"),
                       (["--configs", "{}", "--rows", "2048:8x128"],
                        "a row is T:HxD:W, e.g. 2048:8x128:64; got '2048:8x128'"),
                       (["--configs", "{}", "--rows", "0:8x128:64"], "must be >= 1"),
                       (["--rows", "2048:8x128:64"], "--configs"),
                       (["--configs", "{}", "--rows", "2048:8x128:64", "--timer", "graphs"],
                        "argument --timer: invalid choice: 'graphs'")):
        with pytest.raises(SystemExit) as exc:
            fused_ab.main(argv)
        assert exc.value.code == 2 and says in capsys.readouterr().err, argv
    assert fused_ab.parse_row("32768:16X64:1024") == (32768, 16, 64, 1024)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for timer in ("events", "kernels", "graph"):
        assert fused_ab.main(["--configs", "{}", "--rows", "2048:8x128:64", "--timer", timer]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_kv_backward_rows_by_window_and_their_shared_memory(monkeypatch):
    # rows 0 means 128 from KV_WIDE_WINDOW on with 2-byte inputs, else 64; 128-row programs have their own table
    # entries (8 warps), larger than the 64-row ones, so a window that takes them can tip a shape over a device's
    # limit, and only such a window
    from hqlt.kernels.fused import settings as S
    assert [S.kv_rows(0, w) for w in (1, S.KV_WIDE_WINDOW - 1, S.KV_WIDE_WINDOW)] == [64, 64, 128]
    assert S.kv_rows(64, 10 ** 6) == 64 and S.kv_rows(128, 1) == 128 and S.kv_rows(0, None) == 128
    assert S.kv_rows(0, 10 ** 6, elem_bytes=4) == 64 and S.kv_rows(128, 1, elem_bytes=4) == 128
    by_window = {"kv_dq_rows": 0}
    narrow = S.smem_needs(2, 128, 128, featurize=False, window=64, config=by_window)
    wide = S.smem_needs(2, 128, 128, featurize=False, window=S.KV_WIDE_WINDOW, config=by_window)
    assert wide["kv_dq"] == S.smem_table()["kv_dq128/e2/-/BK128/BV128/w8/s2"] > narrow["kv_dq"]
    assert wide["kv_dkdv"] == narrow["kv_dkdv"]
    assert {k: v for k, v in wide.items() if k != "kv_dq"} == {k: v for k, v in narrow.items() if k != "kv_dq"}
    limit = (narrow["kv_dq"] + wide["kv_dq"]) // 2
    fits = functools.partial(S.fits_shared_memory, 2, 128, 128, limit, featurize=False, kernels=("kv_dq",))
    assert fits(window=64, config=by_window) and fits(window=S.KV_WIDE_WINDOW)   # the default at d 128: 64 rows
    assert not fits(window=S.KV_WIDE_WINDOW, config=by_window)
    assert not fits(config=by_window)   # window unknown: the larger need
    monkeypatch.setenv("HQLT_FUSED_CONFIG", '{"kv_dq_rows": 0}')   # the cached default configuration reads it
    assert fits(window=64) and not fits(window=S.KV_WIDE_WINDOW)
    monkeypatch.delenv("HQLT_FUSED_CONFIG")
    # at d <= 64 the default is by the window (FUSED_NOTES.md "Round 15")
    narrow64, wide64 = (S.smem_needs(2, 64, 64, featurize=False, window=w) for w in (64, S.KV_WIDE_WINDOW))
    table = S.smem_table()
    assert all(wide64[k] == table[f"{k}128/e2/-/BK64/BV64/w8/s2"] > narrow64[k] for k in ("kv_dq", "kv_dkdv"))
    assert {k: v for k, v in wide64.items() if not k.startswith("kv_")} == {
        k: v for k, v in narrow64.items() if not k.startswith("kv_")}


def test_blocks_per_sm_matches_nsight_compute_on_the_h100():
    # resources.blocks_per_sm against Nsight Compute's block limits for every fused kernel of one H100 profile
    # (kernels/results/ncu_fused_8x2048_h100_round16.txt: registers per thread, warps, dynamic shared memory; "Block
    # Limit Registers", and "Block Limit Shared Mem" where the driver chose the largest carveout, 233.47 KB)
    from hqlt.kernels.fused.resources import blocks_per_sm
    ncu = {"wy": (255, 4, 10240, 2, None), "scan": (142, 4, 118784, 3, 1), "out": (168, 4, 90112, 3, 2),
           "kv_bwd_dq": (203, 4, 98304, 2, 2), "kv_bwd_dkdv": (255, 4, 107008, 2, 2),
           "fw_bwd_dq": (128, 8, 57344, 2, 4), "bwd_scan": (198, 4, 118784, 2, 1),
           "fw_bwd_wy": (255, 4, 77824, 2, 2), "fw_bwd_dk": (129, 8, 32768, 1, None)}
    for name, (regs, warps, smem, by_regs, by_smem) in ncu.items():
        assert blocks_per_sm(regs, warps, 0) == by_regs, name
        assert blocks_per_sm(regs, warps, smem) == min(by_regs, by_smem or by_regs), name
    # the other limits: 64 warps, 32 blocks, and a count rounded up to 8 registers before the 256-register unit
    assert blocks_per_sm(32, 4, 0) == 16 and blocks_per_sm(16, 1, 0) == 32
    assert blocks_per_sm(128, 4, 0) == 4 and blocks_per_sm(129, 4, 0) == 3 and blocks_per_sm(121, 4, 0) == 4
