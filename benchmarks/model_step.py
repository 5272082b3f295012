"""Time one training step (forward + backward + AdamW) of a small HybridLM per layer kind and blend.

    python -m hqlt.benchmarks.model_step                 # CPU, 2 layers, d 64, batch 64 x 64 tokens
    python -m hqlt.benchmarks.model_step --threads 1 --steps 20 --json out.json

Variants: hybrid layers (H) with each registered blend, and the two single-memory baselines, K
(Transformer: full causal softmax attention) and F (DeltaNet). Each variant gets its own model and
optimizer; after `--warmup` untimed steps the median wall time of `--steps` steps is reported (min and
max alongside, since a shared CPU is noisy). Numbers are for comparing variants on one machine in one run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from hqlt.blocks.model import build_model
from hqlt.blocks.registry import BLEND


def variants(window: int) -> list[tuple[str, dict]]:
    out = [(f"H {blend}", {"layers": "H", "mixer": {"kv": {"name": "softmax", "window": window}, "blend": blend}})
           for blend in ("sync", "delayed_stream", "delayed_chunk")]
    assert {name.split()[1] for name, _ in out} == set(BLEND.names())
    out.append(("K transformer", {"layers": "K", "mixer": {"kv": {"name": "softmax", "window": None}}}))
    out.append(("F deltanet", {"layers": "F", "mixer": {"fw": {"name": "delta", "beta_range": 1}}}))
    return out


def time_steps(cfg: dict, *, batch: int, seq: int, steps: int, warmup: int, device: str, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tokens = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return times


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--window", type=int, default=16, help="KV window W of the H layers (chunk C for delayed_chunk)")
    ap.add_argument("--chunk-size", type=int, default=16, help="internal chunk of the chunked FW form")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokens = args.batch * args.seq
    print(f"# HybridLM train step (fwd+bwd+AdamW): {args.n_layers} layers, d_model {args.d_model}, "
          f"{args.n_heads} heads, batch {args.batch} x {args.seq} tokens, W=C={args.window}, vocab {args.vocab}")
    print(f"# device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<18} {'params':>8} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'tok/s':>10}")
    rows = []
    for name, part in variants(args.window):
        cfg = {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.n_layers,
               "n_heads": args.n_heads, "chunk_size": args.chunk_size, **part}
        times = time_steps(cfg, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                           device=args.device)
        med = statistics.median(times)
        params = build_model(cfg).num_params()
        row = {"variant": name, "params": params, "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
               "max_ms": max(times) * 1e3, "tok_s": tokens / med}
        rows.append(row)
        print(f"{name:<18} {params:>8} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {row['max_ms']:>8.1f} "
              f"{row['tok_s']:>10.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
