"""A/B of fused launch configurations as a model layer runs the kernel: fwd+bwd of ``hybrid_memory(backend="fused")``
(FW features given, every input differentiated) under each configuration, all in one process.

    python -m hqlt.benchmarks.fused_ab --configs '{"fw_bwd_t": "pre"}' '{"fw_bwd_t": "fwd"}' \\
        --rows 2048:8x128:64 32768:16x64:1024 [--fla] [--tokens 16384] [--passes 2] [--budget-s 200] [--out F.json]

Each configuration is a JSON object of ``settings.default_config`` keys, applied as ``HQLT_FUSED_CONFIG`` (what a
training run would set); an unknown key stops the run before any work. A row is ``T:HxD:W`` with B = max(1, tokens //
T), bf16. Per row: the host's time to issue one step without a sync (first configuration, and fla with ``--fla``:
whether a shape is bound by the host rather than the GPU; for fused also with its kernels not launched, which splits
the host's time into the Triton launcher's and the rest; with ``--host-profile N`` also the GPU's kernel time per step
and the host's N most expensive functions), then ``--passes`` passes over the configurations (the spread between
passes is the noise; compare within a row), each a median of 30 CUDA-event timings after 5 (first pass) or 3 warm-up
steps, with the gradients' largest relative RMS difference from the first configuration's (``--timer kernels``:
instead the kernels' GPU time per step, over 10 steps under torch.profiler, each kernel's share printed: a host-bound
row's GPU work; ``--timer graph``: the replay of the step captured in a CUDA graph, timed with CUDA events, the
wall time of a step as the trainer's graph engine runs it); ``--fla`` times the fla composition once per pass,
``--sdpa`` full-causal SDPA over the same tokens. ``--budget-s`` stops between timings once spent; the JSON is
written after every row and on SIGTERM. Needs a CUDA device."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from .fused_profile import parse_config
from .kernels import _version, cuda_time_ms

CONFIG_ENV = "HQLT_FUSED_CONFIG"


def parse_row(text: str) -> tuple[int, int, int, int]:
    """'T:HxD:W' -> (T, H, D, W), for argparse ``type=``."""
    try:
        t, hd, w = text.split(":")
        h, d = hd.lower().split("x")
        row = int(t), int(h), int(d), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a row is T:HxD:W, e.g. 2048:8x128:64; got {text!r}") from None
    if min(row) < 1:
        raise argparse.ArgumentTypeError(f"T, H, D and W must be >= 1; got {text!r}")
    return row


def _warm_up(step) -> None:
    """Three untimed steps (the first compiles), finished on the GPU."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()


def _host_ms(step, steps: int = 20) -> float:
    """Mean wall time to issue one step (no sync inside; the queue holds 20 steps), after 3 untimed ones."""
    _warm_up(step)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t) / steps * 1e3
    torch.cuda.synchronize()
    return host


def _host_profile(step, top: int, steps: int = 20) -> list[dict]:
    """cProfile of ``steps`` issued steps (no sync inside): the ``top`` functions by their own time, per step."""
    import cProfile
    import pstats
    _warm_up(step)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats   # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}:{name}", "calls_per_step": calls / steps,
             "own_us_per_step": own / steps * 1e6, "cum_us_per_step": cum / steps * 1e6}
            for (f, line, name), (_, calls, own, cum, _) in rows]


def _kernel_ms(step, steps: int = 10) -> dict[str, float]:
    """GPU time per step of each kernel the step runs (torch.profiler; ms, summed over its launches in a step) and
    their total under "total": the step's time if the host never kept the GPU waiting."""
    from torch.profiler import ProfilerActivity, profile
    _warm_up(step)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time / steps / 1e3
    return {"total": sum(per.values()), **dict(sorted(per.items(), key=lambda kv: -kv[1]))}


def _graphed(step):
    """``step`` captured once into a CUDA graph, returned as its replay: the step as the trainer's graph engine runs
    it (orchestration/engine.py), without the host's Python and launches. Warmed up on a side stream first, as
    capture asks (the first steps compile and allocate)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _short(per: dict[str, float], top: int = 12) -> str:
    """'name ms' pairs of the largest kernels (Triton's names without "_kernel"; torch's first 24 characters)."""
    items = [(k.removesuffix("_kernel")[:24], v) for k, v in per.items() if k != "total"][:top]
    return " ".join(f"{k} {v:.3f}" for k, v in items)


def bench_row(row: tuple[int, int, int, int], args, out: dict, over_budget) -> None:
    from hqlt.kernels import hybrid_memory
    from hqlt.kernels.fused import launch as FL
    from hqlt.kernels.testing import random_inputs, skip_launches, watch_launches

    def _launches(run) -> int:
        seen = []
        with watch_launches(FL, lambda name, _a, _k: seen.append(name)):
            run()
        torch.cuda.synchronize()
        return len(seen)

    T, H, d, W = row
    B = max(1, args.tokens // T)
    x = random_inputs(B, T, H, d, fw="delta", dtype=torch.bfloat16, device=torch.device("cuda"), seed=T + H + W,
                      requires_grad=True)
    leaves = [x[n] for n in ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta")]
    grads = [torch.randn_like(x["v"]), torch.randn_like(x["v"])]
    scale = d ** -0.5

    def call(backend):
        return hybrid_memory(*leaves, blend="sync", window=W, fw="delta", kv_scale=scale, fw_scale=scale,
                             backend=backend)

    def step(backend):
        return lambda: torch.autograd.grad(call(backend), leaves, grads)

    label = f"T{T} {H}x{d} W{W} B{B}"
    r = {"T": T, "H": H, "d": d, "W": W, "B": B, "ms": {}, "grad_diff": {}}
    out["rows"].append(r)
    os.environ[CONFIG_ENV] = json.dumps(args.configs[0])
    for backend in ("fused",) + (("fla",) if args.fla else ()):
        if backend == "fla":
            os.environ[CONFIG_ENV] = ""
        r[f"host_ms_{backend}"] = _host_ms(step(backend))
        print(f"{label} host issue time {backend}: {r[f'host_ms_{backend}']:.3f} ms", flush=True)
        if backend == "fused":   # the same step with the kernels not launched: the rest of the host's time
            with skip_launches(FL):
                r["host_ms_fused_no_launch"] = _host_ms(step(backend))
            print(f"{label} host issue time fused without its {_launches(step(backend))} kernel launches: "
                  f"{r['host_ms_fused_no_launch']:.3f} ms", flush=True)
        if args.host_profile:
            per = _kernel_ms(step(backend))
            r[f"kernel_ms_{backend}"] = per
            print(f"{label} GPU kernel time {backend}: {per['total']:.3f} ms per step ({_short(per)})", flush=True)
            r[f"host_profile_{backend}"] = _host_profile(step(backend), args.host_profile)
            print(f"{label} host profile {backend} (own / cumulative us per step, calls per step):", flush=True)
            for e in r[f"host_profile_{backend}"]:
                print(f"  {e['own_us_per_step']:8.1f} {e['cum_us_per_step']:8.1f} {e['calls_per_step']:6.1f}  "
                      f"{e['function']}", flush=True)

    def timed(fn, warmup: int = 5):
        if args.timer == "kernels":
            return _kernel_ms(fn)["total"]
        return cuda_time_ms(_graphed(fn) if args.timer == "graph" else fn, warmup, 30)

    if args.sdpa:   # the milestones' baseline: full-causal SDPA over the same tokens, heads and head dim
        import torch.nn.functional as F
        qh, kh, vh = (x[n].detach().transpose(1, 2).contiguous().requires_grad_() for n in ("q_kv", "k_kv", "v"))
        go = grads[0].transpose(1, 2).contiguous()

        def sdpa_step():
            return torch.autograd.grad(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), (qh, kh, vh), go)

    ref = None
    for rep in range(args.passes):
        for cfg in args.configs:
            if over_budget():
                r["stopped"] = "budget reached"
                return
            key = json.dumps(cfg, sort_keys=True)
            os.environ[CONFIG_ENV] = json.dumps(cfg)
            try:
                if args.timer == "kernels":
                    per = _kernel_ms(step("fused"))
                    r.setdefault("kernel_ms", {}).setdefault(key, []).append(per)
                    ms = per["total"]
                else:
                    ms = timed(step("fused"), 3 if rep else 5)
                g = [t.float() for t in torch.autograd.grad(call("fused"), leaves, grads)]
                ref = g if ref is None else ref
                err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, ref))
            except Exception as exc:   # a configuration that fails (resources, a value) is reported; the run goes on
                ms, err = None, f"{type(exc).__name__}: {exc}"[:300]
            r["ms"].setdefault(key, []).append(ms)
            r["grad_diff"][key] = err
            print(f"{label} pass {rep} {key:<60} {ms if ms is None else f'{ms:.3f}'} ms  grad diff {err}", flush=True)
            if args.timer == "kernels" and ms is not None:
                print(f"    {_short(per)}", flush=True)
        if args.sdpa:
            ms = timed(sdpa_step)
            r["ms"].setdefault("sdpa", []).append(ms)
            print(f"{label} pass {rep} full-causal SDPA {ms:.3f} ms", flush=True)
        if args.fla:
            os.environ[CONFIG_ENV] = ""
            ms = timed(step("fla"))
            r["ms"].setdefault("fla", []).append(ms)
            print(f"{label} pass {rep} fla {ms:.3f} ms", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hqlt.benchmarks.fused_ab", description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=parse_config, nargs="+", required=True, metavar="JSON",
                   help="launch-config overrides, the first the baseline, e.g. '{\"fw_bwd_t\": \"pre\"}' (an empty "
                        "object '{}' is the defaults)")
    p.add_argument("--rows", type=parse_row, nargs="+", required=True, metavar="T:HxD:W")
    p.add_argument("--fla", action="store_true", help="time the fla composition at every row too")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="per row and backend also the GPU's kernel time per step (torch.profiler) and the host's "
                        "N most expensive functions (cProfile)")
    p.add_argument("--sdpa", action="store_true", help="time full-causal SDPA at every row too (the baseline)")
    p.add_argument("--timer", choices=("events", "kernels", "graph"), default="events",
                   help="events: CUDA events around each step (what an eager training loop waits for, the host's "
                        "time included where it is longer); kernels: the GPU's kernel time per step (torch.profiler, "
                        "10 steps), with each kernel's share printed; graph: CUDA events around the replay of the "
                        "step captured in a CUDA graph (what the trainer's graph engine waits for)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = max(1, tokens // T))")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=None, help="stop between timings after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("hqlt.benchmarks.fused_ab: needs a CUDA device", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": _version("triton"),
           "fla": _version("fla-core"), "dtype": "bfloat16", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": "python -m hqlt.benchmarks.fused_ab " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": []}
    print(f"# {out['device']}, torch {out['torch']}, triton {out['triton']}, fla {out['fla']}", flush=True)
    start = time.time()
    saved_env = os.environ.get(CONFIG_ENV)

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))

    def stopped(signum, _frame):   # `timeout` (SIGTERM): keep what was measured
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stopped)
    try:
        for row in args.rows:
            if args.budget_s is not None and time.time() - start > args.budget_s:
                print("budget reached", flush=True)
                break
            bench_row(row, args, out, lambda: args.budget_s is not None and time.time() - start > args.budget_s)
            save()
    except KeyboardInterrupt as exc:
        out["stopped"] = f"stopped midway ({exc or 'SIGINT'})"
        save()
        return 130
    finally:
        if saved_env is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = saved_env
    return 0


if __name__ == "__main__":
    sys.exit(main())
