"""A bounds checker for Triton's CPU interpreter (``TRITON_INTERPRET=1``), for debugging the fused kernels.

The interpreter runs ``tl.load`` / ``tl.store`` on NumPy arrays of raw addresses and reads or writes host
memory at every address whose mask is set, without asking whether the address belongs to the tensor the
pointer came from: a kernel that reads a few elements past the end of a buffer gets whatever lies there
(or zeros under a mask) and its values can still come out right. ``check_bounds`` closes that gap:

    with check_bounds() as report:            # or check_bounds([extra tensors])
        fused_forward(...); fused_backward(...)
    print(report.summary())

Hooks (triton 3.6, ``triton/runtime/interpreter.py``):

* ``GridExecutor.__call__`` (one kernel launch): the kernel's name; ``GridExecutor._init_args_hst`` (the
  host copies of the launch's arguments, whose ``data_ptr`` the interpreter turns into the pointer
  arguments): the allocation ranges ``[data_ptr, data_ptr + extent)`` of every tensor argument, named after
  its parameter (plus the tensors handed to ``check_bounds``).
* ``InterpreterBuilder.create_masked_load`` / ``create_masked_store``: every memory access goes through
  them (``create_load``, ``create_store``, the block-pointer ``create_tensor_pointer_load/store`` and the
  tensor-descriptor ``create_descriptor_load/store/gather/scatter`` call them), and
  ``create_atomic_rmw`` / ``create_atomic_cas``.

Each access: every lane whose mask is True (all lanes without a mask) must address an element that lies
wholly inside one allocation (and at a multiple of the element size from its start); with
``one_allocation_per_op`` (default) all active lanes of one access must also lie in the same allocation (a
tile load that spills from one buffer into its neighbour is a bug even where it cannot fault). A violation
raises ``OutOfBounds`` (an ``AssertionError``) naming the kernel, the program id, the kernel source line
(and the helper chain), the access, the nearest allocation and the offset in elements from its start, the
mask state of the bad lane and how many lanes were active. ``report`` counts launches, accesses and
checked addresses per kernel.

Importing this module does not import triton; ``check_bounds`` does (and refuses to run without the
interpreter).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
from collections import defaultdict

import numpy as np


class OutOfBounds(AssertionError):
    """An active lane of a load/store/atomic addressed memory outside every known allocation."""


@dataclasses.dataclass
class Allocation:
    name: str
    start: int
    end: int          # exclusive
    itemsize: int
    dtype: str

    def elements(self, addr: int) -> float:
        return (addr - self.start) / self.itemsize

    def __str__(self):
        n = (self.end - self.start) // max(self.itemsize, 1)
        return f"{self.name} ({self.dtype}, {n} elements at 0x{self.start:x}..0x{self.end:x})"


@dataclasses.dataclass
class KernelStats:
    launches: int = 0
    programs: int = 0
    accesses: int = 0
    lanes: int = 0          # addresses checked (active lanes)
    masked_off: int = 0     # lanes whose mask was False (not checked)


@dataclasses.dataclass
class BoundsReport:
    kernels: dict = dataclasses.field(default_factory=lambda: defaultdict(KernelStats))
    # one entry per launch: (kernel, signature) with the signature as a compiled kernel is specialised on it
    # (tensor dtypes and 16-byte alignment, ints == 1 / divisible by 16, constexprs, num_warps/num_stages)
    launches: list = dataclasses.field(default_factory=list)

    def specializations(self) -> set:
        """The distinct (kernel, signature) pairs launched: what would be compiled on a GPU."""
        return set(self.launches)

    @property
    def total_lanes(self) -> int:
        return sum(s.lanes for s in self.kernels.values())

    @property
    def total_accesses(self) -> int:
        return sum(s.accesses for s in self.kernels.values())

    def summary(self) -> str:
        rows = [f"{'kernel':24s} {'launches':>8s} {'programs':>8s} {'accesses':>10s} {'addresses':>12s} "
                f"{'masked off':>12s}"]
        for name, s in sorted(self.kernels.items()):
            rows.append(f"{name:24s} {s.launches:8d} {s.programs:8d} {s.accesses:10d} {s.lanes:12d} "
                        f"{s.masked_off:12d}")
        rows.append(f"{'total':24s} {sum(s.launches for s in self.kernels.values()):8d} "
                    f"{sum(s.programs for s in self.kernels.values()):8d} {self.total_accesses:10d} "
                    f"{self.total_lanes:12d} {sum(s.masked_off for s in self.kernels.values()):12d}")
        return "\n".join(rows)


def _tensor_extent(t):
    """[first byte, one past the last byte) of a strided tensor view (empty views: a zero-length range)."""
    itemsize = t.element_size()
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start, itemsize
    lo = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    hi = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st > 0)
    return start + lo * itemsize, start + (hi + 1) * itemsize, itemsize


def _signature(names, args_hst, kwargs_hst, opts, constexprs=()) -> tuple:
    def one(a, n=None):
        if n in constexprs:
            return repr(a)
        if hasattr(a, "data_ptr") and hasattr(a, "dtype"):
            return f"*{str(a.dtype).replace('torch.', '')}{'/16' if a.data_ptr() % 16 == 0 else ''}"
        if isinstance(a, float):
            return "fp32"      # float arguments are not specialised on their value
        if isinstance(a, bool) or not isinstance(a, int):
            return repr(a)
        return "i1" if a == 1 else "i/16" if a % 16 == 0 else "i"
    sig = [(n, one(a, n)) for n, a in zip(names, args_hst)]
    sig += [(k, one(v, k)) for k, v in sorted(kwargs_hst.items())]
    sig += [(k, repr(v)) for k, v in sorted(opts.items())]
    return tuple(sig)


class _Checker:
    def __init__(self, tensors, one_allocation_per_op: bool, source_filter):
        self.fixed = []
        for i, t in enumerate(tensors):
            name, t = t if isinstance(t, tuple) else (f"tensor[{i}]", t)
            self.fixed.append(self._alloc(name, t))
        self.one_allocation_per_op = one_allocation_per_op
        self.source_filter = source_filter
        self.report = BoundsReport()
        self.kernel = None
        self.allocs: list[Allocation] = []
        self._grid_idx = None
        self.violation = None
        self.pending_opts = {}
        self.pending_constexprs = ()

    @staticmethod
    def _alloc(name, t):
        start, end, itemsize = _tensor_extent(t)
        return Allocation(name, start, end, itemsize, str(t.dtype).replace("torch.", ""))

    # ------------------------------------------------------------------ launches
    def begin_launch(self, kernel, arg_names, args_hst, kwargs_hst):
        allocs = list(self.fixed)
        names = list(arg_names)

        def add(name, a):
            if hasattr(a, "data_ptr") and hasattr(a, "element_size"):
                a = getattr(a, "base", a) if type(a).__name__ == "TensorWrapper" else a
                allocs.append(self._alloc(name, a))
            elif isinstance(a, (tuple, list)):
                for j, x in enumerate(a):
                    add(f"{name}[{j}]", x)
            elif type(a).__name__ == "TensorDescriptor":
                add(f"{name}.base", a.base)

        for i, a in enumerate(args_hst):
            add(names[i] if i < len(names) else f"arg{i}", a)
        for k, a in kwargs_hst.items():
            add(k, a)
        self.kernel = kernel
        self.allocs = allocs
        starts = np.array([a.start for a in allocs], dtype=np.uint64)
        order = np.argsort(starts, kind="stable")
        self._sorted = [allocs[i] for i in order]
        self._starts = starts[order]
        self._ends = np.array([a.end for a in self._sorted], dtype=np.uint64)
        st = self.report.kernels[kernel]
        st.launches += 1
        self.report.launches.append((kernel, _signature(names, args_hst, kwargs_hst, self.pending_opts,
                                                                  self.pending_constexprs)))

    def end_launch(self):
        self.kernel = None

    # ------------------------------------------------------------------ accesses
    def _containing(self, lo: int, hi: int):
        """Allocations that wholly contain [lo, hi)."""
        return [a for a in self._sorted if a.start <= lo and hi <= a.end]

    def _nearest(self, addr: int) -> Allocation | None:
        best, dist = None, None
        for a in self._sorted:
            d = 0 if a.start <= addr < a.end else min(abs(addr - a.start), abs(addr - (a.end - 1)))
            if dist is None or d < dist:
                best, dist = a, d
        return best

    def _where(self) -> str:
        """The kernel source lines on the Python stack (the interpreter keeps file names and line numbers)."""
        frames = []
        f = sys._getframe(2)
        tdir = os.path.dirname(os.path.dirname(os.path.abspath(self._triton_file)))
        here = os.path.abspath(__file__)
        while f is not None:
            fn = os.path.abspath(f.f_code.co_filename)
            if not fn.startswith(tdir) and fn != here and (self.source_filter is None or self.source_filter(fn)):
                frames.append(f"{os.path.basename(fn)}:{f.f_lineno} {f.f_code.co_name}")
                if f.f_code.co_name == self.kernel:
                    break
            f = f.f_back
        return " <- ".join(frames) if frames else "?"

    def check(self, op: str, ptrs, mask, elem_ty):
        if self.kernel is None:   # a builder call outside a launch (e.g. a host-side helper): nothing to check
            return
        addrs = np.asarray(ptrs.data)
        shape = addrs.shape
        if mask is None:
            m = np.ones(shape, dtype=bool)
        else:
            m = np.broadcast_to(np.asarray(mask.data).astype(bool), shape)
        itemsize = max(1, elem_ty.primitive_bitwidth // 8)
        st = self.report.kernels[self.kernel]
        st.accesses += 1
        active = addrs[m].astype(np.uint64).ravel()
        st.lanes += int(active.size)
        st.masked_off += int(m.size - active.size)
        if active.size == 0:
            return
        # fast path: each address in the allocation with the largest start <= it (exact unless ranges overlap)
        idx = np.searchsorted(self._starts, active, side="right") - 1
        ok = idx >= 0
        safe = np.where(ok, idx, 0)
        ok &= active + np.uint64(itemsize) <= self._ends[safe]
        ok &= (active - self._starts[safe]) % np.uint64(itemsize) == 0
        if not ok.all():
            # slow path for the misses (overlapping views: another allocation may hold them)
            for j in np.flatnonzero(~ok):
                a = int(active[j])
                hit = [x for x in self._containing(a, a + itemsize) if (a - x.start) % itemsize == 0]
                if not hit:
                    self._fail(op, addrs, m, a, itemsize, "outside every allocation")
        if self.one_allocation_per_op:
            lo, hi = int(active.min()), int(active.max()) + itemsize
            if not self._containing(lo, hi):
                # all lanes are in some allocation, but not all in the same one
                first = self._containing(lo, lo + itemsize)[0]
                stray = int(active[(active < first.start) | (active + itemsize > first.end)][0])
                self._fail(op, addrs, m, stray, itemsize,
                           f"one access spans several allocations (its lowest lane is in {first.name})", ref=first)

    def _fail(self, op, addrs, m, bad, itemsize, why, ref=None):
        pos = np.argwhere((addrs.astype(np.uint64) == np.uint64(bad)) & m)
        lane = tuple(int(x) for x in pos[0]) if len(pos) else "?"
        near = ref if ref is not None else self._nearest(bad)
        if near is not None:
            off = near.elements(bad)
            n = (near.end - near.start) // near.itemsize
            off_s = f"{off:+.6g}" if off != int(off) else f"{int(off):+d}"
            side = ("beyond the end" if bad >= near.end else "before the start" if bad < near.start
                    else "inside, but the element is misaligned or straddles the end")
            rel = f"offset {off_s} elements from the start of {near} (valid 0..{n - 1}; {side})"
        else:
            rel = "no allocations known"
        msg = (f"{why}: {op} of {itemsize}-byte elements in kernel {self.kernel}, program "
               f"{self._grid_idx() if self._grid_idx else '?'}, at {self._where()}\n"
               f"  address 0x{bad:x}: {rel}\n"
               f"  lane {lane} of a {tuple(addrs.shape)} access; mask at that lane True; "
               f"{int(m.sum())} of {m.size} lanes active; allocations of this launch: "
               f"{', '.join(a.name for a in self.allocs)}")
        self.violation = OutOfBounds(msg)
        raise self.violation


_ACTIVE: list[_Checker] = []


@contextlib.contextmanager
def check_bounds(tensors=(), *, one_allocation_per_op: bool = True, source_filter=None):
    """Check every load/store/atomic of the Triton kernels launched inside the block (interpreter only).

    ``tensors``: extra allocations every launch may touch (tensors, or ``(name, tensor)`` pairs), besides the
    launch's own tensor arguments. ``source_filter(path) -> bool`` narrows the source frames named in
    errors. Yields a ``BoundsReport`` (per-kernel launches, accesses, checked addresses)."""
    import triton
    from triton.runtime import interpreter as I

    from . import common  # noqa: F401  (its interpreter shim: loops with a runtime bound under NumPy >= 2.4)

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("check_bounds needs TRITON_INTERPRET=1 (triton's CPU interpreter)")
    if _ACTIVE:
        raise RuntimeError("check_bounds does not nest")
    chk = _Checker(list(tensors), one_allocation_per_op, source_filter)
    chk._triton_file = triton.__file__
    chk._grid_idx = lambda: getattr(I.interpreter_builder, "grid_idx", None)
    B, G = I.InterpreterBuilder, I.GridExecutor
    saved = {(B, n): getattr(B, n) for n in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                              "create_atomic_cas", "set_grid_idx")}
    saved.update({(G, n): getattr(G, n) for n in ("__call__", "_init_args_hst")})
    orig_load, orig_store = saved[(B, "create_masked_load")], saved[(B, "create_masked_store")]
    orig_rmw, orig_cas = saved[(B, "create_atomic_rmw")], saved[(B, "create_atomic_cas")]
    orig_grid, orig_call, orig_init = saved[(B, "set_grid_idx")], saved[(G, "__call__")], saved[(G, "_init_args_hst")]

    def create_masked_load(self, ptrs, mask, other, *a, **k):
        chk.check("load", ptrs, mask, ptrs.get_element_ty())
        return orig_load(self, ptrs, mask, other, *a, **k)

    def create_masked_store(self, ptrs, value, mask, *a, **k):
        chk.check("store", ptrs, mask, ptrs.get_element_ty())
        return orig_store(self, ptrs, value, mask, *a, **k)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, *a, **k):
        chk.check("atomic_rmw", ptr, mask, ptr.get_element_ty())
        return orig_rmw(self, rmwOp, ptr, val, mask, *a, **k)

    def create_atomic_cas(self, ptr, cmp, val, *a, **k):
        chk.check("atomic_cas", ptr, None, ptr.get_element_ty())
        return orig_cas(self, ptr, cmp, val, *a, **k)

    def set_grid_idx(self, x, y, z):
        if chk.kernel is not None:
            chk.report.kernels[chk.kernel].programs += 1
        return orig_grid(self, x, y, z)

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        chk.pending_constexprs = tuple(getattr(self, "constexprs", ()))
        chk.begin_launch(getattr(self.fn, "__name__", "?"), self.arg_names, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        chk.violation = None
        spec = set(inspect.getfullargspec(self.fn).args)
        chk.pending_opts = {k: v for k, v in kwargs.items() if k not in spec}   # num_warps, num_stages, ...
        try:
            return orig_call(self, *args, **kwargs)
        except Exception as e:
            if chk.violation is not None:   # the interpreter wraps it in an InterpreterError: unwrap
                raise chk.violation from e
            raise
        finally:
            chk.end_launch()

    patches = {(B, "create_masked_load"): create_masked_load, (B, "create_masked_store"): create_masked_store,
               (B, "create_atomic_rmw"): create_atomic_rmw, (B, "create_atomic_cas"): create_atomic_cas,
               (B, "set_grid_idx"): set_grid_idx, (G, "_init_args_hst"): _init_args_hst, (G, "__call__"): __call__}
    _ACTIVE.append(chk)
    try:
        for (cls, name), fn in patches.items():
            setattr(cls, name, fn)
        yield chk.report
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)
        _ACTIVE.pop()


__all__ = ["check_bounds", "OutOfBounds", "BoundsReport"]
