"""`hqlt bench model`: training tokens/s of the 340M language models on one GPU (docs/hqlt-math.md §6.1).

    hqlt bench model [--models transformer deltanet sync_hqlt] [--seq 2048] [--batch 8] [--compile both]

One training step = forward + backward + grad-clip 1.0 + AdamW step (fused, fp32 master weights) under
bf16 autocast, on random tokens (vocab 32000). Each model is built, warmed up (``--warmup`` steps, which
include compilation), then timed over ``--steps`` steps between two synchronisations. Reported: tokens/s,
MFU = tokens/s x analytic training FLOPs/token (``hqlt.blocks.estimate``, docs/tasks.md §C7) / peak
(989.4 TFLOP/s bf16 dense for H100 SXM and H200), the ratio to the Transformer in the same compile mode,
peak memory, and which kernel backend ``auto`` picked.

``--compile on`` compiles each block (``block.compile()``: the 24 identical blocks share one compiled
graph); the kernel calls are ``torch.library`` custom ops (``kernels/ops.py``) with fake implementations,
so a whole block compiles as one graph with each memory op as one node (verified on CPU; on CUDA not yet
measured).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hqlt.blocks.sizes import SIZE_PRESETS

PEAK_BF16 = 989.4e12
_SIZE = SIZE_PRESETS["340M"]  # the same sizes as a sweep's `probe: {size: 340M}`
BASE = dict(vocab_size=_SIZE.vocab_size, d_model=_SIZE.d_model, n_layers=_SIZE.n_layers)
CONFIGS = {
    # name: (model config, parameters per docs/hqlt-math.md §6.1)
    "transformer": (dict(BASE, n_heads=_SIZE.kv_n_heads, layers="K",
                         mixer={"kv": {"name": "softmax", "window": None, "pos": "rope"}}), 373.9e6),
    "deltanet": (dict(BASE, n_heads=_SIZE.n_heads, layers="F", mixer={"fw": {"name": "delta", "beta_range": 1}}),
                 374.1e6),
    "sync_hqlt": (dict(BASE, n_heads=_SIZE.n_heads, layers="H",
                       mixer={"kv": {"name": "softmax", "window": 64, "pos": "rope"},
                              "fw": {"name": "delta", "beta_range": 2}, "blend": "sync", "mix": "vector"}),
                  399.2e6),
}
LABELS = {"transformer": "Transformer-340M", "deltanet": "DeltaNet-340M", "sync_hqlt": "Sync-HQLT-340M (W=64)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--backend", default="auto", help="kernel backend of the mixers")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("hqlt bench model: needs a CUDA device", file=sys.stderr)
        return 2
    from hqlt.blocks import HybridLM, estimate, model_config

    card = torch.cuda.get_device_name(0)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    meta = {"device": card, "torch": torch.__version__, "seq_len": args.seq, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "backend": args.backend, "peak_flops": PEAK_BF16,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    print(f"# {card}, torch {torch.__version__}, T={args.seq}, batch {args.batch} ({args.batch * args.seq} tokens/step), "
          f"bf16 autocast + fused AdamW, backend={args.backend}")
    for compiled in modes:
        for name in args.models:
            data, expected = CONFIGS[name]
            cfg = model_config(dict(data, backend=args.backend))
            row = {"model": name, "label": LABELS[name], "compile": compiled, "params_expected": expected,
                   "flops_per_token": estimate(cfg, args.seq).flops_per_token}
            try:
                row.update(_train_speed(HybridLM, cfg, args, compiled))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            torch.cuda.empty_cache()
            if row.get("tokens_per_s"):
                row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / PEAK_BF16
            rows.append(row)
            _print(row)
            if args.out:
                _save(args.out, meta, rows)
    base = {r["compile"]: r.get("tokens_per_s") for r in rows if r["model"] == "transformer"}
    for r in rows:
        if r.get("tokens_per_s") and base.get(r["compile"]):
            r["ratio_transformer"] = r["tokens_per_s"] / base[r["compile"]]
    print()
    print(f"{'model':<24}{'compile':>8}{'params':>10}{'tok/s':>10}{'MFU':>7}{'x Transf.':>10}{'peak GiB':>9}  backend")
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<24}{str(r['compile']):>8}  failed: {r['error']}")
            continue
        print(f"{r['label']:<24}{str(r['compile']):>8}{r['params'] / 1e6:>9.1f}M{r['tokens_per_s']:>10.0f}"
              f"{100 * r['mfu']:>6.1f}%{r.get('ratio_transformer', float('nan')):>9.2f}x{r['peak_mem_gib']:>9.1f}"
              f"  {r.get('kernel_backend', '')}")
    if args.out:
        _save(args.out, meta, rows)
        print(f"# results: {args.out}")
    return 0


def _train_speed(HybridLM, cfg, args, compiled: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from hqlt.kernels import auto_choices

    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    model = HybridLM(cfg).cuda()
    params = model.num_params()
    if compiled:
        cfg_dyn = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if getattr(cfg_dyn, key, 64) < 64:
                setattr(cfg_dyn, key, 64)
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.1,
                            fused=True)
    V = cfg.vocab_size
    tokens = torch.randint(0, V, (args.batch, args.seq + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, V), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    op = {"K": "kv_memory", "F": "fw_memory", "H": "hybrid_memory"}[cfg.pattern[0]]
    picked = sorted({b for k, b in auto_choices().items() if k[0] == op and k[3] == args.seq})
    out = {"params": params, "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
           "step_ms": 1e3 * elapsed / args.steps, "warmup_s": warm_s, "loss": float(loss),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "kernel_backend": cfg.backend if cfg.backend != "auto" else "auto: " + (",".join(picked) or "?")}
    del model, opt
    return out


def _print(r) -> None:
    if "error" in r:
        print(f"  {r['label']} compile={r['compile']}: failed: {r['error']}", flush=True)
        return
    print(f"  {r['label']} compile={r['compile']}: {r['params'] / 1e6:.1f}M params (expected "
          f"{r['params_expected'] / 1e6:.1f}M), {r['tokens_per_s']:.0f} tok/s, step {r['step_ms']:.1f} ms, "
          f"MFU {100 * r['mfu']:.1f}%, warm-up {r['warmup_s']:.1f} s, peak {r['peak_mem_gib']:.1f} GiB, "
          f"loss {r['loss']:.3f}, {r['kernel_backend']}", flush=True)


def _save(path: Path, meta, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hqlt.benchmarks.model",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
