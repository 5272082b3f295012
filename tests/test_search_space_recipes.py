"""The recipe presets (docs/tasks.md §E) validate and state the published recipes exactly.

The expected values below are written from the papers and the authors' public configs (HQLT, NeurIPS 2025:
App. Table 7 and the synthetic-task README / training script, docs/hqlt-math.md §7; Zoology, Arora et al. 2023:
Figure 2 and its config), not read back from the presets. Every grid point of each preset is materialised into a
typed trial config and checked against them.
"""
from __future__ import annotations

import itertools
import math
from importlib.resources import files

import pytest

from hqlt.orchestration.space_hooks import HOOKS
from hqlt.orchestration.trial_config import trial_config
from hqlt.search_space import describe, load_spec
from hqlt.search_space.candidates import candidates
from hqlt.search_space.tree import materialize_base


def preset(name: str, overrides=()):
    return load_spec(str(files("hqlt.search_space").joinpath(f"presets/{name}.yaml")), list(overrides), hooks=HOOKS)


def grid(spec) -> list:
    cands, exhaustive = candidates(spec.params)
    assert exhaustive
    return [trial_config(materialize_base(spec.base, c)) for c in cands]


# ---------------------------------------------------------------------------------------------- HQLT synthetic
HQLT_SYNTHETIC = {  # both tasks
    "d_model": 128, "n_heads": 4, "n_layers": 2, "window": 8, "init_std": 0.006, "short_conv": True,
    "output_gate": True, "kv_pos": "none", "mix": "vector",
    "lr": 5e-3, "batch_size": 1024, "steps": 20_000, "weight_decay": 0.1, "decay_on": "all",
    "betas": (0.9, 0.999), "eps": 1e-8, "grad_clip": 0.0, "final_lr_ratio": 1e-3,
    "train_lengths": (3, 40), "test_lengths": (40, 256), "test_size": 8192, "seeds": 3, "seed_aggregate": "max",
}
HQLT_PER_TASK = {"parity": {"warmup": 2_000, "cosine_horizon": 20_000},
                 "mod_arith": {"warmup": 10_000, "cosine_horizon": 100_000}}
# (layer kinds, blend, FW read interval, beta range, KV window): Transformer, DeltaNet [0,1], DeltaNet [-1,1],
# Sync-HQLT, Delayed-Streaming, Delayed-Chunk read every C, Delayed-Chunk read every 64 (the reference kernel)
HQLT_ARMS = {("K", None, None, None, None), ("F", None, None, 1, None), ("F", None, None, 2, None),
             ("H", "sync", None, 2, 8), ("H", "delayed_stream", None, 2, 8), ("H", "delayed_chunk", 8, 2, 8),
             ("H", "delayed_chunk", 64, 2, 8)}


def hqlt_arm(m) -> tuple:
    kinds = set(m.pattern)
    assert len(kinds) == 1
    kind = kinds.pop()
    blend_entry, blend = m.mixer.part("blend")
    kv, fw = m.mixer.part("kv")[1], m.mixer.part("fw")[1]
    if kind == "K":
        assert kv.window is None  # full causal attention
        return ("K", None, None, None, None)
    read = (blend.fw_chunk or kv.window) if blend_entry.name == "delayed_chunk" else None
    if kind == "F":
        return ("F", None, None, fw.beta_range, None)
    assert kv.pos == "none"  # NoPos
    return ("H", blend_entry.name, read, fw.beta_range, kv.window)


@pytest.mark.parametrize("task", sorted(HQLT_PER_TASK))
def test_hqlt_synthetic_recipe(task):
    spec = preset(f"hqlt_recipe_{task}")
    describe(spec, HOOKS)  # what `hqlt validate` prints: every candidate valid
    r, t = HQLT_SYNTHETIC, HQLT_PER_TASK[task]
    assert spec.sweep.seeds == r["seeds"] and spec.sweep.seed_aggregate == r["seed_aggregate"]
    assert spec.sweep.metrics[0] == "test/acc_scaled" and spec.sweep.sampler == "grid"
    configs = grid(spec)
    assert spec.sweep.num_samples == len(configs) == len(HQLT_ARMS)
    assert {hqlt_arm(c.model) for c in configs} == HQLT_ARMS
    for c in configs:
        m, tr, tk = c.model, c.train, c.task_config
        assert c.task["name"] == task
        assert (m.d_model, m.n_heads, m.n_layers) == (r["d_model"], r["n_heads"], r["n_layers"])
        assert m.init_std == r["init_std"] and m.mixer.short_conv is r["short_conv"]
        assert m.mixer.output_gate is r["output_gate"] and m.mixer.part("mix")[0].name == r["mix"]
        assert m.mlp == "swiglu" and m.pos_emb == "none"
        assert (tr.lr, tr.batch_size, tr.steps) == (r["lr"], r["batch_size"], r["steps"])
        assert tr.weight_decay == r["weight_decay"] and tr.weight_decay_groups == r["decay_on"]
        assert tuple(tr.betas) == r["betas"] and tr.eps == r["eps"] and tr.grad_clip == r["grad_clip"]
        assert tr.warmup_steps == t["warmup"] and tr.cosine_steps == t["cosine_horizon"]
        assert tr.min_lr_ratio == r["final_lr_ratio"] and tr.precision == "auto"
        assert (tk.train_min_len, tk.train_max_len) == r["train_lengths"]
        assert (tk.eval_min_len, tk.eval_max_len) == r["test_lengths"] and tk.eval_size == r["test_size"]


# ---------------------------------------------------------------------------------------------- Zoology Figure 2
ZOOLOGY_FIG2 = {
    "vocab_size": 8192, "seq_len": 256, "num_kv_pairs": {16, 64}, "random_non_queries": False, "power_a": 0.01,
    "train_examples": 100_000, "test_examples": 3_000, "epochs": 64, "batch_size": 256,
    "d_model": {64, 128}, "lr": {10 ** (-4 + 2 * i / 3) for i in range(4)},   # numpy.logspace(-4, -2, 4)
    "n_layers": 2, "attention_heads": 1, "tie_embeddings": True, "init_std": 0.02,
    "weight_decay": 0.1, "decay_on": "all", "betas": (0.9, 0.999), "eps": 1e-8, "grad_clip": 0.0,
    "warmup": 0, "final_lr_ratio": 0.0, "early_stop": ("val/acc", 0.99),
}
# (layer kind, KV window): attention, SWA 16 / 64, DeltaNet, Sync-HQLT 16 / 64
ZOOLOGY_ARMS = {("K", None), ("K", 16), ("K", 64), ("F", None), ("H", 16), ("H", 64)}


def test_zoology_fig2_mqar_recipe():
    spec = preset("zoology_fig2_mqar")
    describe(spec, HOOKS)
    z = ZOOLOGY_FIG2
    configs = grid(spec)
    assert spec.sweep.num_samples == len(configs) == 2 * 2 * 4 * len(ZOOLOGY_ARMS)
    assert spec.sweep.metrics[0] == "test/acc" and spec.sweep.scheduler == "fifo" and spec.sweep.sampler == "grid"
    points = set()
    for c in configs:
        m, tr, tk = c.model, c.train, c.task_config
        kind = set(m.pattern).pop()
        window = m.mixer.part("kv")[1].window if kind in "KH" else None
        points.add((kind, window, m.d_model, tk.num_kv_pairs, tr.lr))
        assert c.task["name"] == "mqar" and tk.vocab_size == z["vocab_size"] and tk.seq_len == z["seq_len"]
        assert tk.random_non_queries is z["random_non_queries"] and tk.power_a == z["power_a"]
        assert not tk.train and not tk.eval  # one setting: train and evaluate on (256, D)
        assert tk.num_train_examples == z["train_examples"] and tk.eval_size == z["test_examples"]
        assert tr.batch_size == z["batch_size"] and tr.steps * tr.batch_size == z["epochs"] * z["train_examples"]
        assert abs(tr.eval_every * tr.batch_size / z["train_examples"] - 1) < 0.01  # evaluated about once an epoch
        assert m.n_layers == z["n_layers"] and m.mlp == "none" and m.tie_embeddings is z["tie_embeddings"]
        assert m.init_std == z["init_std"] and m.mixer.part("kv")[1].pos == "none"
        if kind == "K":  # Zoology's attention: one head, learned absolute positions covering the sequence
            assert m.n_heads == z["attention_heads"]
            assert m.pos_emb == "learned" and m.max_len >= z["seq_len"]
        else:
            assert m.pos_emb == "none"
        assert tr.weight_decay == z["weight_decay"] and tr.weight_decay_groups == z["decay_on"]
        assert tuple(tr.betas) == z["betas"] and tr.eps == z["eps"] and tr.grad_clip == z["grad_clip"]
        assert tr.warmup_steps == z["warmup"] and tr.min_lr_ratio == z["final_lr_ratio"] and tr.cosine_steps is None
        assert (tr.early_stop.metric, tr.early_stop.value) == z["early_stop"] and tr.precision == "fp32"
    assert len(points) == len(configs)
    assert {(k, w) for k, w, *_ in points} == ZOOLOGY_ARMS
    assert {p[2] for p in points} == z["d_model"] and {p[3] for p in points} == z["num_kv_pairs"]
    lrs = sorted({p[4] for p in points})
    assert len(lrs) == 4 and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lrs, sorted(z["lr"])))
    assert len(list(itertools.product(ZOOLOGY_ARMS, z["d_model"], z["num_kv_pairs"], lrs))) == len(points)


def test_zoology_fig2_mqar_asha_variant_validates():
    """The documented ASHA variant: one validation objective, ASHA counted in evaluations (about epochs)."""
    spec = preset("zoology_fig2_mqar", ["sweep.scheduler=asha", "sweep.objectives=[{metric: val/acc, mode: max}]"])
    assert spec.sweep.scheduler == "asha" and spec.sweep.metrics == ["val/acc"]
    assert spec.sweep.asha.max_t == 64
