"""Config loading: `ml_collections` Python files with `get_config(arg)`, plus dotted overrides.

Configs are Python files by design (as in big_vision): loading one runs its code, so only load
configs you trust. Data (manifests, records) is never evaluated as code.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'size=small,fusion=film' -> ConfigDict over `defaults`; unknown keys are errors."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value (known keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    out[key] = _literal(value, type(defaults[key]))
  return out


def _literal(text: str, want: type) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if want is str and not isinstance(value, str):
    value = text
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
    value = value.lower() == "true"
  return value


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' and applies 'a.b=value' overrides (unknown keys are errors)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("mmjax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config(arg) function")
  config = module.get_config(arg) if arg else module.get_config()  # as absl's config_flags
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r}: expected key=value")
    set_path(config, key.strip().removeprefix("config."), value.strip())
  return config


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """Command-line arguments -> (config spec, 'key=value' overrides, the other arguments).

  `--config FILE[:arg]` (or `--config=...`) names the config; `--config.a.b=VALUE` (or
  `--config.a.b VALUE`) overrides a key. The scripts load the config with `load_config`, as
  notebooks, tests and benchmarks do, and hand the rest to absl.
  """
  spec, overrides, rest = None, [], [argv[0]] if argv else []
  args = list(argv[1:])
  while args:
    a = args.pop(0)
    name, eq, value = a.partition("=")
    if name in ("--config", "-config") or name.startswith(("--config.", "-config.")):
      if not eq:
        if not args:
          raise ValueError(f"{a}: expected a value")
        value = args.pop(0)
      if name.lstrip("-") == "config":
        spec = value
      else:
        overrides.append(f"{name.lstrip('-').removeprefix('config.')}={value}")
    else:
      rest.append(a)
  return spec, overrides, rest


class CommandLineConfig:
  """The `--config FILE[:arg]` and `--config.KEY=VALUE` arguments of a script run by absl.app.

  `parse` is the script's `flags_parser`: it takes the config arguments out of argv (absl cannot
  parse dotted overrides) and hands the rest to absl. `load()` loads what they named, exiting with
  a message that names the script on a missing file or a bad key.
  """

  def __init__(self, prog: str):
    self.prog = prog
    self.spec: str | None = None
    self.overrides: list[str] = []

  def parse(self, argv: Sequence[str]) -> list[str]:
    from absl import flags

    try:
      self.spec, self.overrides, rest = split_config_args(argv)
    except ValueError as e:
      sys.exit(f"{self.prog}: {e}")
    if self.spec is None:
      sys.exit(f"{self.prog}: --config is required (e.g. --config configs/vqa.py:size=tiny)")
    return flags.FLAGS(rest)

  def load(self) -> ml_collections.ConfigDict:
    try:
      return load_config(self.spec, self.overrides)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
      sys.exit(f"{self.prog}: config: {e}")


def set_path(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  node = config
  parts = dotted.split(".")
  for i, p in enumerate(parts[:-1]):
    if p not in node:
      raise KeyError(f"config key {'.'.join(parts[:i + 1])!r} does not exist")
    node = node[p]
  leaf = parts[-1]
  if leaf not in node:
    raise KeyError(f"config key {dotted!r} does not exist; siblings: {sorted(node.keys())}")
  current = node[leaf]
  node[leaf] = _literal(text, type(current)) if current is not None else _literal(text, object)


def standard_optim_and_train(c: ml_collections.ConfigDict, steps: int, *, tiny: bool) -> None:
  """Adds the shared `optim`, `train`, `mesh` and `model_init` sections of the task configs to `c`: AdamW
  with warmup + cosine, clipping at 1, eval/checkpoint every tenth of the run (tiny runs: once,
  at the end), a data-parallel mesh over every device."""
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3 if tiny else 1e-3
  c.optim.warmup_steps = max(steps // 20, 1)
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 1e-4
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1
  c.optim.groups = []

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.log_every = max(steps // 100, 1)
  c.train.eval_every = steps if tiny else max(steps // 10, 1)
  c.train.checkpoint_every = c.train.eval_every
  c.train.keep = 2

  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  # Pretrained weights after init (not on resume): a source for the whole model, or
  # {"encoders/text": source, ...}; a source is a Hugging Face folder, a big_vision .npz or "minilm"
  # (`mmjax.transfer.model_init`). None = none.
  c.model_init = None
