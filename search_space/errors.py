"""The one error type of the search-space layer.

A `SpecError` is a `hqlt.blocks.configs.ConfigError` whose text is one line:

    <file>: <dotted key path>: <what is wrong>; allowed: <...> (did you mean '...'?)

`path` is the dotted key path inside the spec file (``space.model.mixer.mix``, ``sweep.budgets.max_params``);
`file` is the spec file as the user named it.
"""
from __future__ import annotations

from hqlt.blocks.configs import ConfigError


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class SpecError(ConfigError):
    def __init__(self, path: str, message: str, file: str = "<spec>"):
        message = one_line(message)
        super().__init__(path, message)
        self.file = str(file)
        self.args = (str(self),)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}: {where}{self.message}"

    def __reduce__(self):  # pickles (Ray ships exceptions between processes)
        return (SpecError, (self.path, self.message, self.file))


__all__ = ["SpecError", "one_line"]
