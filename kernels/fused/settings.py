"""Constants, environment switches, launch configuration and shared-memory budget of the fused
Synchronous-HQLT kernels.

Imports neither triton nor the kernels, so that the backend (``hqlt.kernels.backends.fused``) reads the
limits and switches, and decides whether the kernels fit a device, on a machine without triton. The FW
feature eps and CUDA's grid limit are the contract's (``hqlt.kernels.contract.FEATURE_EPS``,
``MAX_GRID_ROWS``).

Shared memory. Each kernel needs shared memory per program that grows with its tiles (Triton stages dot
operands and layout conversions there): at float32 and d = 128 the backward's reverse scan needs 245760 B
with the features computed in the kernel, more than an H200 block may have (232448 B opt-in) — Triton
then refuses the launch (``OutOfResources``). ``smem_need`` gives each kernel's bytes for a configuration:
the number Triton 3.6 allocates when it compiles the kernel for sm_90, from the table
``kernels/results/fused_smem_sm90.json`` (written by ``python -m hqlt.kernels.fused.resources``, which
compiles every default configuration for sm_90 on any machine), or, for a configuration outside it, a
linear upper envelope of that table in the tile sizes (up to 2x above it). ``fits_shared_memory`` compares
the largest need with a device's limit (``shared_memory_per_block_optin``); the backend routes a call that
does not fit to its fallback. The sm_90 numbers serve every card: a sample compiled for sm_80 needed at most
as much (the sm_80 code path stages fewer operands).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

CHUNK = 64          # tokens per chunk (fixed: the WY kernel is written as 4 blocks of 16)
MAX_HEAD_DIM = 128  # Dk and Dv; larger heads would need more registers than one tile
MIN_TILE = 64       # smallest Dk / Dv tile the kernels are launched with (default_config)


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> tuple[int, int]:
    """(shared memory per block, opt-in bytes; multiprocessors) of CUDA device ``index``: the launchers and the
    backend ask on every call, the device's properties do not change."""
    import torch
    props = torch.cuda.get_device_properties(index)
    return int(props.shared_memory_per_block_optin), int(props.multi_processor_count)


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default) not in ("", "0")


def interpreting() -> bool:
    """Whether triton runs its CPU interpreter (TRITON_INTERPRET=1, read by triton at import time)."""
    return _env_flag("TRITON_INTERPRET", "0")


def fused_backward_default() -> bool:
    """``HQLT_FUSED_BACKWARD`` (default "1"): "0" makes ``FusedSyncHybrid`` back-propagate through the
    unfused recomputation (fla composition or reference) instead of the fused backward kernels."""
    return _env_flag("HQLT_FUSED_BACKWARD", "1")


def save_states_default() -> bool:
    """``HQLT_FUSED_SAVE_STATES`` (default "1"): keep the forward's w, v_new and chunk states for the
    fused backward (memory: about 2*Dk*Dv/64 + Dk + Dv elements per token and head in the input dtype,
    4x the size of k at Dk = Dv = 128); "0" recomputes them in the backward (the forward's wy + scan
    kernels once more)."""
    return _env_flag("HQLT_FUSED_SAVE_STATES", "1")


FW_BWD_VARIANTS = ("single", "split")


def fw_bwd_variant() -> str:
    """``HQLT_FUSED_FW_BWD`` (default "split"): which FW-backward kernels ``launch.fused_backward`` runs.
    "single": ``fw_bwd_kernel``, one program per chunk for dq, dk, dv, dbeta (spills 1.9 KB per thread at
    d = 128 on sm_90), after the reverse scan that computes the chunk-local term itself. "split"
    (FUSED_NOTES.md "Round 3"): ``fw_bwd_dq_kernel`` (dq, the features, and the reverse scan's chunk-local
    term, chunk-parallel, before the scan), the scan without that term (``LOCAL_IN``), then
    ``fw_bwd_wy_kernel`` (dv, dbeta, the WY part of dk) and ``fw_bwd_dk_kernel`` (dk). Same gradients; the
    benchmark (``python -m hqlt.benchmarks.fused``) times both; a launch config's ``"fw_bwd"`` entry
    overrides the switch. "split" is the default since its H200 A/B (FUSED_NOTES.md "Round 3 A/B"): backward
    1.74 vs 2.54 ms at B 8, T 2048 and 4.33 vs 7.16 ms at B 1, T 32768 (8 heads x 128), same gradients."""
    value = os.environ.get("HQLT_FUSED_FW_BWD", "split").strip().lower() or "split"
    if value not in FW_BWD_VARIANTS:
        raise ValueError(f"HQLT_FUSED_FW_BWD must be one of {FW_BWD_VARIANTS}; got {value!r}")
    return value


SCAN_FEATURES = ("kernel", "stored")


def scan_features() -> str:
    """``HQLT_FUSED_SCAN_FEATURES`` (default "stored"): where the forward scan gets the FW key features when they
    are computed in the kernels (raw q, k). "kernel": the scan featurises each chunk's keys itself, on its
    sequential path. "stored": ``wy_kernel``, which featurises the same keys, stores them (a transient buffer
    the size of k) and the scan loads them. Same values. "stored" is the default since its A/B (H100, 8 heads
    x 128, FUSED_NOTES.md "Round 7"): with the 4-warp scan it frees, the forward took 1.21 instead of 1.93 ms
    at B 1, T 32768 and 0.50 instead of 0.60 ms at B 8, T 2048. A launch config's ``"scan_features"`` entry
    overrides it."""
    value = os.environ.get("HQLT_FUSED_SCAN_FEATURES", "stored").strip().lower() or "stored"
    if value not in SCAN_FEATURES:
        raise ValueError(f"HQLT_FUSED_SCAN_FEATURES must be one of {SCAN_FEATURES}; got {value!r}")
    return value


# Where the reverse scan of the split FW backward gets fw_scale * Qf^T dO, its state gradient's read-out term
# (a launch config's "bwd_scan_qdo"): "scan" computes it in every sequential step; "pre" has the chunk-parallel
# fw_bwd_dq_kernel leave it in the dH buffer, which the scan reads before overwriting chunk by chunk (FUSED_NOTES.md
# "Round 7": the reverse scan is the largest kernel at T 32768 and waits on its loads). Opt-in: "pre" was slower at
# every shape timed (H100, 8 x 128: backward 1.314 -> 1.336, 1.434 -> 1.512, 3.316 -> 3.445 ms; "Round 8").
BWD_SCAN_QDO = ("scan", "pre")

# Where the split FW backward's WY kernel gets T = (I + A)^-1 of its chunk (a launch config's "fw_bwd_t"): "wy"
# builds it in fw_bwd_wy_kernel (A's blocks, the 16x16 inversions, the solves against the identity: the most
# registers of that kernel, the largest of the backward at T 2048); "pre" has wy_t_kernel build every chunk's T
# first, in a program that holds nothing else, and store it (float32, 16 KB per chunk and head) for fw_bwd_wy_kernel
# to load (FUSED_NOTES.md "Round 8"). Same tile either way. "pre" beat "wy": the backward at 8 x 128 took
# 1.281 / 1.400 / 3.252 ms instead of 1.331 / 1.521 / 3.339 at T 2048 / 8192 / 32768 (H100, same process).
# "fwd" ("Round 14", the default since "Round 15") has the forward's wy_kernel, which holds A's blocks and their
# diagonal inverses anyway, solve them against the identity too and store T (forward_stores_t): the backward loads it
# and launches no wy_t (fwd+bwd at 8 x 128, W 64 on an H100: 3.73 -> 3.51 ms at T 32768, 1.73 -> 1.59 at T 8192,
# same gradients bit for bit). A residual of the forward (16 KB per chunk and head, float32: B*H*T*256 bytes, as
# much as a bf16 copy of v at d 128, kept with the chunk states); where a backward gets no T from its forward
# (states not kept, or a forward run without it) it builds T as "pre" does.
FW_BWD_T = ("wy", "pre", "fwd")


def forward_stores_t(cfg: dict) -> bool:
    """Whether a forward run under launch configuration ``cfg`` stores every chunk's T for the backward
    (``FW_BWD_T`` "fwd"; only the split FW backward reads it)."""
    return cfg["fw_bwd"] == "split" and cfg["fw_bwd_t"] == "fwd"


# Where the split FW backward's WY kernel gets U = T diag(beta) V of its chunk (a launch config's "fw_bwd_u"): "wy"
# (the default) recomputes it per value block in fw_bwd_wy_kernel, a 64 x 64 x BV float32 product beside the three that
# kernel needs anyway; "fwd" (opt-in, untimed; FUSED_NOTES.md "U kept for fw_bwd_wy") keeps the forward's u, which
# wy_kernel writes for the scan (a transient buffer otherwise), as a residual for fw_bwd_wy_kernel to load: one
# 64 x BV load per block instead of the product, and the U the forward's scan used (rounded to the inputs' dtype)
# instead of a float32 recomputation. Costs a residual of B*T*H*Dv elements in the inputs' dtype (the size of v_new).
# Where a backward gets no U from its forward (a forward run without it), fw_bwd_wy recomputes it as "wy" does.
FW_BWD_U = ("wy", "fwd")


def forward_keeps_u(cfg: dict) -> bool:
    """Whether a forward run under launch configuration ``cfg`` keeps its U for the backward (``FW_BWD_U`` "fwd";
    only the split FW backward reads it)."""
    return cfg["fw_bwd"] == "split" and cfg["fw_bwd_u"] == "fwd"


# The dtype of the backward's partial gradients, the buffers one kernel writes for a later one to read and add to
# (a launch config's "bwd_partials"): the KV branch's dv (and dq, dk with the features computed in the kernel), the
# FW branch's dv_new gradient (written by fw_bwd_dq, completed by the reverse scan, read by fw_bwd_wy) and the WY part
# of dk. "float32" (the default) keeps them exact to float32; "input" stores them in the inputs' dtype, as fla's
# chunked DeltaNet backward does with its dv intermediates: at d 128 it moves 128 KB less per chunk of the
# backward's ~1.3 MB (FUSED_NOTES.md "Round 14"; opt-in until a GPU A/B), at the cost of one rounding to bf16 of each
# partial before the sums.
BWD_PARTIALS = ("float32", "input")

# The order of the output kernel's grid (a launch config's "out_order"): "chunk", grid (n, B*H, value blocks), the
# value blocks of one chunk a whole grid-slice apart, so at d 128 (two 64-column blocks) each reads the chunk's q, k
# and features from DRAM again; "value", grid (value blocks, n, B*H), the blocks of a chunk side by side, the second
# reading from L2 (FUSED_NOTES.md "Round 17").
OUT_ORDERS = ("chunk", "value")

# Programs per chunk of the forward's wy_kernel (a launch config's "wy_parts"): 1, one program stores W, U (and the key
# features, T); 2, grid (n, B*H, 2), program 0 W (with the key features and T) and program 1 U, each building A and
# the diagonal inverses itself, for twice the programs with fewer live tiles each (FUSED_NOTES.md "wy in two
# programs"). Same W, U, T bit for bit; 2 opt-in until timed on a GPU (compiled for sm_90 it still takes 255
# registers at d 128, the larger branch's, and spills more).
WY_PARTS = (1, 2)

# Chunks per segment of the segmented scans (a launch config's "scan_segment_chunks" for the forward scan, opt-in,
# and "bwd_scan_segment_chunks" for the reverse scan, default where that scan's programs would fill at most half the
# device's SMs; 0: one walk over the whole sequence). The local and the final pass of a segment walk this many chunks,
# in (segments x value blocks x B*H) programs; the walk over the segments (bwd_scan_carry_kernel) takes
# ceil(NC / SEGMENT_CHUNKS) - 1 steps.
SEGMENT_CHUNKS = 32
SEGMENT_KERNELS = ("bwd_scan_phi", "bwd_scan_carry")   # the transitions and the walk, for either scan

# Rows of the KV backward's own tile (a launch config's "kv_dq_rows", "kv_dkdv_rows"): the queries of one kv_dq
# program, the keys of one kv_dkdv program; the other side is walked in 64-row chunks either way. 128 loads each walked
# tile once for twice the rows (fla's parallel_attn backward uses 128-row blocks on Hopper), at the price of the masked
# part of the diagonal blocks and more registers (sm_90, bf16, 8 warps: kv_dq spills nothing at d 64 and 16 B at
# d 128; kv_dkdv, in its keys x queries form for 128 rows, nothing at d 64 and 436 B at d 128; FUSED_NOTES.md
# "Round 12"; with 4 warps both spill 1-6 KB, so 128-row programs always run 8, whatever "kv_bwd_warps" says, which
# is the 64-row programs' count). 0: by the window (kv_rows).
KV_BWD_ROWS = (0, 64, 128)
# The KV backward in two launches or one (a launch config's "kv_bwd"): "split", kv_bwd_dq_kernel then
# kv_bwd_dkdv_kernel, each reading q, k, v, dO (and O) from DRAM; "fused" (opt-in until a GPU A/B; with 64 rows
# on both sides, else "split" runs), kv_bwd_kernel: both in one program per chunk, 8 warps, the second phase reading
# from L2 (FUSED_NOTES.md "Round 17"). Its shared memory is within the larger of the two kernels' (sm_90 compiles at
# d 64 and 128), so the shared-memory check counts those.
KV_BWD = ("split", "fused")
KV_BWD_FUSED_WARPS = 8   # kv_bwd_kernel's warps, whatever "kv_bwd_warps" says
KV_WIDE_WINDOW = 512   # from this window on, rows 0 means 128

# A register cap for fw_bwd_dk (a launch config's "fw_bwd_dk_maxnreg", ptxas .maxnreg): 0, none; n, n registers per
# thread; "given" (the default), FW_BWD_DK_GIVEN_REGS where the features are given and none where the kernel computes
# them. At d 128, 8 warps, the kernel takes 129 registers with the features given, one more than lets two programs
# share an SM; capped at 128 it compiles without spills and the fwd+bwd step's GPU time fell 3.0 % at T 2048 and at
# T 32768 on an H100 (FUSED_NOTES.md "Round 19"). Computing the features it takes 173, and the cap spills 324 B per
# thread (sm_90, "Round 18"); at d 64 it raises that compile from 86 to 118 registers (3 programs per SM to 2).
FW_BWD_DK_GIVEN_REGS = 128


def fw_bwd_dk_regs(value, featurize: bool) -> int:
    """The register cap fw_bwd_dk is launched with (0: none) for a config value of "fw_bwd_dk_maxnreg" when the
    kernel computes the features (``featurize``) or is given them; ValueError naming the allowed values."""
    if value == "given":
        return 0 if featurize else FW_BWD_DK_GIVEN_REGS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config['fw_bwd_dk_maxnreg'] must be \"given\" or an integer >= 0 (registers per thread; "
                         f"0: no cap); got {value!r}")
    return value


# The reverse scan's pipelining stages (a launch config's "bwd_scan_stages") start at 2: with 1, bwd_scan_kernel made
# illegal memory accesses on an H100 (d 128, B 8, T 2048, features given; compute-sanitizer, FUSED_NOTES.md "Round 19").
MIN_BWD_SCAN_STAGES = 2


def kv_rows(value: int, window: int | None, elem_bytes: int = 2) -> int:
    """The rows a KV-backward kernel runs with for a config value of ``KV_BWD_ROWS`` at ``window`` (None: not known;
    0 then gives 128, the larger need) with inputs of ``elem_bytes`` bytes (0 gives 128 only with 2-byte inputs, the
    ones measured: float32 tiles of 128 rows would double a need that is near the limit already)."""
    if value:
        return value
    return 128 if elem_bytes == 2 and (window is None or window >= KV_WIDE_WINDOW) else 64


# ==================================================================================================
# Launch configuration (the launchers in ``launch`` use it; no triton needed to compute it).

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FORWARD_KERNELS = ("wy", "scan", "out")
BACKWARD_KERNELS = ("kv_dq", "kv_dkdv", "bwd_scan", "fw_bwd")
SPLIT_FW_BWD_KERNELS = ("fw_bwd_dq", "fw_bwd_wy", "fw_bwd_dk")   # HQLT_FUSED_FW_BWD=split, for fw_bwd


def config_overrides() -> dict:
    """``HQLT_FUSED_CONFIG`` (default empty): a JSON object of launch-config entries that replace the defaults of
    ``default_config`` for every call in the process, e.g. ``{"fw_bwd_t": "pre"}`` — how a whole model (``hqlt bench
    model``, a training run) tries an opt-in variant or a tile before it becomes a default. Keys must be
    ``default_config``'s; the named variants are checked by the launchers as for a caller's config."""
    text = os.environ.get("HQLT_FUSED_CONFIG", "").strip()
    if not text:
        return {}
    return dict(_parsed_overrides(text))


@functools.lru_cache(maxsize=64)
def _parsed_overrides(text: str) -> dict:
    try:
        return parse_config(text)
    except ValueError as exc:
        raise ValueError(f"HQLT_FUSED_CONFIG: {exc}") from None


def parse_config(text: str) -> dict:
    """A launch configuration's entries from a JSON object (the benchmarks' ``--config(s)`` and
    ``HQLT_FUSED_CONFIG``); ValueError naming what is wrong: not JSON, not an object, unknown keys."""
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc}); e.g. '{{\"fw_bwd_t\": \"wy\"}}'") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"a JSON object of launch-configuration keys, e.g. '{{\"fw_bwd_t\": \"wy\"}}'; got {text!r}")
    check_config_keys(cfg)
    return cfg


def check_config_keys(cfg: dict) -> None:
    """ValueError for keys of a launch configuration that ``default_config`` does not have (the launchers would
    otherwise ignore them silently)."""
    unknown = sorted(set(cfg) - _config_key_set())
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {config_keys()}")


def config_keys() -> list[str]:
    """The entries of a launch configuration (``default_config``'s keys), sorted."""
    return sorted(_config_key_set())


@functools.lru_cache(maxsize=1)
def _config_key_set() -> frozenset:
    """``default_config``'s keys (the same for every shape and switch value)."""
    return frozenset(_default_config_of(1, 1, 64, 64, 1, 2, "stored", "split"))


def _with_defaults(cfg: dict | None) -> dict:
    """``cfg`` over ``HQLT_FUSED_CONFIG`` over the defaults (later entries win; any of them may name the same key);
    a complete configuration (a launcher's) as it is, without reading the environment again."""
    if cfg is not None and cfg.keys() >= _config_key_set():
        return cfg
    return {**_default_config(1, 1, 64, 64), **config_overrides(), **(cfg or {})}


def forward_kernels(cfg: dict | None = None, stages: int = 3) -> tuple[str, ...]:
    """The forward kernels a configuration launches when it runs its first ``stages`` launches (the segmented
    scan's transitions and walk with the scan when ``"scan_segment_chunks"`` is set, whether or not a sequence is
    long enough to use them)."""
    cfg = _with_defaults(cfg)
    segmented = SEGMENT_KERNELS if cfg["scan_segment_chunks"] and stages >= 2 else ()
    return FORWARD_KERNELS[:stages] + segmented


def backward_kernels(cfg: dict | None = None) -> tuple[str, ...]:
    """The backward kernels a configuration launches (its ``"fw_bwd"`` variant, else ``fw_bwd_variant()``; the
    split variant's ``wy_t`` with ``"fw_bwd_t"`` "pre" or "fwd"; the segmented reverse scan's two kernels when
    ``"bwd_scan_segment_chunks"`` is set, whether or not a sequence is long enough to use them), in no particular
    order."""
    cfg = _with_defaults(cfg)
    segmented = SEGMENT_KERNELS if cfg["bwd_scan_segment_chunks"] else ()
    if cfg["fw_bwd"] == "split":
        # "fwd" launches wy_t too when its forward left no T
        return (BACKWARD_KERNELS[:3] + SPLIT_FW_BWD_KERNELS + (("wy_t",) if cfg["fw_bwd_t"] != "wy" else ())
                + segmented)
    return BACKWARD_KERNELS   # the single variant never segments its scan (launch.fused_backward)


def pow2(n: int) -> int:
    """The power-of-two tile width (>= 16, tl.dot's minimum) that holds n columns."""
    return max(16, 1 << (int(n) - 1).bit_length())


def default_config(B: int, H: int, dk: int, dv: int, sms: int = 1, elem_bytes: int = 2) -> dict:
    """``_default_config`` with the process's ``HQLT_FUSED_CONFIG`` entries over it."""
    return dict(_default_config(B, H, dk, dv, sms, elem_bytes), **config_overrides())


def _default_config(B: int, H: int, dk: int, dv: int, sms: int = 1, elem_bytes: int = 2) -> dict:
    """``_default_config_of`` for the environment's switches (``scan_features()``, ``fw_bwd_variant()``), a fresh
    dict. Cached per shape and switch values: the launchers ask several times per call, and a training step's host
    time is part of the step at T 2048 (FUSED_NOTES.md "Round 15")."""
    return dict(_default_config_of(int(B), int(H), int(dk), int(dv), int(sms), int(elem_bytes), scan_features(),
                                   fw_bwd_variant()))


@functools.lru_cache(maxsize=1024)
def _default_config_of(B: int, H: int, dk: int, dv: int, sms: int, elem_bytes: int, features: str,
                       fw_bwd: str) -> dict:
    """Block sizes and warps (not autotuned; ``python -m hqlt.benchmarks.fused`` sweeps alternatives);
    ``sms``: the device's multiprocessor count; ``elem_bytes``: the inputs' element size.

    Chosen so that ptxas reports no register spills for sm_90 (checked by compiling the bf16 kernels for
    ``GPUTarget("cuda", 90, 32)`` on a CPU machine and reading ``cuobjdump --dump-resource-usage``; the spill bytes
    quoted here predate round 17, when that compile was not yet specialised as a GPU launch is and overstated them,
    FUSED_NOTES.md "Round 17"):
    * wy: 4 warps (at d = 128 they spill 208 B, and still ran 0.26 ms faster than 8 at T 32768 on an H100);
    * scan: value blocks of 64 columns (32 at Dk = 128: 64 spilled even with 8 warps in the unspecialised compile;
      specialised, 64 with 8 warps takes 169 registers and no spill, an A/B candidate of "Round 20"), 8 warps when the
      state tile is >= 64x64 elements, but 4 at d = 128 when it loads stored key features (``scan_features``);
      halved down to 16 columns while B*H*blocks < #SMs (the scan is the only sequential launch, so it needs
      programs on every SM);
    * out: 64-column value blocks (two programs per chunk at d = 128, the score tiles recomputed by each;
      128 columns spill), 4 warps.
    The forward scan's chunk loop runs 3 stages deep with 2-byte inputs (with float32 the third stage takes
    the scan past an H200's shared memory): at d = 128 since "Round 6" (FUSED_NOTES.md), at d <= 64 since
    "Round 8" (H100, 16 heads x 64: forward 1.31 -> 1.05 ms at B 1, T 32768). At d = 128 the backward's KV and
    scan kernels run 4 warps: with the 4-warp wy and out, that combination was faster at T 2048, 8192 and
    32768 on an H100 ("Round 6"). ``scan_features`` and ``fw_bwd`` come from their environment switches
    (``scan_features()``, ``fw_bwd_variant()``: the arguments ``features``, ``fw_bwd``); ``HQLT_FUSED_CONFIG``
    replaces any entry (``config_overrides``). Callers get a copy (``_default_config``): never mutate this one.
    """
    # Head dims below 64 run in 64-wide tiles (loads and stores are masked to Dk, Dv): with 16- and 32-wide
    # tiles the sm_90 backward made illegal memory accesses on an H200 (B1 T100 dk32 dv64, dk = dv = 16,
    # d 16 and 32 at T 130/200; kernels/results/gpu_tests_h200.json), every d >= 64 case passed.
    BK, BVW = max(MIN_TILE, pow2(dk)), max(MIN_TILE, pow2(dv))
    big = max(BK, BVW) > 64
    scan_bv = 32 if BK > 64 else min(BVW, 64)
    while scan_bv > 16 and B * H * -(-dv // scan_bv) < sms:
        scan_bv //= 2
    scan_bv = min(scan_bv, BVW)
    return {"BK": BK, "BVW": BVW,
            "wy_warps": 4,
            # one wy program per chunk until two (WY_PARTS) are timed on a GPU
            "wy_parts": 1,
            "scan_bv": scan_bv, "scan_warps": 4 if big and features == "stored" else (
                8 if (BK > 64 or BK * scan_bv >= 64 * 64) else 4),
            # "value" since "Round 19" (H100, fwd+bwd GPU time at 8 x 128: -2.5 % at T 2048, -2.0 % at T 32768)
            "out_bv": min(BVW, 64), "out_warps": 4, "out_order": "value",
            "num_stages": 2,
            # software-pipelining depth of the two sequential scans' chunk loops (their loads of chunk c + 1 do
            # not depend on the state); the reverse scan's 3 and 4 stages measured no faster than 2, and 1 faults
            # (MIN_BWD_SCAN_STAGES); one stage fewer in the forward scan, so that two d-128 programs share an SM, was
            # no faster at B 8, T 2048 and 6.9 % slower at B 1, T 32768 (H100, FUSED_NOTES.md "Round 19")
            "scan_stages": 3 if elem_bytes == 2 else 2, "bwd_scan_stages": 2,
            "scan_features": features,
            # the forward scan in segments (as the reverse scan below), opt-in: slower than one walk at B 1, T 32768
            # (64 programs) and B 2, T 8192 (128) on an H200, a forward step costing what a transition step does
            # (FUSED_NOTES.md "Round 10")
            "scan_segment_chunks": 0,
            # backward (step 3): reverse scan like the forward scan; the per-chunk FW backward walks the
            # value dims in blocks of fw_bwd_bv with all of Dk in registers
            "bwd_scan_bv": scan_bv, "bwd_scan_warps": 4 if big else 8, "bwd_scan_qdo": "scan", "fw_bwd_t": "fwd",
            # U recomputed by fw_bwd_wy until "fwd" (the forward's U kept, FW_BWD_U) is timed on a GPU
            "fw_bwd_u": "wy",
            "bwd_partials": "float32",
            # the reverse scan in segments of this many chunks when its programs would fill at most half the SMs
            # (0: whole); a transition per segment and two passes instead of one walk over every chunk: faster with
            # 64 programs (B 1, T 32768; FUSED_NOTES.md "Round 9"), slower with 128 on 132 SMs (B 2, T 8192, 8 x 128;
            # "Round 10"); SEGMENT_CHUNKS
            "bwd_scan_segment_chunks": SEGMENT_CHUNKS if 2 * B * H * -(-dv // scan_bv) <= sms else 0,
            "bwd_scan_carry_warps": 8,
            "fw_bwd_bv": 16, "fw_bwd_warps": 8,
            # the KV backward's rows (KV_BWD_ROWS): at d <= 64 by the window, 128 from KV_WIDE_WINDOW on; 64 at d 128
            # (FUSED_NOTES.md "Round 15", W 1024 on an H100, fwd+bwd: 16 x 64 2.53 -> 1.93 ms at T 2048, 3.05 -> 2.31
            # at T 8192; 8 x 128 1.92 -> 1.99 and 2.24 -> 2.28, where kv_dkdv's 128-row tile spills)
            "kv_bwd_warps": 4 if big else 8, "kv_dq_rows": 64 if big else 0, "kv_dkdv_rows": 64 if big else 0,
            "kv_bwd": "split",
            # the split FW backward (HQLT_FUSED_FW_BWD=split; "Round 3"): 8 warps for the dq and dk kernels from
            # Dk = 64 (4 spill); 32-column blocks with a 4-warp WY kernel, faster at T 2048, 8192 and 32768 on an
            # H100 despite the spills, at d 128 ("Round 7") and at d 64 ("Round 8": backward 4.26 -> 3.34 ms at
            # B 1, T 32768, 16 heads); T from wy_t_kernel (FW_BWD_T)
            "fw_bwd": fw_bwd, "fw_bwd_split_bv": 32,
            "fw_bwd_dq_warps": 8 if BK >= 64 else 4, "fw_bwd_wy_warps": 4,
            "fw_bwd_dk_warps": 8 if BK >= 64 else 4, "wy_t_warps": 4,
            # fw_bwd_dk's register cap where the features are given (fw_bwd_dk_regs, FW_BWD_DK_GIVEN_REGS)
            "fw_bwd_dk_maxnreg": "given"}


def kernel_stages(cfg: dict, kernel: str) -> int:
    """Software-pipelining stages a kernel is launched with under ``cfg`` (wy: Triton's default, 3)."""
    return {"wy": 3, "wy_t": 3, "scan": cfg["scan_stages"], "bwd_scan": cfg["bwd_scan_stages"],
            "bwd_scan_phi": cfg["bwd_scan_stages"], "bwd_scan_carry": 1}.get(kernel, cfg["num_stages"])


def kernel_tiles(cfg: dict) -> dict[str, tuple[int, int]]:
    """(value-column block, warps) of each kernel under a configuration (Dk is always one BK tile)."""
    return {"wy": (cfg["BVW"], cfg["wy_warps"]), "scan": (cfg["scan_bv"], cfg["scan_warps"]),
            "out": (cfg["out_bv"], cfg["out_warps"]),
            "kv_dq": (cfg["BVW"], cfg["kv_bwd_warps"]), "kv_dkdv": (cfg["BVW"], cfg["kv_bwd_warps"]),
            "bwd_scan": (cfg["bwd_scan_bv"], cfg["bwd_scan_warps"]), "fw_bwd": (cfg["fw_bwd_bv"], cfg["fw_bwd_warps"])}


def kernel_tiles_all(cfg: dict) -> dict[str, tuple[int, int]]:
    """``kernel_tiles`` plus the split FW backward's kernels (not in the shared-memory table: their bytes come
    from ``SMEM_ENVELOPE``)."""
    bv = cfg["fw_bwd_split_bv"]
    return dict(kernel_tiles(cfg), **{k: (bv, cfg[f"{k}_warps"]) for k in SPLIT_FW_BWD_KERNELS},
                wy_t=(64, cfg["wy_t_warps"]), bwd_scan_phi=(cfg["bwd_scan_bv"], cfg["bwd_scan_warps"]),
                bwd_scan_carry=(cfg["bwd_scan_bv"], cfg["bwd_scan_carry_warps"]))


# ==================================================================================================
# Shared memory (module docstring).

SMEM_TABLE = Path(__file__).resolve().parents[1] / "results" / "fused_smem_sm90.json"
# Upper envelope of the table, per (kernel, features in kernel): bytes = sum of c_i * term_i over the terms
# e*64*BK, e*64*BV, e*BK*BV, 4*64*BK, 4*64*BV, 4*BK*BV, 4*64*64 (e: element bytes of the inputs); fitted
# by ``resources.fit_envelope`` (a linear program: the least total that is >= every measured entry) to every entry of
# the table, which holds each kernel's default tiles and, for the split FW backward, ``resources.SPLIT_SWEEP``
# (``python -m hqlt.kernels.fused.resources --fit`` prints it).
SMEM_ENVELOPE: dict[tuple[str, bool], tuple[float, ...]] = {
    ("wy", False): (0.467, 0.0, 0.0, 0.0, 0.0, 0.0, 0.567),
    ("wy", True): (2.034, 0.0, 0.0, 0.0, 0.0, 0.0, 0.434),
    ("scan", False): (6.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0),
    ("scan", True): (6.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("out", False): (4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("out", True): (4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("kv_dq", False): (3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("kv_dkdv", False): (2.5, 3.0, 0.0, 0.072, 0.0, 0.0, 0.889),
    ("kv_dq128", False): (8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("kv_dkdv128", False): (8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.032),
    ("bwd_scan", False): (5.381, 2.0, 0.62, 0.477, 0.0, 0.381, 0.286),
    ("bwd_scan", True): (6.81, 1.62, 1.191, 0.0, 0.0, 0.0, 0.381),
    ("fw_bwd", False): (0.087, 4.05, 1.632, 2.67, 2.689, 0.0, 0.989),
    ("fw_bwd", True): (0.943, 4.029, 0.0, 3.315, 3.772, 0.0, 0.286),
    ("fw_bwd_dq", False): (2.334, 2.0, 0.667, 0.0, 2.0, 0.0, 0.0),
    ("fw_bwd_dq", True): (2.334, 2.0, 0.667, 0.0, 2.0, 0.0, 0.0),
    ("fw_bwd_wy", False): (0.334, 1.0, 1.667, 0.0, 3.167, 0.0, 1.834),
    ("fw_bwd_wy_u", False): (1.845, 3.067, 0.089, 0.067, 2.756, 0.0, 0.178),
    ("fw_bwd_dk", False): (0.667, 4.0, 1.334, 0.0, 0.0, 0.0, 0.0),
    ("fw_bwd_dk", True): (0.667, 4.0, 1.334, 0.0, 0.0, 0.0, 0.0),
    ("wy_t", False): (0.084, 0.0, 0.0, 0.0, 0.834, 0.0, 0.0),
    ("bwd_scan_phi", False): (4.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    ("bwd_scan_phi", True): (4.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    ("bwd_scan_carry", False): (0.0, 0.0, 0.0, 2.0, 0.0, 2.0, 0.0),
}


# the KV backward's 128-row programs (KV_BWD_ROWS) under their own names in the table and the envelope
WIDE_KV = {"kv_dq128": "kv_dq", "kv_dkdv128": "kv_dkdv"}
_WIDE_OF = {base: name for name, base in WIDE_KV.items()}   # the 128-row entry's name of a KV kernel
# fw_bwd_wy loading the forward's U (FW_BWD_U "fwd", its U_FWD) under its own name: loading instead of the product
# needs no more shared memory than recomputing in 23 of the table's 24 sm_90 compiles but more in one (float32,
# BK 128, BV 32, 8 warps: 114,688 B against 102,400), so the recomputing compile does not bound it (smem_needs)
KEPT_U_WY = "fw_bwd_wy_u"
# kernels without a FEATURIZE switch: one compile serves both modes
NO_FEATURIZE_SWITCH = ("kv_dq", "kv_dkdv", "fw_bwd_wy", KEPT_U_WY, "wy_t", "bwd_scan_carry", *WIDE_KV)


def _key(kernel: str, elem_bytes: int, featurize: bool, BK: int, BV: int, warps: int, stages: int) -> str:
    # the kv kernels (and the split WY backward) have no FEATURIZE switch: one entry serves both modes;
    # the pipelining depth is in the key because each stage keeps its own copy of the loop's loads
    feat = "-" if kernel in NO_FEATURIZE_SWITCH else ("F" if featurize else "g")
    return f"{kernel}/e{elem_bytes}/{feat}/BK{BK}/BV{BV}/w{warps}/s{stages}"


@functools.lru_cache(maxsize=None)
def smem_table(path: str | None = None) -> dict[str, int]:
    """Measured bytes per ``_key`` (empty when the table file is missing)."""
    try:
        data = json.loads(Path(path or SMEM_TABLE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.get("bytes", {}).items()}


def smem_terms(elem_bytes: int, BK: int, BV: int) -> tuple[int, ...]:
    e = elem_bytes
    return (e * 64 * BK, e * 64 * BV, e * BK * BV, 4 * 64 * BK, 4 * 64 * BV, 4 * BK * BV, 4 * 64 * 64)


def smem_need(kernel: str, elem_bytes: int, BK: int, BV: int, warps: int, *, featurize: bool,
              stages: int = 2) -> int:
    """Shared memory (bytes per program) of one kernel: measured for sm_90 where the table has the
    configuration, else the envelope's bound (module docstring)."""
    measured = smem_table().get(_key(kernel, elem_bytes, featurize, BK, BV, warps, stages))
    if measured is not None:
        return measured
    coeffs = SMEM_ENVELOPE[(kernel, bool(featurize) and kernel not in NO_FEATURIZE_SWITCH)]
    return int(sum(c * t for c, t in zip(coeffs, smem_terms(elem_bytes, BK, BV))) + 0.5)


def smem_needs(elem_bytes: int, dk: int, dv: int, *, featurize: bool, batch: int = 1, heads: int = 1,
               sms: int | None = None, config: dict | None = None,
               kernels: tuple[str, ...] = FORWARD_KERNELS + BACKWARD_KERNELS, window: int | None = None
               ) -> dict[str, int]:
    """Bytes of shared memory per program of each kernel for a call (default configuration, with
    ``config``'s overrides). ``sms`` None: one multiprocessor (the scan's widest value blocks); ``window`` None: the
    KV backward's rows "by window" count as 128 (``kv_rows``)."""
    cfg = dict(default_config(batch, heads, dk, dv, sms or 1, elem_bytes), **(config or {}))
    tiles = kernel_tiles_all(cfg)
    # the KV backward's 128-row programs ("kv_dq_rows", "kv_dkdv_rows") run 8 warps and have their own entries
    names = {k: _WIDE_OF[k] if k in _WIDE_OF and kv_rows(cfg[f"{k}_rows"], window, elem_bytes) == 128 else k for k in kernels}

    def need(k: str, name: str) -> int:
        return smem_need(name, elem_bytes, cfg["BK"], tiles[k][0], 8 if name in WIDE_KV else tiles[k][1],
                         featurize=featurize and not (k == "scan" and cfg["scan_features"] == "stored"),
                         stages=kernel_stages(cfg, k))

    needs = {k: need(k, names[k]) for k in kernels}
    if "fw_bwd_wy" in needs and cfg["fw_bwd_u"] == "fwd":
        # under "fwd" fw_bwd_wy loads the forward's U, or recomputes it where a backward got none: either compile
        needs["fw_bwd_wy"] = max(needs["fw_bwd_wy"], need("fw_bwd_wy", KEPT_U_WY))
    return needs


def fits_shared_memory(elem_bytes: int, dk: int, dv: int, limit: int, *, featurize: bool, batch: int = 1,
                       heads: int = 1, sms: int | None = None, config: dict | None = None,
                       kernels: tuple[str, ...] = FORWARD_KERNELS + BACKWARD_KERNELS,
                       window: int | None = None) -> bool:
    """Whether every kernel's shared memory (``smem_needs``) is within ``limit`` bytes per block (cached for
    the default configuration: the backend asks on every call)."""
    if config is None:   # the environment switches are in the cache key: the default configuration reads them
        return _fits_default(elem_bytes, dk, dv, limit, bool(featurize), batch, heads, sms, tuple(kernels), window,
                             fw_bwd_variant(), scan_features(), os.environ.get("HQLT_FUSED_CONFIG", ""))
    needs = smem_needs(elem_bytes, dk, dv, featurize=featurize, batch=batch, heads=heads, sms=sms, config=config,
                       kernels=kernels, window=window)
    return max(needs.values()) <= limit


@functools.lru_cache(maxsize=4096)
def _fits_default(elem_bytes, dk, dv, limit, featurize, batch, heads, sms, kernels, window, _fw_bwd, _scan_features,
                  _overrides) -> bool:
    needs = smem_needs(elem_bytes, dk, dv, featurize=featurize, batch=batch, heads=heads, sms=sms, kernels=kernels,
                       window=window)
    return max(needs.values()) <= limit
