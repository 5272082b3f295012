"""Shared memory (and registers, spills) of the fused kernels, measured by compiling them for sm_90 (no GPU
needed): ``python -m hqlt.kernels.fused.resources [--arch 90] [--out PATH] [--fit]``; with ``--spills``
[--dims 64 128] [--fw-bwd single|split|both] [--batch 8 --heads 8 --sms 132] [--jobs 2]: a table of
registers, spill bytes (ptxas -v: stack frame, spill stores / loads per thread) and shared memory of every
kernel the launchers run at those shapes in bf16 (``print_spills``).

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
import re
import sys
import time
from pathlib import Path

from .settings import (BACKWARD_KERNELS, FORWARD_KERNELS, KEPT_U_WY, KV_BWD_FUSED_WARPS, SMEM_TABLE,
                       SPLIT_FW_BWD_KERNELS, WIDE_KV, _key, default_config, fw_bwd_dk_regs, kernel_stages,
                       kernel_tiles_all, pow2, smem_terms)

HEAD_DIMS = (16, 32, 64, 128)
DIVISIBLE_INTS = ("T", "NC", "L", "DK", "DV", "W")   # compile_kernel: integer arguments specialised as divisible by 16
F32_POINTERS = {  # pointers whose buffers are float32 whatever the input dtype (launch.py)
    "wy": ("beta_ptr", "t_ptr"), "scan": ("carry_ptr",), "out": ("lse_ptr",),
    "kv_dq": ("lse_ptr", "delta_ptr", "dq_ptr"), "kv_dkdv": ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr"),
    "kv_bwd": ("lse_ptr", "dk_ptr", "dv_ptr"),
    "bwd_scan": ("dvn_ptr", "carry_ptr"), "bwd_scan_phi": ("phi_ptr",), "bwd_scan_carry": ("phi_ptr", "carry_ptr"),
    "fw_bwd": ("dvn_ptr", "dqkv_ptr", "dkkv_ptr", "dvkv_ptr", "dbeta_ptr", "beta_ptr"),
    "fw_bwd_dq": ("dvn_ptr", "dqkv_ptr"),
    "fw_bwd_wy": ("dvn_ptr", "dvkv_ptr", "dkw_ptr", "dbeta_ptr", "beta_ptr", "t_ptr"),
    "wy_t": ("beta_ptr", "t_ptr"),
    "fw_bwd_dk": ("dkw_ptr", "dkkv_ptr"),
}


SPLIT_SWEEP = ((64, 128), (16, 32, 64), (4, 8))   # BK, BV, warps of the split FW backward's kernels compiled beside
# their defaults, so that the envelope fitted to the table bounds a benchmark's tile too; fw_bwd_wy also as it runs
# with the forward's U (settings.KEPT_U_WY: every default tile of it is in this sweep)


def configurations():
    """(kernel, elem_bytes, featurize, BK, BV, warps, num_stages) of every default configuration (every kernel a
    launcher runs, ``kernel_tiles_all``), and the split FW backward's kernels (with ``fw_bwd_wy`` loading the forward's
    U, ``settings.KEPT_U_WY``) over ``SPLIT_SWEEP``."""
    seen = set()

    def new(kernel, elem, feat, bk, bv, warps, stages):
        key = _key(kernel, elem, feat, bk, bv, warps, stages)
        if key not in seen:
            seen.add(key)
            return key, (kernel, elem, feat, bk, bv, warps, stages)
        return None

    for elem in (2, 4):
        for feat in (False, True):
            for dk in HEAD_DIMS:
                for dv in HEAD_DIMS:
                    for sms in (1, 2, 3, 4, 8, 16, 1 << 20):   # B*H = 1: every value-block width of the scans
                        cfg = default_config(1, 1, dk, dv, sms, elem)
                        for kernel, (bv, warps) in kernel_tiles_all(cfg).items():
                            item = new(kernel, elem, feat, cfg["BK"], bv, warps, kernel_stages(cfg, kernel))
                            if item:
                                yield item
                if elem == 2:   # the 128-row KV backward (2-byte inputs only, 8 warps: launch.fused_backward)
                    for dk in HEAD_DIMS:
                        cfg = default_config(1, 1, dk, dk, 1, elem)
                        for wide, kernel in WIDE_KV.items():
                            item = new(wide, elem, feat, cfg["BK"], cfg["BVW"], 8, kernel_stages(cfg, kernel))
                            if item:
                                yield item
            for kernel in SPLIT_FW_BWD_KERNELS + (KEPT_U_WY,):
                for bk in SPLIT_SWEEP[0]:
                    for bv in SPLIT_SWEEP[1]:
                        for warps in SPLIT_SWEEP[2]:
                            item = new(kernel, elem, feat, bk, bv, warps, 2)
                            if item:
                                yield item


def kernel_fn(kernel: str):
    """The Triton kernel behind a name of ``settings.kernel_tiles_all``."""
    from . import bwd, fwd
    module, name = {"wy": (fwd, "wy_kernel"), "scan": (fwd, "scan_kernel"), "out": (fwd, "out_kernel"),
                    "kv_dq": (bwd, "kv_bwd_dq_kernel"), "kv_dkdv": (bwd, "kv_bwd_dkdv_kernel"),
                    "kv_bwd": (bwd, "kv_bwd_kernel"),
                    "bwd_scan": (bwd, "bwd_scan_kernel"), "fw_bwd": (bwd, "fw_bwd_kernel"),
                    "fw_bwd_dq": (bwd, "fw_bwd_dq_kernel"), "fw_bwd_wy": (bwd, "fw_bwd_wy_kernel"),
                    "fw_bwd_dk": (bwd, "fw_bwd_dk_kernel"), "wy_t": (bwd, "wy_t_kernel"),
                    "bwd_scan_phi": (bwd, "bwd_scan_phi_kernel"), "bwd_scan_carry": (bwd, "bwd_scan_carry_kernel")}[kernel]
    return getattr(module, name)


def compile_kernel(kernel: str, elem: int, feat: bool, BK: int, BV: int, warps: int, stages: int,
                   arch: int = 90, dtype: str | None = None, extra: dict | None = None, maxnreg: int = 0):
    """One kernel compiled by Triton for ``sm_<arch>`` (no GPU needed), specialised as a GPU launch at a
    typical shape specialises it; ``dtype`` the Triton name of the input dtype (default fp16 for 2-byte inputs,
    fp32 for 4); ``extra``: further constexprs (e.g. ``LOCAL_IN`` of the reverse scan); ``maxnreg``: a register
    cap (0: none)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = 128 if kernel in WIDE_KV else 64   # the KV backward's 128-row programs (settings.WIDE_KV)
    u_fwd = kernel == KEPT_U_WY               # fw_bwd_wy loading the forward's U (settings.KEPT_U_WY)
    kernel = {**WIDE_KV, KEPT_U_WY: "fw_bwd_wy"}.get(kernel, kernel)
    fn = kernel_fn(kernel)
    dt = dtype or ("fp16" if elem == 2 else "fp32")
    consts = {"BK": BK, {"wy": "BVW", "kv_dq": "BVW", "kv_dkdv": "BVW", "kv_bwd": "BVW", "bwd_scan_phi": "BP"}.get(
        kernel, "BV"): BV}
    if kernel not in ("kv_dq", "kv_dkdv", "kv_bwd", "fw_bwd_wy", "wy_t", "bwd_scan_carry"):
        consts.update(FEATURIZE=feat, EPS=1e-6)
    if kernel == "out":
        consts["STORE_LSE"] = True
        consts["V_FIRST"] = False   # the grid order changes no tile
    if kernel == "wy":
        consts["STORE_KF"] = feat   # features computed here: the variant that stores them is the larger
        # the default "fw_bwd_t" "fwd" stores T here: the same shared memory as without (FUSED_NOTES "Round 14")
        consts["STORE_T"] = True
        # one program per chunk (the default "wy_parts"); left out, PARTS would compile as a runtime integer, both
        # branches of the split in one kernel
        consts["PARTS"] = 1
    if kernel == "bwd_scan":
        consts["LOCAL_IN"] = False
    consts["PRE_QDO"] = False   # bwd_scan, fw_bwd_dq: the default "scan" variant of settings.BWD_SCAN_QDO
    consts["T_PRE"] = True      # fw_bwd_wy: T read in, as under the default "fwd" (and "pre") of settings.FW_BWD_T
    consts["U_FWD"] = u_fwd     # fw_bwd_wy: U recomputed (the default "wy" of settings.FW_BWD_U) unless KEPT_U_WY
    consts["SEG"] = 0           # scan, bwd_scan: the whole sequence (their segmented passes have the same loop)
    consts["FORWARD"] = False   # bwd_scan_carry: the reverse scan's walk (the forward one differs in addresses only)
    consts["BM"] = rows         # kv_dq, kv_dkdv: the rows of their own tile
    consts.update(extra or {})
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
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
    # specialised as a launch on a GPU specialises it (Triton's JIT marks each pointer aligned to 16 bytes and each
    # integer divisible by 16 as such): the alignment lets Triton pipeline the loop's loads through shared memory
    # (cp.async), which an unspecialised compile does not, so without it the shared memory and registers differ
    # from the device's (the forward scan at d 128: 40,960 B unspecialised, 118,784 B as the H100 ran it; FUSED_NOTES
    # "Round 17"). The integers marked are the sizes a typical shape has divisible by 16 (T, chunks, head dims).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in consts and (name.endswith("_ptr") or name in DIVISIBLE_INTS)}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_shared(kernel: str, elem: int, feat: bool, BK: int, BV: int, warps: int, stages: int,
                   arch: int = 90) -> int:
    """Bytes of shared memory Triton allocates for one kernel compiled for ``sm_<arch>``."""
    return int(compile_kernel(kernel, elem, feat, BK, BV, warps, stages, arch).metadata.shared)


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def resource_usage(compiled) -> dict:
    """Registers, spills and shared memory of a compiled kernel, without a GPU: its PTX through the ptxas
    Triton ships (``ptxas -v``, the flags Triton uses), plus Triton's own shared-memory allocation.

    Returns ``dict(regs, stack, spill_stores, spill_loads, smem)`` (bytes per thread for the stack frame and
    spills, bytes per program for ``smem``)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    target = compiled.metadata.target
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(target.arch).path, "-lineinfo", "-v",
                              f"--gpu-name={sm_arch_from_capability(target.arch)}", str(src), "-o",
                              str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    frame = _PTXAS_LINE.search(log)
    regs = _PTXAS_REGS.search(log)
    if frame is None or regs is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3)), "smem": int(compiled.metadata.shared)}


def spill_configurations(dims=(64, 128), fw_bwd: str = "both", batch: int = 8, heads: int = 8, sms: int = 132):
    """(label, compile args) of every kernel the launchers run at the target shapes: bf16, Dk = Dv in
    ``dims``, features in the kernel ("F") and given ("g"), the default configuration for (batch, heads, sms);
    ``fw_bwd``: which FW-backward variant's kernels, "single", "split" or "both" (the split variant runs the
    reverse scan with the chunk-local term read in, ``LOCAL_IN``, and the features loaded: label "scan+local").
    Compiled as launched: ``fw_bwd_dk`` under the configuration's register cap (label "r<n>"), the one-launch KV
    backward in place of the split pair when ``"kv_bwd"`` is "fused" (as it runs with 64-row tiles on both sides:
    always at d 128, below ``KV_WIDE_WINDOW`` at d <= 64), and ``fw_bwd_wy`` loading the forward's U
    (``settings.KEPT_U_WY``) when ``"fw_bwd_u"`` is "fwd" (as a model's backward, which gets the forward's U, runs
    it), and ``wy`` in two programs per chunk (label "wy+p2") when ``"wy_parts"`` is 2."""
    want = {"single": ("single",), "split": ("split",), "both": ("single", "split")}[fw_bwd]
    for d in dims:
        cfg = default_config(batch, heads, d, d, sms)
        for feat in (True, False):
            for kernel, (bv, warps) in kernel_tiles_all(cfg).items():
                stages = kernel_stages(cfg, kernel)
                if kernel in ("kv_dq", "kv_dkdv", "fw_bwd_wy") and not feat:
                    continue   # no FEATURIZE switch: one compile serves both modes
                if (kernel == "fw_bwd" and "single" not in want) or (kernel in SPLIT_FW_BWD_KERNELS
                                                                    and "split" not in want):
                    continue
                runs = [(kernel, feat, None)]
                if kernel == "bwd_scan":
                    runs = ([(kernel, feat, {"LOCAL_IN": False})] if "single" in want else []) + \
                           ([("bwd_scan+local", False, {"LOCAL_IN": True})] if "split" in want and feat else [])
                if kernel in ("kv_dq", "kv_dkdv") and cfg["kv_bwd"] == "fused":
                    if kernel == "kv_dkdv":
                        continue
                    runs, kernel, warps = [("kv_bwd", f, None) for _, f, _ in runs], "kv_bwd", KV_BWD_FUSED_WARPS
                if kernel == "wy" and cfg["wy_parts"] != 1:   # the two-program split (settings.WY_PARTS)
                    runs = [(f"{kernel}+p{cfg['wy_parts']}", f, {"PARTS": cfg["wy_parts"]}) for _, f, _ in runs]
                if kernel == "fw_bwd_wy" and cfg["fw_bwd_u"] == "fwd":
                    runs, kernel = [(KEPT_U_WY, f, None) for _, f, _ in runs], KEPT_U_WY
                for label_kernel, f, extra in runs:
                    # the launch's register cap (fw_bwd_dk only, by the feature mode; launch.fused_backward)
                    maxnreg = fw_bwd_dk_regs(cfg["fw_bwd_dk_maxnreg"], f) if kernel == "fw_bwd_dk" else 0
                    mode = "-" if kernel in ("kv_dq", "kv_dkdv", "kv_bwd", "fw_bwd_wy", KEPT_U_WY) \
                        or label_kernel == "bwd_scan+local" else ("F" if f else "g")
                    label = f"{label_kernel} d{d} {mode} BV{bv} w{warps}" + (f" r{maxnreg}" if maxnreg else "")
                    yield label, dict(kernel=kernel, elem=2, feat=f, BK=cfg["BK"], BV=bv, warps=warps,
                                      stages=stages, dtype="bf16", extra=extra, maxnreg=maxnreg)


def _spill_row(item):
    label, kw = item
    t = time.time()
    try:
        usage = resource_usage(compile_kernel(**kw))
    except Exception as exc:  # report and go on
        return label, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}, time.time() - t
    return label, usage, time.time() - t


# sm_90 (H100, H200) per SM: a register file of 4 partitions x 16,384, allocated per warp in units of 256 (each thread's
# count rounded up to 8), a warp in one partition; 233,472 B of shared memory at the largest carveout, of which the
# driver reserves 1,024 B per block; at most 32 blocks and 64 warps
SM90_LIMITS = dict(partition_regs=16384, partitions=4, reg_unit=256, smem=233472, smem_per_block=1024, blocks=32,
                   warps=64)


def blocks_per_sm(regs: int, warps: int, smem: int, limits: dict = SM90_LIMITS) -> int:
    """How many programs of a kernel (``regs`` per thread, ``warps`` per program, ``smem`` bytes per program) one SM
    holds at once: Nsight Compute's "Block Limit Registers" (it matched the H100 for every fused kernel of
    kernels/results/ncu_fused_8x2048_h100_round16.txt) and its shared-memory limit at the largest carveout (the
    driver picks a smaller one where registers bound the count anyway)."""
    def up(n: int, unit: int) -> int:   # n rounded up to a multiple of unit
        return -(-n // unit) * unit

    per_warp = up(up(regs, 8) * 32, limits["reg_unit"])
    by_regs = (limits["partition_regs"] // per_warp) * limits["partitions"] // warps
    by_smem = limits["smem"] // (smem + limits["smem_per_block"])
    return min(by_regs, by_smem, limits["blocks"], limits["warps"] // warps)


def print_spills(dims=(64, 128), fw_bwd: str = "both", jobs: int = 1, batch: int = 8, heads: int = 8,
                 sms: int = 132, only: tuple[str, ...] = ()) -> dict:
    """Compile every kernel of ``spill_configurations`` for sm_90 and print registers, spill bytes (stores /
    loads per thread, from ptxas), shared memory per program and the programs an SM holds (``blocks_per_sm``, with
    their warps). Returns {label: usage}."""
    items = [it for it in spill_configurations(dims, fw_bwd, batch, heads, sms)
             if not only or it[1]["kernel"] in only]
    print(f"{'kernel':<34} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>8} {'per SM':>6}  (sm_90, "
          f"bf16, B={batch} H={heads} SMs={sms}; bytes; programs x warps an SM holds, blocks_per_sm)", flush=True)
    rows = {}
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_spill_row, items))
    else:
        results = map(_spill_row, items)
    warps = {label: kw["warps"] for label, kw in items}
    for label, usage, secs in results:
        rows[label] = usage
        if "error" in usage:
            print(f"{label:<34} failed: {usage['error']}", flush=True)
            continue
        usage["per_sm"] = blocks_per_sm(usage["regs"], warps[label], usage["smem"])
        per_sm = f"{usage['per_sm']}x{warps[label]}"
        print(f"{label:<34} {usage['regs']:>5} {usage['stack']:>6} {usage['spill_stores']:>9} "
              f"{usage['spill_loads']:>9} {usage['smem']:>8} {per_sm:>6}  ({secs:.0f} s)", flush=True)
    return rows


def fit_envelope(table: dict[str, int]) -> dict[tuple[str, bool], tuple[float, ...]]:
    """Per (kernel, features in kernel): non-negative coefficients of ``settings.smem_terms`` whose sum is
    >= every measured entry, with the least total over the entries (a linear program)."""
    import numpy as np
    from scipy.optimize import linprog

    groups: dict[tuple[str, bool], list] = {}
    for key, val in table.items():
        kernel, e, feat, bk, bv = key.split("/")[:5]
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
    p.add_argument("--spills", action="store_true",
                   help="print registers, spill bytes and shared memory of every kernel at the target shapes "
                        "(bf16, --dims, B x H = --batch x --heads on --sms SMs) instead of the table")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--fw-bwd", choices=("single", "split", "both"), default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles (--spills)")
    args = p.parse_args(argv)
    if args.spills:
        print_spills(tuple(args.dims), args.fw_bwd, args.jobs, args.batch, args.heads, args.sms)
        return 0
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


__all__ = ["configurations", "compile_shared", "compile_kernel", "resource_usage", "print_spills", "blocks_per_sm",
           "fit_envelope", "FORWARD_KERNELS", "BACKWARD_KERNELS", "pow2"]
