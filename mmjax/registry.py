"""Name -> constructor registries, so configs name encoders, fusion blocks, tasks and models by string.

A name is either a registered key ("cross_attention") or "package.module:key", which imports
`package.module` first: that is how a project or a user's own package adds an entry without the
library knowing it (`config.model.fusion = "my_pkg.fusion:gated_v2"`). Each registry's built-in
modules are listed where the registry is created (`modules=`) and imported on first lookup; this is
the one place the library imports a module for the entries it registers.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence


class Registry:
  """A named table of constructors.

  Attributes:
    kind: what the entries are ("encoder", "fusion", ...); used in error messages.
    modules: the modules that register the built-in entries, imported on the first lookup.
  """

  def __init__(self, kind: str, modules: Sequence[str] = ()):
    self.kind = kind
    self.modules = tuple(modules)
    self._loaded = not self.modules
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` under `name`; a duplicate name is an error."""

    def deco(fn):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = fn
      return fn

    return deco

  def _load_builtins(self) -> None:
    if not self._loaded:
      for module in self.modules:
        importlib.import_module(module)
      self._loaded = True  # only now: a module that failed to import fails every lookup, not just the first

  def _resolve(self, name: str) -> str:
    """The key of `name`, importing the module of a "package.module:key" name."""
    if not isinstance(name, str):
      raise KeyError(f"{self.kind}: expected a name (str), got {type(name).__name__} {name!r}")
    module, sep, key = name.rpartition(":")
    if sep:
      try:
        importlib.import_module(module)
      except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
          raise  # the module exists; one of its own imports is missing
        raise KeyError(f"{self.kind} {name!r}: cannot import module {module!r} ({e})") from e
    if key not in self._entries:  # built-ins load only when needed (a script's own entry needs none)
      self._load_builtins()
    return key

  def get(self, name: str) -> Callable[..., Any]:
    key = self._resolve(name)
    if key not in self._entries:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
    return self._entries[key]

  def build(self, name: str, **kwargs) -> Any:
    return self.get(name)(**kwargs)

  def names(self) -> list[str]:
    self._load_builtins()
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    try:
      return self._resolve(name) in self._entries
    except KeyError:
      return False
