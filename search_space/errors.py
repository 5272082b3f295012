"""The one error type of the search-space layer.

A `SpecError` is a `hqlt.blocks.validation.ConfigError` whose text is one line:

    <file>: <dotted key path>: <what is wrong>; allowed: <...> (did you mean '...'?)

`path` is the dotted key path inside the spec file (``space.model.mixer.mix``, ``sweep.budgets.max_params``);
`file` is the spec file as the user named it; with ``file=None`` the text is ConfigError's
``<dotted key path>: <what is wrong>`` (a `key=value` override that names no file).
"""
from __future__ import annotations

from typing import Any, Optional

from hqlt.blocks.validation import ConfigError


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class SpecError(ConfigError):
    def __init__(self, path: str, message: str, file: Optional[str] = "<spec>"):
        message = one_line(message)
        super().__init__(path, message)
        self.file = None if file is None else str(file)
        self.args = (str(self),)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}" if self.file is None else f"{self.file}: {where}{self.message}"

    def __reduce__(self):  # pickles (Ray ships exceptions between processes)
        return (SpecError, (self.path, self.message, self.file))


def fmt_number(x: Any) -> str:
    """1e6-style for big numbers (messages)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


__all__ = ["SpecError", "fmt_number", "one_line"]
