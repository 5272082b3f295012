"""hqlt.benchmarks — the benchmarks, outside the library packages (as fla keeps them).

    hqlt bench kernels | model                 (``cli``: GPU benchmarks behind the ``hqlt bench`` command)
    python -m hqlt.benchmarks.kernels          fwd+bwd of each kernel backend vs SDPA; writes the auto table
    python -m hqlt.benchmarks.fused            the fused Triton kernels vs the fla composition and SDPA
    python -m hqlt.benchmarks.reference        chunked reference vs the step-by-step oracle (CPU)
    python -m hqlt.benchmarks.model            training tokens/s of the 340M models (GPU)
    python -m hqlt.benchmarks.model_step       one training step of a small HybridLM per layer kind (CPU)

The top layer: it may import any hqlt package, and none imports it. Results that the library reads at
run time (``kernels/results/auto_table.json``) are written there by path.
"""
