"""Shared memory of the fused kernels, measured by compiling them for sm_90 (no GPU needed):
``python -m hqlt.kernels.fused.resources [--arch 90] [--out PATH] [--fit]``.

For every configuration ``settings.default_config`` can produce (inputs of 2 or 4 bytes, features in the
kernel or given, Dk and Dv in {16, 32, 64, 128} — other head dims use the next power-of-two tile — and each
scan value block the SM-count rule may pick), each kernel is compiled with Triton's own ptxas for
``GPUTarget("cuda", arch, 32)`` and the bytes of shared memory it allocates (``metadata.shared``, what the
launch needs per program) are written to ``kernels/results/fused_smem_sm90.json`` (resumable: entries
already there are kept). ``--fit`` prints the upper-envelope coefficients for ``settings.SMEM_ENVELOPE``.
Compiling every configuration takes about an hour on two cores (float32 kernels take the longest).

The numbers are exact for the compiler that made them (triton 3.6 on the H200 reproduced the 245760 B of
the float32 d = 128 reverse scan that failed there); a new Triton version should re-run this module.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .settings import (BACKWARD_KERNELS, FORWARD_KERNELS, SMEM_TABLE, _key, default_config, kernel_tiles, pow2,
                       smem_terms)

HEAD_DIMS = (16, 32, 64, 128)
F32_POINTERS = {  # pointers whose buffers are float32 whatever the input dtype (launch.py)
    "wy": ("beta_ptr",), "scan": (), "out": ("lse_ptr",),
    "kv_dq": ("lse_ptr", "delta_ptr", "dq_ptr"), "kv_dkdv": ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr"),
    "bwd_scan": ("dvn_ptr",),
    "fw_bwd": ("dvn_ptr", "dqkv_ptr", "dkkv_ptr", "dvkv_ptr", "dbeta_ptr", "beta_ptr"),
}


def configurations():
    """(kernel, elem_bytes, featurize, BK, BV, warps, num_stages) of every default configuration."""
    seen = set()
    for elem in (2, 4):
        for feat in (False, True):
            for dk in HEAD_DIMS:
                for dv in HEAD_DIMS:
                    for sms in (1, 2, 3, 4, 8, 16, 1 << 20):   # B*H = 1: every value-block width of the scans
                        cfg = default_config(1, 1, dk, dv, sms)
                        for kernel, (bv, warps) in kernel_tiles(cfg).items():
                            stages = 3 if kernel == "wy" else cfg["num_stages"]
                            key = _key(kernel, elem, feat, cfg["BK"], bv, warps)
                            if key not in seen:
                                seen.add(key)
                                yield key, (kernel, elem, feat, cfg["BK"], bv, warps, stages)


def compile_shared(kernel: str, elem: int, feat: bool, BK: int, BV: int, warps: int, stages: int,
                   arch: int = 90) -> int:
    """Bytes of shared memory Triton allocates for one kernel compiled for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import bwd, fwd
    fn = {"wy": fwd.wy_kernel, "scan": fwd.scan_kernel, "out": fwd.out_kernel, "kv_dq": bwd.kv_bwd_dq_kernel,
          "kv_dkdv": bwd.kv_bwd_dkdv_kernel, "bwd_scan": bwd.bwd_scan_kernel, "fw_bwd": bwd.fw_bwd_kernel}[kernel]
    dt = "fp16" if elem == 2 else "fp32"
    consts = {"BK": BK, ("BVW" if kernel in ("wy", "kv_dq", "kv_dkdv") else "BV"): BV}
    if kernel not in ("kv_dq", "kv_dkdv"):
        consts.update(FEATURIZE=feat, EPS=1e-6)
    if kernel == "out":
        consts["STORE_LSE"] = True
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in F32_POINTERS[kernel] else "*" + dt
        elif name in ("kv_scale", "fw_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return int(compiled.metadata.shared)


def fit_envelope(table: dict[str, int]) -> dict[tuple[str, bool], tuple[float, ...]]:
    """Per (kernel, features in kernel): non-negative coefficients of ``settings.smem_terms`` whose sum is
    >= every measured entry, with the least total over the entries (a linear program)."""
    import numpy as np
    from scipy.optimize import linprog

    groups: dict[tuple[str, bool], list] = {}
    for key, val in table.items():
        kernel, e, feat, bk, bv, _ = key.split("/")
        terms = smem_terms(int(e[1:]), int(bk[2:]), int(bv[2:]))
        for f in ((False, True) if feat == "-" else (feat == "F",)):
            groups.setdefault((kernel, f), []).append((terms, val))
    out = {}
    for group, rows in sorted(groups.items()):
        X = np.array([r[0] for r in rows], dtype=float)
        y = np.array([r[1] for r in rows], dtype=float)
        res = linprog(X.sum(0), A_ub=-X, b_ub=-y, bounds=[(0, None)] * X.shape[1], method="highs")
        out[group] = tuple(math.ceil(float(c) * 1000 - 1e-6) / 1000 for c in res.x)   # rounded up: still a bound
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hqlt.kernels.fused.resources", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", type=Path, default=SMEM_TABLE)
    p.add_argument("--fit", action="store_true", help="print the envelope coefficients of the table")
    args = p.parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    table = data.get("bytes", {})
    if not args.fit:
        import triton
        todo = [(k, c) for k, c in configurations() if k not in table]
        print(f"{len(todo)} configurations to compile for sm_{args.arch}", flush=True)
        for i, (key, conf) in enumerate(todo):
            t = time.time()
            table[key] = compile_shared(*conf, arch=args.arch)
            print(f"[{i + 1}/{len(todo)}] {key}: {table[key]} B ({time.time() - t:.0f} s)", flush=True)
            data = {"arch": f"sm_{args.arch}", "triton": triton.__version__,
                    "source": "python -m hqlt.kernels.fused.resources (triton.compile for GPUTarget('cuda', "
                              f"{args.arch}, 32), metadata.shared)",
                    "key": "kernel/e<input bytes>/<F: features in kernel, g: given, -: either>/BK/BV/w<warps>",
                    "bytes": dict(sorted(table.items()))}
            args.out.write_text(json.dumps(data, indent=1) + "\n")
    for group, coeffs in fit_envelope(table).items():
        print(f"    {group!r}: {coeffs},")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["configurations", "compile_shared", "fit_envelope", "FORWARD_KERNELS", "BACKWARD_KERNELS", "pow2"]
