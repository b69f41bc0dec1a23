"""Small shared helpers for layers: partitioned initialisers, dense layers, norms, activations."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

default_kernel_init = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def part(init: Callable, names: Sequence[str | None]) -> Callable:
  """Attaches logical axis names to an initialiser (read back by `mmjax.sharding.param_specs`).

  The names are stored as `logical_axes` metadata rather than flax's `out_sharding`, so modules
  can be built with or without a mesh; `mmjax.sharding.init_sharded` places them on a mesh.
  """
  return nnx.with_metadata(init, logical_axes=tuple(names))


def dense(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
) -> nnx.Linear:
  """An `nnx.Linear` whose kernel has logical axes `names` and whose bias has `names[1]`."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=part(kernel_init, names),
      bias_init=part(zeros, (names[1],)),
      rngs=rngs,
  )


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nnx.LayerNorm:
  """`nnx.LayerNorm` over the last axis; with a bf16 `dtype` flax computes the mean, variance and
  normalisation in float32 and casts the output to bf16."""
  return nnx.LayerNorm(
      features,
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=part(ones, ("norm",)),
      bias_init=part(zeros, ("norm",)),
      rngs=rngs,
  )


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x * Phi(x) in x's dtype.

  In float32 (and wider) `jax.nn.gelu(x, approximate=False)`, whose erfc keeps the negative tail
  accurate. In 16-bit dtypes that erfc, which has no XLA op, expands into ~90 float32 ops on the
  (B, L, mlp) activations, so there it is PyTorch's form 0.5 x (1 + erf(x / sqrt(2))): one XLA
  op in x's dtype.
  """
  if jnp.finfo(x.dtype).bits >= 32:
    return jax.nn.gelu(x, approximate=False)
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.5 ** 0.5))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,  # BERT / ViT use the exact erf form.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP.
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def check_rank(x: jax.Array, rank: int, field: str, shape_doc: str) -> None:
  """Raises a ValueError naming `field` when `x` is not of rank `rank`."""
  if getattr(x, "ndim", None) != rank:
    raise ValueError(f"{field}: expected shape {shape_doc}, got {getattr(x, 'shape', type(x).__name__)}")
