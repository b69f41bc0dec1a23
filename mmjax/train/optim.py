"""Optax chains with named parameter groups: per-group learning rate, schedule, decay, freezing.

A config lists groups; each group has a regex over parameter paths ("encoders/image/.*",
"encoders/text/.*") and its own settings. Every parameter belongs to the first group whose
pattern matches it, or to the default group. Underneath this is `optax.multi_transform`; a
frozen group gets `set_to_zero`, so its parameters do not change by one bit.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx

DEFAULT_GROUP = "default"


def path_str(path: Sequence[Any]) -> str:
  """'encoders/image/encoder/layers/0/attn/query/kernel' from a pytree key path."""
  parts = []
  for k in path:
    k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(k))
  return "/".join(parts)


def schedule(lr: float, *, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
             end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then `kind` in {'cosine', 'linear', 'constant'} to end_factor*lr."""
  if kind not in ("cosine", "linear", "constant"):
    raise ValueError(f"optim schedule: expected 'cosine', 'linear' or 'constant', got {kind!r}")
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
  elif kind == "linear":
    main = optax.linear_schedule(lr, lr * end_factor, decay_steps)
  else:
    main = optax.constant_schedule(lr)
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def group_labels(params: Any, groups: Sequence[Mapping[str, Any]]) -> Any:
  """The group name of every leaf of `params`: the first group whose pattern fully matches the
  leaf's path ('encoders/text/encoder/layers/0/attn/query/kernel'), else 'default'."""
  compiled = [(g["name"], re.compile(g["pattern"])) for g in groups]

  def name_of(p: str) -> str:
    for name, rx in compiled:
      if rx.fullmatch(p):
        return name
    return DEFAULT_GROUP

  def label(path, leaf):
    if isinstance(leaf, nnx.Variable):  # keep the Variable node so the tree matches `params`
      return leaf.replace(name_of(path_str(path)))
    return name_of(path_str(path))

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def frozen_mask(cfg: Mapping[str, Any], params: Any) -> Any:
  """True on every leaf of `params` whose group is frozen (same tree structure as `params`).

  The train step stops gradients at these leaves, so XLA drops the backward pass through a fully
  frozen encoder and frozen gradients (zeros) do not count in the global norm that clipping uses.
  """
  frozen = {g["name"] for g in (cfg.get("groups", ()) or ()) if g.get("freeze", False)}
  return jax.tree.map(lambda name: name in frozen, group_labels(params, cfg.get("groups", ()) or ()))


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices and conv kernels only (not biases, norms, embeddings tables' 1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _group_tx(g: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  if g.get("freeze", False):
    return optax.set_to_zero()
  lr = schedule(g["lr"], total_steps=total_steps, warmup_steps=g.get("warmup_steps", 0),
                kind=g.get("schedule", "cosine"), end_factor=g.get("end_factor", 0.0))
  return optax.adamw(lr, b1=g.get("b1", 0.9), b2=g.get("b2", 0.999), eps=g.get("eps", 1e-8),
                     weight_decay=g.get("weight_decay", 0.0), mask=_decay_mask)


KNOWN_GROUP_KEYS = {"name", "pattern", "lr", "warmup_steps", "schedule", "end_factor",
                    "weight_decay", "freeze", "b1", "b2", "eps"}


def make_optimizer(cfg: Mapping[str, Any], params: Any, total_steps: int) -> optax.GradientTransformation:
  """AdamW per group, global-norm clipping and gradient accumulation, from an `optim` config.

  cfg: {lr, warmup_steps, schedule, weight_decay, clip_norm, grad_accum, groups: [{name, pattern,
  lr | freeze, ...}]}; group keys not given inherit the top-level values. `total_steps`: training
  steps (batches, `train.steps`), a multiple of `grad_accum`. Schedules, warmup included, count
  optimizer updates: one every `grad_accum` steps, `total_steps // grad_accum` in all.
  """
  accum = int(cfg.get("grad_accum", 1) or 1)
  if accum < 1 or total_steps % accum:
    raise ValueError(f"optim.grad_accum={accum}: expected a positive divisor of train.steps={total_steps} "
                     "(each optimizer update takes grad_accum steps; a remainder would never be applied)")
  total_steps //= accum  # MultiSteps advances the inner optimizer (and its schedule) once per update
  base = {k: cfg[k] for k in ("lr", "warmup_steps", "schedule", "end_factor", "weight_decay",
                              "b1", "b2", "eps") if k in cfg}
  if "lr" not in base:
    raise ValueError("optim.lr is required")
  groups = []
  for i, g in enumerate(cfg.get("groups", ()) or ()):
    g = dict(g)
    unknown = set(g) - KNOWN_GROUP_KEYS
    if unknown:
      raise ValueError(f"optim.groups[{i}]: unknown keys {sorted(unknown)}; known: {sorted(KNOWN_GROUP_KEYS)}")
    if "name" not in g or "pattern" not in g:
      raise ValueError(f"optim.groups[{i}]: needs 'name' and 'pattern'")
    groups.append({**base, **g})
  names = [g["name"] for g in groups]
  if len(set(names)) != len(names) or DEFAULT_GROUP in names:
    raise ValueError(f"optim.groups: names must be unique and not {DEFAULT_GROUP!r}, got {names}")
  labels = group_labels(params, groups)
  txs = {g["name"]: _group_tx(g, total_steps) for g in groups}
  txs[DEFAULT_GROUP] = _group_tx(base, total_steps)
  used = set(jax.tree.leaves(labels))
  for g in groups:
    if g["name"] not in used:
      raise ValueError(f"optim.groups: pattern {g['pattern']!r} of group {g['name']!r} matches no parameter")
  chain = []
  if cfg.get("clip_norm"):
    chain.append(optax.clip_by_global_norm(cfg["clip_norm"]))
  chain.append(optax.multi_transform(txs, labels))
  tx = optax.chain(*chain)
  return optax.MultiSteps(tx, every_k_schedule=accum) if accum > 1 else tx


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def params_of(model: nnx.Module) -> nnx.State:
  return nnx.state(model, nnx.Param)
