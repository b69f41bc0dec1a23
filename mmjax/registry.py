"""Name -> constructor registries, so configs name encoders, fusion blocks and models by string."""

from __future__ import annotations

from typing import Any, Callable


class Registry:
  """A named table of constructors.

  Attributes:
    kind: what the entries are ("encoder", "fusion", ...); used in error messages.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` under `name`; a duplicate name is an error."""

    def deco(fn):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = fn
      return fn

    return deco

  def get(self, name: str) -> Callable[..., Any]:
    if not isinstance(name, str) or name not in self._entries:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
    return self._entries[name]

  def build(self, name: str, **kwargs) -> Any:
    return self.get(name)(**kwargs)

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
