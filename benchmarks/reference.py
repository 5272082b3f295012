"""Forward+backward time of the chunked reference form vs the step-by-step oracle (CPU, float32).

    python -m hqlt.benchmarks.reference [--batch 8 --seq 512 --heads 4 --dim 32 --window 64]

One line per (blend, fw): best-of-N and median milliseconds of each form, and the speed-up of the
chunked form (goal: >= 20x). The speed-up uses the best times: on a shared machine other load only
ever adds time, so the minimum is the most repeatable estimate of a form's own cost. The oracle is
slow, so it gets fewer repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hqlt.kernels import hybrid_memory
from hqlt.kernels.testing import random_inputs

CASES = [("sync", "delta"), ("delayed_stream", "delta"), ("delayed_chunk", "delta"),
         ("sync", "gated_delta"), ("delayed_stream", "gated_delta"), ("delayed_chunk", "gated_delta"),
         ("sync", "linear"), ("delayed_stream", "linear"), ("delayed_chunk", "linear")]


def time_fwd_bwd(inputs, *, backend, blend, fw, window, repeats, warmup=1):
    """Wall times (ms) of `repeats` forward+backward passes, after `warmup` untimed ones."""
    # Dense upstream gradients as in training (`.sum().backward()` would pass stride-0 gradients,
    # which send CPU batched matmuls down a slow per-matrix path).
    grads = [torch.randn_like(inputs["v"]) for _ in range(2)]

    def step():
        outputs = hybrid_memory(inputs["q_kv"], inputs["k_kv"], inputs["q_fw"], inputs["k_fw"],
                                inputs["v"], inputs["beta"], g=inputs["g"], blend=blend,
                                window=window, fw=fw, backend=backend)
        torch.autograd.backward(outputs, grads)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--oracle-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"fwd+bwd, float32, B={args.batch} T={args.seq} H={args.heads} d={args.dim} W={args.window}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms as best / median")
    print(f"{'blend':<16}{'fw':<13}{'chunked ms':>16}{'recurrent ms':>18}{'speed-up':>10}")
    for blend, fw in CASES:
        inputs = random_inputs(args.batch, args.seq, args.heads, args.dim, fw=fw, dtype=torch.float32,
                               requires_grad=True)
        common = dict(blend=blend, fw=fw, window=args.window)
        fast = time_fwd_bwd(inputs, backend="reference", repeats=args.repeats, **common)
        slow = time_fwd_bwd(inputs, backend="recurrent", repeats=args.oracle_repeats, **common)
        print(f"{blend:<16}{fw:<13}{_fmt(fast):>16}{_fmt(slow):>18}{min(slow) / min(fast):>9.1f}x")


def _fmt(times):
    return f"{min(times):.1f} / {statistics.median(times):.1f}"


if __name__ == "__main__":
    main()
