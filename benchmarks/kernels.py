"""`hqlt bench kernels`: fwd+bwd time of each GPU backend's ``hybrid_memory`` and of full-causal SDPA.

    hqlt bench kernels [--seqs 2048 8192 32768] [--shapes 8x128 16x64] [--windows 64 1024]
                       [--blends sync delayed_stream delayed_chunk] [--out FILE.json] [--write-auto-table]

Everything runs in one process on one GPU, bf16, ``tokens`` tokens per batch (B = max(1, tokens // T)).
Per (T, H x d): SDPA full causal (``F.scaled_dot_product_attention(is_causal=True)``, the baseline),
the two halves of the sync composition alone (fla sliding-window ``parallel_attn`` and fla
``chunk_delta_rule``), and per (W, blend) each backend's ``hybrid_memory``. Times are the median of
``--repeats`` CUDA-event timings after ``--warmup`` untimed calls (which also absorb Triton autotuning and
FlexAttention compilation); one call = forward + backward of both outputs with fixed random upstream
gradients (``torch.autograd.grad``, so nothing accumulates).

TFLOP/s use analytic model FLOPs (docs/tasks.md §C7; a multiply-add is 2 FLOPs, training = 3x
forward): KV 4·d·P(T, W) per head and sequence with P the scored pairs (sliding window of W keys, or
chunk-local for delayed_chunk); FW per token and head 10·c·d + 6·d² + (2/3)·c² with the kernel chunk
c = 64 (6·c·d + ... for delayed_chunk, which has no intra-chunk read-out); SDPA 4·d·T(T+1)/2.
"x SDPA" is time / SDPA time (> 1: slower than full attention).

``--write-auto-table`` stores, per (card, blend, W, T, d), every backend's time (and the FW kind timed) in the
table that ``backend="auto"`` reads on CUDA (kernels/results/auto_table.json), keeping the replaced table's
"verified" list; "fused" is timed whenever it is available, and ``auto`` takes it only for calls of its
shape class whose nearest measured row of the class has it fastest (``hqlt.kernels.auto_table``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_SEQS = (2048, 8192, 32768)
DEFAULT_SHAPES = ("8x128", "16x64")
DEFAULT_WINDOWS = (64, 1024)
BLENDS = ("sync", "delayed_stream", "delayed_chunk")
FLA_CHUNK = 64


# ------------------------------------------------------------------------------------------- FLOPs
def pairs(T: int, W: int | None, blend: str = "sync") -> int:
    """Scored query-key pairs of one causal sequence (docs/tasks.md §C7)."""
    if W is None or (W >= T and blend != "delayed_chunk"):
        return T * (T + 1) // 2
    if blend == "delayed_chunk":
        full, rest = divmod(T, W)
        return full * W * (W + 1) // 2 + rest * (rest + 1) // 2
    return W * T - W * (W - 1) // 2


def fw_flops_per_token(d: int, fw: str, blend: str, c: int = FLA_CHUNK) -> float:
    if fw == "linear":
        return 4 * c * d + 4 * d * d
    if blend == "delayed_chunk":
        return 6 * c * d + 6 * d * d + (2 / 3) * c * c
    return 10 * c * d + 6 * d * d + (2 / 3) * c * c


def hybrid_flops(B, T, H, d, W, blend, fw="delta") -> float:
    """Training (fwd + bwd = 3x fwd) model FLOPs of one hybrid_memory call."""
    kv = 4 * d * pairs(T, W, blend)
    fwd = B * H * (kv + T * fw_flops_per_token(d, fw, blend))
    return 3.0 * fwd


def sdpa_flops(B, T, H, d) -> float:
    return 3.0 * B * H * 4 * d * pairs(T, None)


# ------------------------------------------------------------------------------------------- timing
def cuda_time_ms(fn, warmup: int, repeats: int) -> float:
    """Median CUDA-event time of fn() in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _fwd_bwd(forward, leaves, grads):
    def step():
        outs = forward()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        torch.autograd.grad(outs, leaves, grads[:len(outs)], allow_unused=True)
    return step


def parse_pair(text: str, example: str = "8x128", meaning: str = "heads x head dim") -> tuple[int, int]:
    """'AxB' -> (A, B), for argparse ``type=`` (with functools.partial for other examples/meanings)."""
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like {example} ({meaning}); got {text!r}")


# ------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqs", type=int, nargs="+", default=list(DEFAULT_SEQS), help="sequence lengths T")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch; B = max(1, tokens // T)")
    p.add_argument("--shapes", type=parse_pair, nargs="+", default=[parse_pair(s) for s in DEFAULT_SHAPES],
                   help="heads x head dim, e.g. 8x128 16x64")
    p.add_argument("--pairs", nargs="+", default=None, metavar="T:HxD",
                   help="explicit (T, shape) pairs, e.g. 32768:8x128 (instead of --seqs x --shapes)")
    p.add_argument("--windows", type=int, nargs="+", default=list(DEFAULT_WINDOWS), help="W (= C for delayed_chunk)")
    p.add_argument("--blends", nargs="+", default=list(BLENDS), choices=BLENDS)
    p.add_argument("--fw", default="delta", choices=("delta", "gated_delta", "linear"))
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to time (default: every available CUDA backend except the reference)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the full results")
    p.add_argument("--write-auto-table", nargs="?", const="default", default=None, metavar="PATH",
                   help="also write the auto-backend table (default path: kernels/results/auto_table.json)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new configurations after this many seconds (results so far are kept)")


def run(args) -> int:
    if not torch.cuda.is_available():
        print("hqlt bench kernels: needs a CUDA device", file=sys.stderr)
        return 2
    import torch.nn.functional as F

    from hqlt.kernels import available_backends, fw_memory, hybrid_memory, kv_memory
    from hqlt.kernels.dispatch import backend_runs_on
    from hqlt.kernels.testing import random_inputs

    avail = available_backends()
    if args.backends:
        missing = [b for b in args.backends if not avail.get(b)]
        if missing:
            print(f"hqlt bench kernels: backend(s) not available here: {', '.join(missing)}", file=sys.stderr)
            return 2
        backends = list(args.backends)
    else:
        backends = default_backends(avail, backend_runs_on)
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    meta = {"device": card, "torch": torch.__version__, "fla": _version("fla-core"), "dtype": "bfloat16",
            "tokens": args.tokens, "fw": args.fw, "warmup": args.warmup, "repeats": args.repeats,
            "command": "hqlt bench kernels " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "kernels"]
                                                         else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results, sdpa_rows, parts = [], [], []
    t_start = time.perf_counter()
    print(f"# {card}, torch {torch.__version__}, fla {meta['fla']}, bf16, {args.tokens} tokens/batch, "
          f"fw={args.fw}, backends: {', '.join(backends)}; ms = median of {args.repeats}")
    print(f"{'T':>6} {'HxD':>6} {'B':>3} {'W':>5} {'blend':<15} {'backend':<11} {'ms':>9} {'TFLOP/s':>8} {'x SDPA':>7}")

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**meta, "sdpa": sdpa_rows, "parts": parts, "results": results},
                                           indent=1))

    def over_budget():
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    stopped = False
    if args.pairs:
        todo = [(int(t), parse_pair(hd)) for t, hd in (p.split(":") for p in args.pairs)]
    else:
        todo = [(T, shape) for T in args.seqs for shape in args.shapes]
    for T, (H, d) in todo:
        B = max(1, args.tokens // T)
        if True:
            if over_budget():
                stopped = True
                break
            x = random_inputs(B, T, H, d, fw=args.fw, dtype=torch.bfloat16, device=device, seed=T + H,
                              requires_grad=True)
            if x["g"] is not None:
                x["g"] = x["g"].float().detach().requires_grad_()
            leaves = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta", "g") if x[n] is not None]
            grads = [torch.randn_like(x["v"]), torch.randn_like(x["v"])]

            # baseline: SDPA full causal, same tokens, heads and head dim
            qh, kh, vh = (x[n].detach().transpose(1, 2).contiguous().requires_grad_() for n in ("q_kv", "k_kv", "v"))
            sdpa = _measure(_fwd_bwd(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
                                     [qh, kh, vh], [grads[0].transpose(1, 2).contiguous()]), args)
            sdpa_ms = sdpa.get("ms")
            sdpa_rows.append({"seq_len": T, "heads": H, "head_dim": d, "batch": B, **sdpa,
                              "tflops": _tflops(sdpa_flops(B, T, H, d), sdpa_ms)})
            _row(T, H, d, B, None, "full causal", "sdpa", sdpa_ms, _tflops(sdpa_flops(B, T, H, d), sdpa_ms), 1.0)
            del qh, kh, vh

            # the sync composition's halves (fla SWA alone, fla FW alone)
            if "fla" in backends:
                fw_alone = _measure(_fwd_bwd(
                    lambda: fw_memory(x["q_fw"], x["k_fw"], x["v"], x["beta"], fw=args.fw, g=x["g"],
                                      backend="fla"), leaves, grads), args)
                fl = 3.0 * B * H * T * fw_flops_per_token(d, args.fw, "sync")
                parts.append({"part": f"fla {args.fw} (FW alone)", "seq_len": T, "heads": H, "head_dim": d,
                              "batch": B, "window": None, **fw_alone, "tflops": _tflops(fl, fw_alone.get("ms")),
                              "ratio_sdpa": _ratio(fw_alone.get("ms"), sdpa_ms)})
                _row(T, H, d, B, None, f"FW {args.fw}", "fla", fw_alone.get("ms"), _tflops(fl, fw_alone.get("ms")),
                     _ratio(fw_alone.get("ms"), sdpa_ms), fw_alone.get("error"))
                for W in args.windows:
                    swa = _measure(_fwd_bwd(lambda: kv_memory(x["q_kv"], x["k_kv"], x["v"], window=W, backend="fla"),
                                            leaves, grads), args)
                    fl = 3.0 * B * H * 4 * d * pairs(T, W)
                    parts.append({"part": "fla SWA (KV alone)", "seq_len": T, "heads": H, "head_dim": d,
                                  "batch": B, "window": W, **swa, "tflops": _tflops(fl, swa.get("ms")),
                                  "ratio_sdpa": _ratio(swa.get("ms"), sdpa_ms)})
                    _row(T, H, d, B, W, "SWA", "fla", swa.get("ms"), _tflops(fl, swa.get("ms")),
                         _ratio(swa.get("ms"), sdpa_ms), swa.get("error"))

            for W in args.windows:
                for blend in args.blends:
                    if over_budget():
                        stopped = True
                        break
                    fl = hybrid_flops(B, T, H, d, W, blend, args.fw)
                    for backend in backends:
                        if backend == "fused" and not _fused_runs(blend, W, B, H, d, args.fw):
                            # it would time its fallback (the fla composition) under its own name
                            results.append({"blend": blend, "window": W, "seq_len": T, "heads": H, "head_dim": d,
                                            "batch": B, "backend": backend, "ms": None,
                                            "error": "not covered: the fused kernels do not run this call"})
                            continue
                        r = _measure(_fwd_bwd(lambda: hybrid_memory(
                            x["q_kv"], x["k_kv"], x["q_fw"], x["k_fw"], x["v"], x["beta"], g=x["g"], blend=blend,
                            window=W, fw=args.fw, backend=backend), leaves, grads), args)
                        row = {"blend": blend, "window": W, "seq_len": T, "heads": H, "head_dim": d, "batch": B,
                               "backend": backend, **r, "tflops": _tflops(fl, r.get("ms")),
                               "ratio_sdpa": _ratio(r.get("ms"), sdpa_ms)}
                        results.append(row)
                        _row(T, H, d, B, W, blend, backend, r.get("ms"), row["tflops"], row["ratio_sdpa"],
                             r.get("error"))
                        save()
            del x, leaves, grads
            torch.cuda.empty_cache()
            save()
    if stopped:
        print(f"# stopped early: --budget-s {args.budget_s} reached; the remaining configurations were not run")
    save()
    if args.write_auto_table:
        path = _write_auto_table(args.write_auto_table, meta, results)
        print(f"# auto table written: {path}")
    if args.out:
        print(f"# results: {args.out}")
    return 0


def default_backends(avail: dict[str, bool], runs_on) -> list[str]:
    """Every available CUDA backend except the pure-torch ones — "fused" included wherever triton and a GPU
    are there, so that a written auto table can say where it is fastest."""
    return [n for n, ok in avail.items() if ok and n not in ("reference", "recurrent") and runs_on(n, "cuda")]


def _measure(step, args) -> dict:
    try:
        return {"ms": cuda_time_ms(step, args.warmup, args.repeats)}
    except Exception as exc:  # OOM or a backend limit: record and go on
        torch.cuda.empty_cache()
        return {"ms": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _ratio(ms, base):
    return None if not ms or not base else ms / base


def _row(T, H, d, B, W, blend, backend, ms, tflops, ratio, error=None):
    if ms is None:
        print(f"{T:>6} {f'{H}x{d}':>6} {B:>3} {W or '-':>5} {blend:<15} {backend:<11} failed: {error}", flush=True)
        return
    print(f"{T:>6} {f'{H}x{d}':>6} {B:>3} {W or '-':>5} {blend:<15} {backend:<11} {ms:>9.3f} "
          f"{tflops:>8.1f} {ratio:>6.2f}x", flush=True)


def _fused_runs(blend: str, window: int, batch: int, heads: int, head_dim: int, fw: str) -> bool:
    """Whether backend "fused" runs its own kernels for this benchmark call (bf16, q/k shared by both memories)."""
    from hqlt.kernels.dispatch import eligible
    return eligible("fused", {"op": "hybrid_memory", "blend": blend, "fw": fw, "window": window, "batch": batch,
                              "heads": heads, "head_dim": head_dim, "dtype": "bfloat16"})


def _write_auto_table(where: str, meta: dict, results: list) -> Path:
    from hqlt.kernels.auto_table import TABLE_PATH, entry_device
    path = TABLE_PATH if where == "default" else Path(where)
    card = meta["device"]
    entries: dict[tuple, dict] = {}
    for r in results:
        key = (card, r["blend"], r["window"], r["seq_len"], r["heads"], r["head_dim"])
        e = entries.setdefault(key, {"device": card, "blend": r["blend"], "window": r["window"],
                                     "seq_len": r["seq_len"], "heads": r["heads"], "head_dim": r["head_dim"],
                                     "batch": r["batch"], "fw": meta.get("fw", "delta"), "ms": {}})
        e["ms"][r["backend"]] = r["ms"]
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    source = "hqlt bench kernels --write-auto-table"
    # A run that measured part of the table (some blends, shapes or one card) updates it rather than dropping the
    # rest: with the same dtype and library versions, the rows it did not time are kept (each names its card).
    # A row's backends are always compared within one run: a row timed again is replaced whole.
    same = all(old.get(k) == meta[k] for k in ("dtype", "torch", "fla"))
    if same:
        for old_entry in old.get("entries", []):
            kept = {"device": entry_device(old, old_entry), **old_entry}
            key = tuple(kept.get(k) for k in ("device", "blend", "window", "seq_len", "heads", "head_dim"))
            entries.setdefault(key, kept)
        source += f" (merged into the table of {old.get('date')}: the rows not timed again are kept)"
    for e in entries.values():
        timed = {n: t for n, t in e["ms"].items() if t is not None}
        e["winner"] = min(timed, key=timed.get) if timed else None
    devices = sorted({e["device"] for e in entries.values()})
    table = {"device": card, "devices": devices, "torch": meta["torch"], "fla": meta["fla"], "dtype": meta["dtype"],
             "date": meta["date"], "source": source, "entries": list(entries.values())}
    # the parity gate ("verified": backends whose GPU tests passed on the card) is kept from the table this
    # one replaces: a benchmark measures speed, not correctness
    for k in ("verified", "verified_note"):
        if k in old:
            table[k] = old[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path


def _version(dist: str) -> str:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hqlt.benchmarks.kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
