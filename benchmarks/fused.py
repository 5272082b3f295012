"""Benchmark of the fused Synchronous-HQLT forward and backward (FUSED_NOTES.md steps 2-3) against the fla composition and SDPA.

    python -m hqlt.benchmarks.fused [--out FILE.json] [--shapes 8x2048 1x32768] [--heads 8] [--dim 128]
                                    [--window 64] [--warmup 5] [--repeats 20] [--no-sweep | --sweep-first N
                                    | --configs JSON... --bwd-configs JSON...]

Per (B, T), bf16, H heads of dim d, window W, raw q, k, v ~ N(0, 1), beta = 2 sigmoid(N(0, 1)):

* fused fwd           ``fused_forward`` (FW features computed in the kernel), no autograd;
* fused fwd (given features)  the backend's path: q_fw, k_fw passed in (``hybrid_memory(backend="fused")``);
* fused stages        the three launches timed cumulatively (wy; wy+scan; all), differences = per kernel;
* fused fwd+bwd       ``sync_hybrid_memory`` + ``torch.autograd.grad`` for q, k, v, beta with the fused
                      backward (FUSED_NOTES.md step 3): chunk states kept from the forward (default), or
                      recomputed in the backward (``save_states=False``);
* fused bwd only      ``fused_backward`` alone on a saved forward (states kept), no autograd;
* [single] / [split]  both FW-backward variants (``HQLT_FUSED_FW_BWD``, FUSED_NOTES.md "Round 3") in this
                      process: fwd+bwd, the backward alone, its launches timed cumulatively (differences =
                      per kernel), and the split gradients vs the single ones;
* fused fwd+bwd (recompute bwd)  the old backward: fused fwd + fla fwd+bwd (``fused_backward=False``);
* fla fwd, fwd+bwd    the composition as a model runs it: l2(silu(q)), l2(silu(k)) in torch, then
                      ``hybrid_memory(backend="fla")`` (fla ``parallel_attn`` window + ``chunk_delta_rule``);
* SDPA fwd, fwd+bwd   ``F.scaled_dot_product_attention(is_causal=True)`` over the same tokens (baseline).

The gradients of the fused backward are compared with the fla composition's (relative RMS, bf16 both).
Times: median of ``--repeats`` CUDA-event timings after ``--warmup`` untimed calls (warmup also absorbs
Triton compilation and fla autotuning). The max |fused - fla| of both outputs (and the relative RMS) is
printed per shape. ``--no-sweep`` skips the sweep of alternative fused block/warp configurations. A
failing entry prints its error and the run goes on. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from .fused_profile import parse_config
from .kernels import _version, cuda_time_ms, parse_pair

SWEEP = (  # overrides of hqlt.kernels.fused.launch.default_config, one group at a time
    # first: the round-6 scan (featurising its keys itself, 8 warps at d 128) against the default, which loads the
    # features the wy kernel stored (FUSED_NOTES.md "Round 7"), then the 4-warp scan at d <= 64 and the 3-stage
    # scan of d 128 at d <= 64 (at d 128 it repeats the default: the noise)
    {"scan_features": "kernel", "scan_warps": 8}, {"scan_warps": 4}, {"scan_stages": 3},
    {"scan_bv": 16}, {"scan_bv": 32}, {"scan_bv": 64, "scan_warps": 8}, {"scan_warps": 8},
    {"out_bv": 128, "out_warps": 8}, {"out_warps": 4}, {"out_warps": 8}, {"wy_warps": 4}, {"wy_warps": 8},
    {"num_stages": 1}, {"num_stages": 3}, {"scan_stages": 2}, {"scan_stages": 4},
)
BWD_SWEEP = (  # the same for the fused backward (timed alone on a saved forward); first the reverse scan reading
    # fw_scale Qf^T dO left by fw_bwd_dq (opt-in, settings.BWD_SCAN_QDO; alone and with its loop 3 stages deep), T from
    # wy_t_kernel (opt-in, settings.FW_BWD_T; alone and with the former), then
    # the FW/WY backward's tiles of round 6 against the default (FUSED_NOTES.md "Round 7"), the round-7 tiles at d <= 64
    {"bwd_scan_qdo": "pre"}, {"bwd_scan_qdo": "pre", "bwd_scan_stages": 3},
    {"fw_bwd_t": "pre"}, {"fw_bwd_t": "pre", "fw_bwd_wy_warps": 8}, {"fw_bwd_t": "pre", "bwd_scan_qdo": "pre"},
    {"fw_bwd_split_bv": 16, "fw_bwd_wy_warps": 8}, {"fw_bwd_split_bv": 32, "fw_bwd_wy_warps": 4},
    {"fw_bwd_wy_warps": 4},
    {"kv_bwd_warps": 4, "bwd_scan_warps": 4}, {"kv_bwd_warps": 8, "bwd_scan_warps": 8}, {"bwd_scan_stages": 3},
    {"bwd_scan_stages": 4},
    {"bwd_scan_bv": 16}, {"bwd_scan_bv": 32}, {"bwd_scan_bv": 64, "bwd_scan_warps": 8}, {"bwd_scan_warps": 4},
    {"fw_bwd_bv": 16}, {"fw_bwd_bv": 64}, {"fw_bwd_warps": 4}, {"fw_bwd_warps": 8}, {"kv_bwd_warps": 4},
    {"kv_bwd_warps": 8}, {"num_stages": 1}, {"num_stages": 3},
    {"fw_bwd": "single"}, {"fw_bwd_dq_warps": 4}, {"fw_bwd_dk_warps": 4},
    # the KV backward's 128-row tiles (FUSED_NOTES.md "Round 12"; they pay off, if at all, at long windows: --window)
    {"kv_dq_rows": 128}, {"kv_dkdv_rows": 128}, {"kv_dq_rows": 128, "kv_dkdv_rows": 128},
)


def _time(fn, args) -> dict:
    try:
        if args.device != "cuda":   # CPU smoke test (TRITON_INTERPRET=1): one timed call, wall clock
            fn()
            t = time.perf_counter()
            fn()
            return {"ms": (time.perf_counter() - t) * 1e3}
        return {"ms": cuda_time_ms(fn, args.warmup, args.repeats)}
    except Exception as exc:  # a backend error: report it and go on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"ms": None, **_error(exc)}


def _error(exc: Exception) -> dict:
    """The error's first line and where it was raised (the innermost frames: an error such as "ValueError:
    vector::reserve", seen on the H200 in the autograd path only, says nothing about its origin otherwise)."""
    msg = str(exc).splitlines()[0][:300] if str(exc) else ""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return {"error": f"{type(exc).__name__}: {msg}",
            "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]}


def _show(label: str, r: dict, extra: str = "") -> None:
    if r.get("ms") is None:
        where = f" (at {' <- '.join(reversed(r['where']))})" if r.get("where") else ""
        print(f"  {label:<44} failed: {r.get('error')}{where}", flush=True)
    else:
        print(f"  {label:<44} {r['ms']:9.3f} ms {extra}", flush=True)


def _grad_step(forward, leaves, grads):
    def step():
        outs = forward()
        torch.autograd.grad(outs, leaves, grads[:len(outs)], allow_unused=True)
    return step


def bench_shape(B: int, T: int, args, row: dict) -> dict:
    """Fill ``row`` as each timing ends (a run stopped midway keeps what it measured) and return it."""
    import torch.nn.functional as F

    from hqlt.kernels import available_backends, hybrid_memory
    from hqlt.kernels.fused import autograd as FA
    from hqlt.kernels.fused import launch as FL
    from hqlt.kernels.fused.settings import forward_keeps_u, forward_stores_t

    H, d, W = args.heads, args.dim, args.window
    dev = torch.device(args.device)
    scale = d ** -0.5
    gen = torch.Generator(device=dev).manual_seed(T + B)

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32).to(torch.bfloat16)

    q, k, v = randn(B, T, H, d), randn(B, T, H, d), randn(B, T, H, d)
    beta = (2 * torch.sigmoid(randn(B, T, H).float())).to(torch.bfloat16)
    grads = [randn(B, T, H, d), randn(B, T, H, d)]
    leaves = [x.detach().requires_grad_() for x in (q, k, v, beta)]
    row.update({"batch": B, "seq_len": T, "heads": H, "head_dim": d, "window": W,
                "config": FL.default_config(B, H, d, d, dev)})
    print(f"B={B} T={T} H={H} d={d} W={W} bf16; fused config {row['config']}", flush=True)

    def fused_fwd(config=None, stages=3):
        return lambda: FL.fused_forward(q, k, v, beta, window=W, kv_scale=scale, fw_scale=scale, config=config,
                                        stages=stages)

    row["fused_fwd"] = _time(fused_fwd(), args)
    _show("fused fwd (features in kernel)", row["fused_fwd"])
    qf, kf = FA.featurize(q).to(torch.bfloat16), FA.featurize(k).to(torch.bfloat16)
    row["fused_fwd_given_features"] = _time(
        lambda: FL.fused_forward(q, k, v, beta, window=W, kv_scale=scale, fw_scale=scale, q_fw=qf, k_fw=kf), args)
    _show("fused fwd (features given)", row["fused_fwd_given_features"])
    stages = {}
    for n, name in ((1, "wy"), (2, "wy+scan"), (3, "wy+scan+out")):
        stages[name] = _time(fused_fwd(stages=n), args).get("ms")
    row["fused_stages_cumulative_ms"] = stages
    if all(stages.values()):
        print(f"  {'fused per kernel: wy / scan / out':<44} {stages['wy']:.3f} / "
              f"{stages['wy+scan'] - stages['wy']:.3f} / {stages['wy+scan+out'] - stages['wy+scan']:.3f} ms",
              flush=True)

    fla_ok = available_backends().get("fla", False)
    # the old backward recomputes with the fla composition (the backend's choice on CUDA), else the reference
    unfused = functools.partial(hybrid_memory, backend="fla") if fla_ok and dev.type == "cuda" else None

    def fused_fb(**kw):
        return _grad_step(lambda: FA.sync_hybrid_memory(*leaves, window=W, kv_scale=scale, fw_scale=scale,
                                                        unfused=unfused, **kw), leaves, grads)

    row["fused_fwd_bwd"] = _time(fused_fb(fused_backward=True, save_states=True), args)
    _show("fused fwd+bwd (fused bwd, states kept)", row["fused_fwd_bwd"])
    # as a layer calls it (FW features computed outside, both q/k pairs differentiated): the kernels alone, then
    # through hybrid_memory's checks and the backend "fused" (what `hqlt bench kernels` and the auto table time)
    fl = [x.detach().requires_grad_() for x in (q, k, qf, kf, v, beta)]
    lq, lk, lqf, lkf, lv, lbeta = fl
    row["fused_fwd_bwd_given_features"] = _time(_grad_step(lambda: FA.sync_hybrid_memory(
        lq, lk, lv, lbeta, q_fw=lqf, k_fw=lkf, window=W, kv_scale=scale, fw_scale=scale), fl, grads), args)
    _show("fused fwd+bwd (features given)", row["fused_fwd_bwd_given_features"])
    row["backend_fused_fwd_bwd"] = _time(_grad_step(lambda: hybrid_memory(
        *fl, blend="sync", window=W, fw="delta", kv_scale=scale, fw_scale=scale, backend="fused"), fl, grads), args)
    _show("backend 'fused' fwd+bwd (hybrid_memory)", row["backend_fused_fwd_bwd"])
    del fl, lq, lk, lqf, lkf, lv, lbeta
    row["fused_fwd_bwd_recompute_states"] = _time(fused_fb(fused_backward=True, save_states=False), args)
    _show("fused fwd+bwd (fused bwd, states recomputed)", row["fused_fwd_bwd_recompute_states"])
    with torch.no_grad():
        o_kv, _, aux = FL.fused_forward(q, k, v, beta, window=W, kv_scale=scale, fw_scale=scale, return_aux=True)

    def fused_bwd(config=None):
        a = aux   # an override whose forward keeps T ("fw_bwd_t": "fwd") or U ("fw_bwd_u": "fwd") gets the
        # residuals of such a forward
        full = {**row["config"], **(config or {})}
        if config and ((forward_stores_t(full) and "t" not in aux) or (forward_keeps_u(full) and "u" not in aux)):
            with torch.no_grad():
                a = FL.fused_forward(q, k, v, beta, window=W, kv_scale=scale, fw_scale=scale, config=config,
                                     return_aux=True)[2]
        return lambda: FL.fused_backward(q, k, v, beta, o_kv, a["lse"], grads[0], grads[1], window=W,
                                         kv_scale=scale, fw_scale=scale, w=a["w"], v_new=a["v_new"],
                                         states=a["states"], t=a.get("t"), u=a.get("u"), config=config)

    row["fused_bwd_only"] = _time(fused_bwd(), args)
    _show("fused bwd only (states kept)", row["fused_bwd_only"])
    row["fw_bwd_variants"] = _fw_bwd_variants(fused_fb, fused_bwd, FL, q, k, v, beta, o_kv, aux, grads, W, scale,
                                              args)
    row["fused_fwd_bwd_unfused_bwd"] = _time(fused_fb(fused_backward=False), args)
    _show("fused fwd+bwd (old bwd: fla recompute)", row["fused_fwd_bwd_unfused_bwd"])

    def fla_forward(qq, kk, vv, bb):
        qf_, kf_ = FA.featurize(qq).to(torch.bfloat16), FA.featurize(kk).to(torch.bfloat16)
        return hybrid_memory(qq, kk, qf_, kf_, vv, bb, blend="sync", window=W, fw="delta", kv_scale=scale,
                             fw_scale=scale, backend="fla")

    if fla_ok:
        with torch.no_grad():
            row["fla_fwd"] = _time(lambda: fla_forward(q, k, v, beta), args)
        _show("fla composition fwd (incl. torch featurise)", row["fla_fwd"])
        row["fla_fwd_bwd"] = _time(_grad_step(lambda: fla_forward(*leaves), leaves, grads), args)
        _show("fla composition fwd+bwd", row["fla_fwd_bwd"])
    else:
        row["fla_fwd"] = row["fla_fwd_bwd"] = {"ms": None, "error": "fla backend not available"}
        print("  fla composition: not available (pip install flash-linear-attention)", flush=True)

    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with torch.no_grad():
        row["sdpa_fwd"] = _time(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), args)
    _show("SDPA full causal fwd", row["sdpa_fwd"])
    sl = [x.detach().requires_grad_() for x in (qh, kh, vh)]
    row["sdpa_fwd_bwd"] = _time(_grad_step(lambda: (F.scaled_dot_product_attention(*sl, is_causal=True),),
                                           sl, [grads[0].transpose(1, 2).contiguous()]), args)
    _show("SDPA full causal fwd+bwd", row["sdpa_fwd_bwd"])
    del qh, kh, vh, sl

    # accuracy in this run: fused vs fla (both bf16), and the finite check
    try:
        with torch.no_grad():
            o = FL.fused_forward(q, k, v, beta, window=W, kv_scale=scale, fw_scale=scale, poison=True)
            err = {"fused_finite": bool(all(torch.isfinite(x).all() for x in o))}
            if fla_ok:
                o_fla = fla_forward(q, k, v, beta)
                for name, a, b in zip(("o_kv", "o_fw"), o, o_fla):
                    a, b = a.float(), b.float()
                    err[f"{name}_max_abs"] = (a - b).abs().max().item()
                    err[f"{name}_max_abs_ref"] = b.abs().max().item()
                    err[f"{name}_rel_rms"] = ((a - b).norm() / b.norm()).item()
        if fla_ok:   # gradients: fused backward vs the fla composition's autograd
            g_f = torch.autograd.grad(FA.sync_hybrid_memory(*leaves, window=W, kv_scale=scale, fw_scale=scale,
                                                            fused_backward=True), leaves, grads)
            g_l = torch.autograd.grad(fla_forward(*leaves), leaves, grads)
            for name, a, b in zip(("dq", "dk", "dv", "dbeta"), g_f, g_l):
                a, b = a.float(), b.float()
                err[f"{name}_rel_rms"] = ((a - b).norm() / b.norm()).item()
                err[f"{name}_finite"] = bool(torch.isfinite(a).all())
    except Exception as exc:
        err = _error(exc)
    row["fused_vs_fla"] = err
    print(f"  fused vs fla: {json.dumps(err)}", flush=True)

    if args.sweep:
        n = args.sweep_first
        listed = args.configs is not None or args.bwd_configs is not None
        fwd_list = (args.configs or []) if listed else SWEEP[:n]
        bwd_list = (args.bwd_configs or []) if listed else BWD_SWEEP[:n]
        _config_sweep("sweep", fwd_list, fused_fwd, row["fused_fwd"], args, row.setdefault("fused_fwd_sweep", []))
        _config_sweep("bwd sweep", bwd_list, fused_bwd, row["fused_bwd_only"], args,
                      row.setdefault("fused_bwd_sweep", []))
    del q, k, v, beta, leaves, grads, o_kv, aux
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def _fw_bwd_env(variant: str):
    """HQLT_FUSED_FW_BWD set to ``variant`` for the calls inside (read at every launch)."""
    old = os.environ.get("HQLT_FUSED_FW_BWD")
    os.environ["HQLT_FUSED_FW_BWD"] = variant
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HQLT_FUSED_FW_BWD", None)
        else:
            os.environ["HQLT_FUSED_FW_BWD"] = old


def _fw_bwd_variants(fused_fb, fused_bwd, FL, q, k, v, beta, o_kv, aux, grads, W, scale, args) -> dict:
    """Both FW-backward variants (HQLT_FUSED_FW_BWD=single|split, FUSED_NOTES.md "Round 3") side by side in
    this process: fwd+bwd, the backward alone, its launches timed cumulatively (differences = per kernel),
    and the split variant's gradients against the single one's (relative RMS, bf16 both)."""
    out = {}
    for variant in VARIANTS:
        r = out[variant] = {}
        with _fw_bwd_env(variant):
            r["fwd_bwd"] = _time(fused_fb(fused_backward=True, save_states=True), args)
            _show(f"[{variant}] fused fwd+bwd (states kept)", r["fwd_bwd"])
        r["bwd_only"] = _time(fused_bwd(config={"fw_bwd": variant}), args)
        _show(f"[{variant}] fused bwd only", r["bwd_only"])
        names = VARIANT_KERNELS[variant]
        B, _, H, dk = q.shape
        t_by = FL.default_config(B, H, dk, v.shape[-1], q.device)["fw_bwd_t"]
        if variant == "split" and (t_by == "pre" or (t_by == "fwd" and "t" not in aux)):
            names = names[:4] + ("wy_t",) + names[4:]   # launched before fw_bwd_wy (launch.fused_backward)
        cumulative = []
        for n in range(1, len(names) + 1):
            cumulative.append(_time(lambda n=n: FL.fused_backward(
                q, k, v, beta, o_kv, aux["lse"], grads[0], grads[1], window=W, kv_scale=scale, fw_scale=scale,
                w=aux["w"], v_new=aux["v_new"], states=aux["states"], t=aux.get("t"), u=aux.get("u"),
                config={"fw_bwd": variant}, stages=n),
                args).get("ms"))
        r["bwd_stages_cumulative_ms"] = dict(zip(names, cumulative))
        if all(cumulative):
            per = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
            r["bwd_per_kernel_ms"] = dict(zip(names, per))
            print(f"  [{variant}] per kernel: " + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, per)) + " ms",
                  flush=True)
    try:
        with torch.no_grad():
            g = {variant: FL.fused_backward(q, k, v, beta, o_kv, aux["lse"], grads[0], grads[1], window=W,
                                            kv_scale=scale, fw_scale=scale, w=aux["w"], v_new=aux["v_new"],
                                            states=aux["states"], t=aux.get("t"), u=aux.get("u"),
                                            config={"fw_bwd": variant})
                 for variant in VARIANTS}
        err = {}
        for name, a, b in zip(("dq", "dk", "dv", "dbeta"), g["split"], g["single"]):
            a, b = a.float(), b.float()
            err[f"{name}_rel_rms"] = ((a - b).norm() / b.norm()).item()
            err[f"{name}_finite"] = bool(torch.isfinite(a).all())
    except Exception as exc:
        err = _error(exc)
    out["split_vs_single"] = err
    print(f"  split vs single gradients: {json.dumps(err)}", flush=True)
    return out


def _config_sweep(label: str, overrides, make, default: dict, args, sweep: list) -> list[dict]:
    """Time make(config=override) for each override, appending each to ``sweep`` as it ends; print each and
    the best against the default."""
    for override in overrides:
        r = _time(make(config=override), args)
        sweep.append({"override": override, **r})
        _show(f"{label} {json.dumps(override)}", r)
    timed = [s for s in sweep if s.get("ms")]
    if timed:
        best = min(timed, key=lambda s: s["ms"])
        print(f"  best {label} entry: {json.dumps(best['override'])} {best['ms']:.3f} ms "
              f"(default {default.get('ms')})", flush=True)
    return sweep


VARIANTS = ("single", "split")
VARIANT_KERNELS = {"single": ("kv_dq", "kv_dkdv", "bwd_scan", "fw_bwd"),
                   "split": ("kv_dq", "kv_dkdv", "fw_bwd_dq", "bwd_scan", "fw_bwd_wy", "fw_bwd_dk")}
parse_bt = functools.partial(parse_pair, example="8x2048", meaning="batch x length")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hqlt.benchmarks.fused", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_bt, nargs="+", default=[(8, 2048), (1, 32768)], help="B x T")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the fused config sweep")
    p.add_argument("--sweep-first", type=int, default=None, metavar="N",
                   help="time only the first N entries of each config sweep (the combined ones come first)")
    p.add_argument("--configs", type=parse_config, nargs="+", default=None, metavar="JSON",
                   help="time these launch-config overrides of the forward instead of its built-in sweep, e.g. "
                        "'{\"scan_warps\": 8}' (with --bwd-configs or alone: then only the lists given are timed)")
    p.add_argument("--bwd-configs", type=parse_config, nargs="+", default=None, metavar="JSON",
                   help="the same for the backward's sweep, e.g. '{\"fw_bwd_t\": \"pre\"}'")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test under TRITON_INTERPRET=1
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hqlt.benchmarks.fused: needs a CUDA device", file=sys.stderr)
        return 2
    meta = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "torch": torch.__version__, "triton": _version("triton"),
            "fla": _version("fla-core"), "dtype": "bfloat16", "warmup": args.warmup, "repeats": args.repeats,
            "command": "python -m hqlt.benchmarks.fused " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "HQLT_FUSED_CONFIG": os.environ.get("HQLT_FUSED_CONFIG", ""),
            "note": "fused fwd+bwd uses the fused backward (FUSED_NOTES.md step 3) unless labelled 'old bwd'"}
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}; "
          f"ms = median of {args.repeats} after {args.warmup} warmup", flush=True)
    rows = []

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**meta, "results": rows}, indent=1))

    def stopped(signum, _frame):   # `timeout` (SIGTERM) or Ctrl-C: write what was measured, marked as stopped
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stopped)
    for B, T in args.shapes:
        row: dict = {"batch": B, "seq_len": T}
        rows.append(row)
        try:
            bench_shape(B, T, args, row)
        except KeyboardInterrupt as exc:
            row["stopped"] = f"stopped midway ({exc or 'SIGINT'}): the keys present were measured"
            save()
            print(f"B={B} T={T}: {row['stopped']}", file=sys.stderr, flush=True)
            return 130
        except Exception as exc:  # e.g. OOM while building inputs: report and go on
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            print(f"B={B} T={T}: failed: {row['error']}", flush=True)
        save()
    if args.out:
        print(f"# results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
