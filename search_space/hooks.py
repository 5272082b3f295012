"""The torch-side checks the search space needs, injected as plain module-level callables.

search_space knows nothing of torch, models or tasks. Whoever has them (``hqlt.orchestration.space_hooks``)
hands them in as a `Hooks` tuple of module-level functions, so a compiled space that holds them still pickles
(functions pickle by qualified name):

- ``check(plain_trial_config) -> None``: raise ``ConfigError`` (dotted path + allowed values) if invalid;
- ``estimate(plain_trial_config) -> {"model/params": .., "model/fw_state_bytes": .., "model/kv_cache_bytes": ..}``:
  also validates (raises ``ConfigError``) — when given, `check` is not called in addition;
- ``paths(plain_trial_config) -> iterable of dotted key paths`` the trial config schema knows for this config
  (fields of the dataclasses with their defaults, registry options of the named parts, the task's options).

Every member may be None; validation then skips what it cannot check.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional


class Hooks(NamedTuple):
    check: Optional[Callable[[dict], None]] = None
    estimate: Optional[Callable[[dict], dict]] = None
    paths: Optional[Callable[[dict], Iterable[str]]] = None

    def validate(self, plain: dict) -> Optional[dict]:
        """Run the strongest available check; return the estimate metrics when there is an estimator."""
        if self.estimate is not None:
            return dict(self.estimate(plain))
        if self.check is not None:
            self.check(plain)
        return None

    @property
    def can_check(self) -> bool:
        return self.estimate is not None or self.check is not None


NO_HOOKS = Hooks()


def as_hooks(hooks: Any) -> Hooks:
    if hooks is None:
        return NO_HOOKS
    if isinstance(hooks, Hooks):
        return hooks
    if isinstance(hooks, dict):
        return Hooks(**hooks)
    raise TypeError(f"hooks must be a search_space.Hooks (or a dict of check/estimate/paths), got {type(hooks).__name__}")


__all__ = ["Hooks", "NO_HOOKS", "as_hooks"]
