"""Logical axis names -> mesh axes.

Model code names axes logically (`batch`, `length`, `embed`, `mlp`, `heads`, `vocab`, ...); a list
of rules maps them onto mesh axes (`data`, `fsdp`, `tensor`). Rules follow flax.linen's semantics:
for each logical axis, the first rule whose pattern fully matches and whose mesh axes are not yet
used in the same PartitionSpec wins; no rule means replicated. Patterns are regular expressions.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Batch over data and fsdp; parameters' embed dim over fsdp (ZeRO-3 style); wide dims over tensor.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    # FSDP for kernels without an embed axis (e.g. a head's (mlp, vocab)) where "tensor" has size 1.
    # No such fallback for "vocab": a (mlp, vocab) kernel with vocab on fsdp beside its bias on
    # tensor (a data x fsdp x tensor mesh) is partitioned into wrong results by XLA:CPU (jax 0.10.2).
    ("mlp", "fsdp"),
)

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("mmjax_rules", default=None)
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mmjax_mesh", default=None)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from {axis: size}; one size may be -1 to take the remaining devices.

  Without -1, a mesh smaller than the device count uses the first devices (with a warning).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = list(shape), list(shape.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  need = int(np.prod(sizes))
  if need > len(devices):
    raise ValueError(f"mesh shape {dict(zip(names, sizes))} needs {need} devices, have {len(devices)}")
  if need < len(devices):
    logging.getLogger(__name__).warning("mesh %s uses %d of %d devices", dict(zip(names, sizes)), need, len(devices))
    devices = devices[:need]
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
  if slices > 1:  # multi-slice: jax.make_mesh refuses it; one axis spans the slices over the slower DCN
    across = next((i for i, s in enumerate(sizes) if s % slices == 0), None)
    if across is None:
      raise ValueError(f"mesh shape {dict(zip(names, sizes))}: no axis divisible by the {slices} slices")
    ici = [s // slices if i == across else s for i, s in enumerate(sizes)]
    dcn = [slices if i == across else 1 for i in range(len(sizes))]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, tuple(names), axis_types=axis_types)
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=axis_types, devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec using `rules` (see module docstring).

  With `mesh`, mesh axes of size 1 are left out (a rule left with none gives way to the next, so a
  fallback such as ("mlp", "fsdp") applies when "tensor" has size 1); with `shape` too, a rule whose
  axes do not divide its dimension gives way (e.g. 3,129 answers over 4 chips).
  """
  if names is None:
    return P()
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    chosen = None
    if name is not None:
      for pattern, axes in rules:
        if not re.fullmatch(pattern, name):
          continue
        tup = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if mesh is not None:
          if any(a not in mesh.shape for a in tup):
            continue
          if tup and not (tup := tuple(a for a in tup if mesh.shape[a] > 1)):
            continue
          if tup and shape is not None and shape[i] % int(np.prod([mesh.shape[a] for a in tup])):
            continue
        if any(a in used for a in tup):
          continue
        used.update(tup)
        chosen = None if not tup else (tup[0] if len(tup) == 1 else tup)
        break
    out.append(chosen)
  return P(*out)


@contextlib.contextmanager
def axis_rules(rules: Rules, mesh: Mesh | None = None) -> Iterator[None]:
  """Activates logical rules (and a mesh) for `constrain` inside model code."""
  t1, t2 = _RULES.set(tuple(rules)), _MESH.set(mesh)
  try:
    yield
  finally:
    _RULES.reset(t1)
    _MESH.reset(t2)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `axis_rules` with a mesh."""
  rules, mesh = _RULES.get(), _MESH.get()
  if rules is None or mesh is None or mesh.size == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State, rules: Rules, mesh: Mesh | None = None) -> nnx.State:
  """The state's tree with each variable's value replaced by its PartitionSpec.

  Specs come from each variable's `logical_axes` metadata (none: replicated); the tree keeps the
  state's structure, so it can serve directly as `in_shardings`/`out_shardings` for the state.
  """

  def spec(v):
    return v.replace(logical_to_spec(v.get_metadata().get("logical_axes"), rules, mesh, v.value.shape))

  return jax.tree.map(spec, state, is_leaf=_is_var)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """Like `param_specs`, with NamedShardings on `mesh`."""
  specs = param_specs(state, rules, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def init_sharded(ctor, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Constructs `ctor()` (an NNX module) with every parameter created directly in its sharding.

  The abstract model comes from `nnx.eval_shape`, so no full host copy of the parameters exists.
  """
  abstract = nnx.eval_shape(ctor)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abs_state, mesh, rules)

  def init():
    return nnx.split(ctor())[1]

  with jax.set_mesh(mesh), axis_rules(rules, mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
