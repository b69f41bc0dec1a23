"""LoRA (Hu et al. 2021): low-rank adapters on the Dense layers whose path matches a regex.

`apply_lora` wraps each matching `nnx.Linear` in a `LoRADense` (base kernel and bias untouched,
plus `lora_a` (in, r) and `lora_b` (r, out) as `nnx.LoRAParam`, b initialised to zero so the
wrapped model starts equal to the original); `merge_lora` folds the adapters back into plain
`nnx.Linear` layers for export. Train only the adapters with optimizer groups, e.g.
`[{"name": "lora", "pattern": ".*/lora_[ab]"}, {"name": "frozen", "pattern": ".*", "freeze": True}]`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.layers.common import part


class LoRADense(nnx.Module):
  """y = base(x) + (alpha / rank) * x @ lora_a @ lora_b.

  Attributes:
    base: the wrapped `nnx.Linear` (its parameters keep their paths under `base/`).
    lora_a: (in, rank) adapter, He-uniform init, logical axes (in axis of the base, None).
    lora_b: (rank, out) adapter, zero init.
  """

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"lora rank: expected a positive int, got {rank!r}")
    names = base.kernel.get_metadata().get("logical_axes") or (None, None)
    d_in, d_out = base.kernel[...].shape
    self.base = base
    self.rank, self.scale = int(rank), float(alpha) / float(rank)
    init_a = part(nnx.initializers.he_uniform(), (names[0], None))
    init_b = part(nnx.initializers.zeros_init(), (None, names[1]))
    dtype = base.kernel[...].dtype
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (d_in, rank), dtype))
    self.lora_b = nnx.LoRAParam(init_b(rngs.params(), (rank, d_out), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    a = self.lora_a[...].astype(y.dtype)
    b = self.lora_b[...].astype(y.dtype)
    return y + (x.astype(y.dtype) @ a @ b) * jnp.asarray(self.scale, y.dtype)

  def merged(self) -> nnx.Linear:
    """The base layer with the adapter folded into its kernel (a new module)."""
    out = nnx.clone(self.base)
    delta = (self.lora_a[...] @ self.lora_b[...]) * self.scale
    out.kernel[...] = (out.kernel[...] + delta).astype(out.kernel[...].dtype)
    return out


def _path(p) -> str:
  return "/".join(str(k) for k in p)


def _set_child(model: nnx.Module, path: tuple, value) -> None:
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def apply_lora(model: nnx.Module, pattern: str, *, rank: int, alpha: float | None = None,
               rngs: nnx.Rngs) -> list[str]:
  """Wraps every `nnx.Linear` whose path ('encoders/text/encoder/layers/0/attn/query') matches `pattern`.

  `alpha` defaults to `rank` (scale 1). Returns the wrapped paths; matching nothing is an error.
  """
  rx = re.compile(pattern)
  targets = [(p, node) for p, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Linear) and p and rx.search(_path(p))
             and not (len(p) > 1 and p[-1] == "base")]
  if not targets:
    raise ValueError(f"lora pattern {pattern!r} matches no Dense layer")
  for p, node in targets:
    _set_child(model, p, LoRADense(node, rank, rank if alpha is None else alpha, rngs=rngs))
  return [_path(p) for p, _ in targets]


def merge_lora(model: nnx.Module) -> list[str]:
  """Replaces every `LoRADense` by its merged `nnx.Linear`, in place; returns their paths."""
  targets = [(p, node) for p, node in nnx.iter_graph(model) if isinstance(node, LoRADense)]
  for p, node in targets:
    _set_child(model, p, node.merged())
  return [_path(p) for p, _ in targets]
