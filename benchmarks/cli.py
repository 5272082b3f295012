"""`hqlt bench`: GPU benchmarks.

    hqlt bench kernels [...]   fwd+bwd of each kernel backend vs full-causal SDPA (hqlt.benchmarks.kernels)
    hqlt bench model [...]     training tokens/s of the 340M models (hqlt.benchmarks.model)

Both need a CUDA device. The benchmarks sit above every library package (the model benchmark builds
models from hqlt.blocks); each is imported only when its subcommand is set up or runs.
"""
from __future__ import annotations


def configure_parser(parser) -> None:
    from . import kernels as bench_kernels
    from . import model as bench_model

    sub = parser.add_subparsers(dest="bench_command", metavar="{kernels,model}")
    k = sub.add_parser("kernels", help="fwd+bwd time of each backend and of SDPA full-causal attention",
                       description=(bench_kernels.__doc__ or "").split("\n\n")[0])
    bench_kernels.add_arguments(k)
    m = sub.add_parser("model", help="training tokens/s of the 340M Transformer / DeltaNet / Sync-HQLT")
    bench_model.add_arguments(m)


def run(args) -> int:
    which = getattr(args, "bench_command", None)
    if which == "kernels":
        from . import kernels as bench_kernels
        return bench_kernels.run(args)
    if which == "model":
        from . import model as bench_model
        return bench_model.run(args)
    print("usage: hqlt bench {kernels,model} [options]  (hqlt bench kernels -h)")
    return 2
