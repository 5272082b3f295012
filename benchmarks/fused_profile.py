"""The fused Sync-HQLT forward and backward, step after step, for a kernel profiler (Nsight Compute) to read.

    python -m hqlt.benchmarks.fused_profile [--shape 1x32768] [--heads 8] [--dim 128] [--window 64]
                                            [--steps 3] [--features-given] [--config '{"scan_features": "stored"}']

One step is what ``hqlt.benchmarks.fused``'s row "fused fwd+bwd (states kept)" launches, without autograd:
``fused_forward`` (bf16, raw q, k ~ N(0, 1), beta = 2 sigmoid(N(0, 1)); the FW features computed in the kernels
unless ``--features-given``) with its residuals kept, then ``fused_backward``. The first steps warm up (Triton
compiles in the first), so a profiler skips them; per step each kernel runs once, which the script prints
(``launches per step``), with the step's time (CUDA events; under a profiler it is the profiler's time, not the
kernel's). ``--config``: overrides of the launch configuration as JSON (``settings.default_config``'s keys).

Under ncu (``benchmarks/gpu_checks.sh OUT fused_profile`` runs this; ``--clock-control none`` leaves the clocks
alone), the last step's launches of the scans and the FW/WY backward:

    ncu --clock-control none --kernel-name regex:'^(scan_kernel|bwd_scan_kernel|fw_bwd_wy_kernel)$' \
        --launch-skip 6 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python -m hqlt.benchmarks.fused_profile --shape 1x32768 --steps 3

(``--launch-skip`` counts the launches that match the name filter: 3 kernels x 2 warm-up steps.)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .kernels import parse_pair


def parse_config(text: str) -> dict:
    """``--config(s)`` values: ``settings.parse_config`` with argparse's error type."""
    from hqlt.kernels.fused.settings import parse_config as parse
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hqlt.benchmarks.fused_profile", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=lambda s: parse_pair(s, example="1x32768", meaning="batch x length"),
                   default=(1, 32768), help="B x T")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps in all; the ones before the last warm up")
    p.add_argument("--features-given", action="store_true", help="pass the FW features in (the backend's path)")
    p.add_argument("--config", type=parse_config, default=None, help="launch-configuration overrides (JSON)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test under TRITON_INTERPRET=1
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps: at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hqlt.benchmarks.fused_profile: needs a CUDA device", file=sys.stderr)
        return 2
    from hqlt.kernels.fused import launch as FL
    from hqlt.kernels.reference import l2_normalize
    from hqlt.kernels.testing import watch_launches

    (B, T), H, d, W = args.shape, args.heads, args.dim, args.window
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32   # the interpreter has no bf16 dot
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=args.device, dtype=dtype)

    q, k, v, do_kv, do_fw = (randn(B, T, H, d) for _ in range(5))
    beta = (2 * torch.sigmoid(torch.randn(B, T, H, generator=gen))).to(device=args.device)
    feats = {}
    if args.features_given:
        feats = {"q_fw": l2_normalize(torch.nn.functional.silu(q.float())).to(dtype),
                 "k_fw": l2_normalize(torch.nn.functional.silu(k.float())).to(dtype)}
    kw = dict(window=W, kv_scale=d ** -0.5, fw_scale=d ** -0.5, config=args.config, **feats)
    counts: dict[str, int] = {}   # launches per kernel name (the profiler's --launch-skip needs them)

    def count(name, _args, _kwargs):
        counts[name] = counts.get(name, 0) + 1

    print(f"# {torch.cuda.get_device_name(0) if args.device == 'cuda' else args.device}: B={B} T={T} H={H} d={d} "
          f"W={W} {str(dtype).removeprefix('torch.')}, features {'given' if feats else 'in the kernels'}, "
          f"config {json.dumps(args.config or {})}", flush=True)
    for step in range(args.steps):
        counts.clear()
        with watch_launches(FL, count):
            if args.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            o_kv, _, aux = FL.fused_forward(q, k, v, beta, return_aux=True, **kw)
            FL.fused_backward(q, k, v, beta, o_kv, aux["lse"], do_kv, do_fw, w=aux["w"], v_new=aux["v_new"],
                              states=aux["states"], t=aux.get("t"), u=aux.get("u"), **kw)
            if args.device == "cuda":
                end.record()
                torch.cuda.synchronize()
                took = f"{start.elapsed_time(end):.3f} ms"
            else:
                took = "(CPU interpreter)"
        if step == 0:
            print("launches per step: " + ", ".join(f"{n} {c}" for n, c in counts.items()), flush=True)
        print(f"step {step + 1}/{args.steps}: {took}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
