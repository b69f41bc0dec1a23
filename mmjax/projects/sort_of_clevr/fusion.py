"""Cross-attention with a distance-biased second hop, for Sort-of-CLEVR's relational questions.

`spatial` names a modality whose tokens form a square, row-major grid (an image's feature map).
From the second layer on, each head then adds s_h(query) * |p_j - c_h|^2 to its logits over
the grid: p_j is grid token j's (row, column), c_h the centroid of the same head's attention
over the grid in the previous layer (where that head's previous hop looked), s_h a signed
per-query scale (at initialisation a constant per head, `distance_init`). A question such as
"which object is closest to the red one" is then one hop to find the red object and one to
prefer what lies near (s < 0) or far (s > 0) from it, the comparison of positions a relation
network makes for every object pair. With `revisit`, a second per-query scale weighs the cells
the previous hop looked at, so that a hop can leave out the object it started from.

Built on the library's extension points: `DistanceCrossModalLayer` creates the per-query scales
(before the parent's parameters, the order the keys are drawn in), and
`DistanceCrossAttentionFusion.layer_bias` adds the bias to the cross-attention logits. Layers
whose weights the next one reads run the reference attention kernel.
Named in configs as "mmjax.projects.sort_of_clevr.fusion:distance_cross_attention".
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.fusion.base import FUSIONS, FusionInputs
from mmjax.fusion.cross_attention import CrossAttentionFusion, CrossModalLayer
from mmjax.layers import dense
from mmjax.layers.common import zeros


class DistanceCrossModalLayer(CrossModalLayer):
  """A `CrossModalLayer` with the per-query scales of the distance (and revisit) bias.

  Attributes:
    spatial: the grid modality (None: no bias, a plain layer).
    distance_scale: name -> dense (F -> H), s_h(query), per updated stream other than `spatial`.
    revisit_scale: the same for u_h(query) with `revisit`, else None.
  """

  def __init__(self, names: Sequence[str], features: int, num_heads: int, mlp_dim: int, *,
               update: Sequence[str] | None = None, spatial: str | None = None,
               revisit: bool = False, distance_init: float = 0.0, revisit_init: float = 0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    streams = tuple(update) if update is not None else tuple(names)
    self.spatial = spatial

    def per_query_scales():  # one (features -> heads) map per stream that attends over the grid
      return nnx.Dict({m: dense(features, num_heads, ("embed", "heads"), kernel_init=zeros, **kw)
                       for m in streams if m != spatial})

    if spatial is not None:
      self.distance_scale = per_query_scales()
    self.revisit_scale = per_query_scales() if spatial is not None and revisit else None
    if spatial is not None:  # initial per-head scales: even heads near (-), odd heads far (+)
      signs = jnp.where(jnp.arange(num_heads) % 2 == 0, -1.0, 1.0)
      for lin in self.distance_scale.values():
        lin.bias[...] = (distance_init * signs).astype(param_dtype)
      for lin in (self.revisit_scale or {}).values():
        lin.bias[...] = jnp.full((num_heads,), revisit_init, param_dtype)
    super().__init__(names, features, num_heads, mlp_dim, update=update, **kw, **kwargs)

  def _distance_bias(self, m: str, query: jax.Array, previous: jax.Array, coords: jax.Array,
                     start: int, length: int) -> jax.Array:
    """(B, H, L_m, length) logits bias: zero outside the grid's tokens [start, start + N).
    `previous` (B, H, L_m, length): the previous layer's weights, head h's for head h."""
    n = coords.shape[0]
    where = previous[..., start:start + n].astype(jnp.float32)  # (B, H, L_m, N)
    mass = jnp.sum(where, axis=-1, keepdims=True)  # < 1 when other tokens share the context
    centre = jnp.einsum("bhqn,nc->bhqc", where / jnp.maximum(mass, 1e-6), coords)  # (B, H, L_m, 2)
    dist2 = jnp.sum(jnp.square(coords - centre[..., None, :]), axis=-1)  # (B, H, L_m, N)
    scale = self.distance_scale[m](query).astype(jnp.float32)  # (B, L_m, H)
    bias = jnp.swapaxes(scale, 1, 2)[..., None] * dist2
    if self.revisit_scale is not None:  # u_h(query) * where head h looked, relative to its peak
      peak = where / jnp.maximum(jnp.max(where, axis=-1, keepdims=True), 1e-6)  # (B, H, L_m, N)
      bias = bias + jnp.swapaxes(self.revisit_scale[m](query).astype(jnp.float32), 1, 2)[..., None] * peak
    return jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (start, length - start - n)))


@FUSIONS.register("distance_cross_attention")
class DistanceCrossAttentionFusion(CrossAttentionFusion):
  """`CrossAttentionFusion` whose layers after the first add the distance bias over `spatial`.

  Takes `CrossAttentionFusion`'s arguments and:
    spatial: a modality whose N tokens are a square row-major grid: layers after the first add
      the distance bias of the module docstring to the attention over it (None: off, the plain
      block).
    revisit: with `spatial`, each head also adds u_h(query) * w_hj / max_j w_hj, w_h its own
      attention over the grid in the previous layer, u_h a signed per-query scale (at
      initialisation the constant `revisit_init`): u < 0 looks away from what the previous hop
      found ("the object closest to the red one" is near it but not it), u > 0 looks at it again.
    distance_init, revisit_init: the initial s_h and u_h (their biases; the query-dependent parts
      start at zero): s_h = -distance_init for even heads (near), +distance_init for odd heads
      (far), u_h = revisit_init. Non-zero values let a head whose previous hop found an object
      look near or far from it from the first step, instead of waiting for s to grow.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, depth: int = 2,
               spatial: str | None = None, revisit: bool = False, distance_init: float = 0.0,
               revisit_init: float = 0.0, rngs: nnx.Rngs, **kwargs):
    # Read by make_layer while the parent builds the layers.
    self.spatial, self._distance = spatial, dict(revisit=revisit, distance_init=distance_init,
                                                 revisit_init=revisit_init)
    super().__init__(modalities, features, depth=depth, rngs=rngs, **kwargs)
    self.spatial = None if spatial is None else self._check_member("spatial", spatial)
    if revisit and self.spatial is None:
      raise ValueError("revisit=True: expected spatial= to name the grid it applies to "
                       "(with spatial=None, set revisit=False too)")
    if self.spatial is not None and depth < 2:
      raise ValueError(f"spatial={spatial!r}: the distance bias acts from the second layer on; "
                       f"expected depth >= 2, got {depth} (for one layer set spatial=None)")
    if self.spatial is not None and set(self.update) <= {self.spatial}:
      raise ValueError(f"spatial={spatial!r}: expected another modality in update={self.update} "
                       "to attend over its grid")
    self.bias_uses_weights = self.spatial is not None

  def make_layer(self, i: int, *args, **kwargs) -> DistanceCrossModalLayer:
    return DistanceCrossModalLayer(*args, spatial=self.spatial if i else None, **self._distance, **kwargs)

  def layer_bias(self, i: int, layer: DistanceCrossModalLayer, m: str, query: jax.Array,
                 previous: dict[str, jax.Array] | None, x: FusionInputs) -> jax.Array | None:
    """The distance bias over the grid from the second layer on, for streams other than the grid."""
    if i == 0 or self.spatial is None or m == self.spatial:
      return None
    slots = self.context_slots(m, x)
    start, n = slots[self.spatial]
    length = sum(1 + k for _, k in slots.values())  # each modality's missing slot and tokens
    coords = _grid_positions(self.spatial, x.tokens[self.spatial].shape[1])
    return layer._distance_bias(m, query, previous[m], coords, start, length)


def _grid_positions(name: str, n: int) -> jax.Array:
  """(n, 2) (row, column) of the tokens of a square row-major grid of n cells."""
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"spatial={name!r}: expected its tokens to form a square grid, got {n} tokens")
  return jnp.asarray(np.stack(np.divmod(np.arange(n), side), axis=-1), jnp.float32)
