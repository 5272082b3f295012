"""HQLT_OP_WATCH=FILE: log every redefinition or destruction of an ``hqlt::`` custom op with its stack, and after
each test whether every op's registration is still the live one (``hqlt.kernels.testing.watch_op_registry``;
for the GPU runs in kernels/FUSED_NOTES.md, "Round 5"). Unset: it does nothing.

A test module's ``QUICK`` (patterns of test names, parameters included; ``*`` matches anything, every other character
itself) marks those tests ``quick``: the README's short run of the Triton kernels in the CPU interpreter selects
them with ``-m quick``."""
import fnmatch
import os

import pytest


def _quick_match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))   # "[": literal, not fnmatch's character class


@pytest.fixture
def quick_match():
    """The rule by which a ``QUICK`` pattern selects a test name (for the test that keeps the patterns live)."""
    return _quick_match


def pytest_collection_modifyitems(config, items):
    for item in items:
        patterns = getattr(getattr(item, "module", None), "QUICK", ())
        if any(_quick_match(item.name, p) for p in patterns):
            item.add_marker(pytest.mark.quick)


WATCH = os.environ.get("HQLT_OP_WATCH")
if WATCH:
    from hqlt.kernels.testing import hqlt_op_libraries, watch_op_registry
    watch_op_registry(WATCH)

    @pytest.fixture(autouse=True)
    def _op_registry_after_each_test(request):
        yield
        broken = sorted(name for name, live in hqlt_op_libraries().items() if not live)
        with open(WATCH, "a") as fh:
            fh.write(f"after {request.node.nodeid}: {'ops intact' if not broken else 'NOT LIVE ' + ' '.join(broken)}\n")
