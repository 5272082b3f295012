"""`hqlt bench`: GPU benchmarks.

    hqlt bench kernels [...]   fwd+bwd of each kernel backend vs full-causal SDPA (hqlt.kernels.bench_kernels)
    hqlt bench model [...]     training tokens/s of the 340M models (hqlt.orchestration.bench_model)

Both need a CUDA device. The model benchmark lives in orchestration (it builds models from hqlt.blocks)
and is imported only when that subcommand runs, so hqlt.kernels itself still depends on nothing above it.
"""
from __future__ import annotations


def configure_parser(parser) -> None:
    from . import bench_kernels

    sub = parser.add_subparsers(dest="bench_command", metavar="{kernels,model}")
    k = sub.add_parser("kernels", help="fwd+bwd time of each backend and of SDPA full-causal attention",
                       description=(bench_kernels.__doc__ or "").split("\n\n")[0])
    bench_kernels.add_arguments(k)
    m = sub.add_parser("model", help="training tokens/s of the 340M Transformer / DeltaNet / Sync-HQLT")
    try:
        from hqlt.orchestration import bench_model
        bench_model.add_arguments(m)
    except ImportError:  # pragma: no cover - orchestration is part of the same distribution
        pass


def run(args) -> int:
    which = getattr(args, "bench_command", None)
    if which == "kernels":
        from . import bench_kernels
        return bench_kernels.run(args)
    if which == "model":
        from hqlt.orchestration import bench_model
        return bench_model.run(args)
    print("usage: hqlt bench {kernels,model} [options]  (hqlt bench kernels -h)")
    return 2
