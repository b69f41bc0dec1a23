"""Two-stream (here M-stream) cross-modality encoder, after LXMERT (Tan & Bansal 2019, arXiv 1908.07490).

Each layer first lets every stream cross-attend to the other streams (with three or more
modalities, to their concatenation), then runs self-attention and an MLP per stream. As in
LXMERT the cross-attention weights are shared by all directions and the sub-layers are post-LN
(BERT style): x = LN(x + CrossAtt(x, others)); x = LN(x + SelfAtt(x)); x = LN(x + MLP(x)).

`update` restricts which streams the layers rewrite: with `update=("text",)` only the question
attends to (fixed) image tokens, a decoder-style one-way fusion whose cost does not grow with
the number of image tokens per question beyond the attention itself.

`spatial` names a modality whose tokens form a square, row-major grid (an image's feature map).
From the second layer on, each head then adds s_h(query) * |p_j - c_h|^2 to its logits over
the grid: p_j is grid token j's (row, column), c_h the centroid of the same head's attention
over the grid in the previous layer (where that head's previous hop looked), s_h a signed
per-query scale (at initialisation a constant per head, `distance_init`). A question such as
"which object is closest to the red one" is then one hop to find the red object and one to
prefer what lies near (s < 0) or far (s > 0) from it, the comparison of positions a relation
network makes for every object pair. With `revisit`, a second per-query scale weighs the cells
the previous hop looked at, so that a hop can leave out the object it started from.

Every stream is prefixed with one learned "missing" token that is attendable only when its
modality is absent, so an absent modality is represented by a learned embedding that the other
streams can attend to, and no attention row is ever fully masked.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, masked_token_output)
from mmjax.layers import EncoderBlock, MultiHeadAttention, dense, layer_norm
from mmjax.layers.common import Dtype, zeros


class CrossModalLayer(nnx.Module):
  """One LXMERT cross-modality layer over several streams of width F."""

  def __init__(self, names: Sequence[str], features: int, num_heads: int, mlp_dim: int, *,
               update: Sequence[str] | None = None, act: str = "gelu", dropout: float = 0.0, attn_dropout: float = 0.0,
               norm: str = "post", ln_eps: float = 1e-12, qk_scale: float = 1.0, spatial: str | None = None,
               revisit: bool = False, distance_init: float = 0.0, revisit_init: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.names = tuple(names)
    self.update = tuple(update) if update is not None else self.names
    # The distance bias (module docstring): per-query scales s_h.
    self.spatial = spatial
    def per_query_scales():  # one (features -> heads) map per stream that attends over the grid
      return nnx.Dict({m: dense(features, num_heads, ("embed", "heads"), kernel_init=zeros, **kw)
                       for m in self.update if m != spatial})

    if spatial is not None:
      self.distance_scale = per_query_scales()
    self.revisit_scale = per_query_scales() if spatial is not None and revisit else None
    if spatial is not None:  # initial per-head scales: even heads near (-), odd heads far (+)
      signs = jnp.where(jnp.arange(num_heads) % 2 == 0, -1.0, 1.0)
      for lin in self.distance_scale.values():
        lin.bias[...] = (distance_init * signs).astype(param_dtype)
      for lin in (self.revisit_scale or {}).values():
        lin.bias[...] = jnp.full((num_heads,), revisit_init, param_dtype)
    self.cross = MultiHeadAttention(num_heads, features, dropout=attn_dropout, qk_scale=qk_scale, **kw)
    self.cross_norm = layer_norm(features, eps=ln_eps, **kw)
    if norm not in ("pre", "post"):
      raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
    self.norm = norm
    self.streams = nnx.Dict({m: EncoderBlock(features, num_heads, mlp_dim, norm=norm, act=act,
                                             dropout=dropout, attn_dropout=attn_dropout,
                                             ln_eps=ln_eps, **kw) for m in self.update})
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, xs: dict[str, jax.Array], masks: dict[str, jax.Array], *,
               deterministic: bool = True, return_weights: bool = False,
               previous: dict[str, jax.Array] | None = None, coords: jax.Array | None = None):
    """xs: name -> (B, L_m, F), or (B / r, L_m, F) for a stream shared by r examples that is
    not updated; masks: name -> (B, L_m). With `spatial`: `previous`, the previous layer's
    weights (as returned), and `coords`, the (N, 2) grid positions. Returns new xs and, per
    updated stream, name -> (B, H, L_m, sum L_o)."""
    crossed, weights = {}, {}
    for m in self.update:
      B = xs[m].shape[0]
      others = [o for o in self.names if o != m]
      rows = {xs[o].shape[0] for o in others}
      # Context shared by r examples: keys and values once per row (r = 1 when any is per example).
      r = B // rows.pop() if len(rows) == 1 else 1
      ctx = jnp.concatenate([xs[o] if r > 1 else _rows(xs[o], B) for o in others], axis=1)
      ctx_mask = jnp.concatenate([masks[o] for o in others], axis=1)[:, None, None, :]
      pre = self.norm == "pre"
      query = self.cross_norm(xs[m]) if pre else xs[m]
      bias = None
      if self.spatial is not None and m != self.spatial:
        start = sum(xs[o].shape[1] for o in others[:others.index(self.spatial)])  # with missing slots
        bias = self._distance_bias(m, query, previous[m], coords, start + 1, ctx.shape[1])
      out = self.cross(query, ctx, ctx_mask, bias=bias, deterministic=deterministic,
                       return_weights=return_weights, context_repeats=r)
      if return_weights:
        out, weights[m] = out
      out = xs[m] + self.dropout(out, deterministic=deterministic)
      crossed[m] = out if pre else self.cross_norm(out)
    new = dict(xs)
    new.update({m: self.streams[m](crossed[m], masks[m], deterministic=deterministic) for m in self.update})
    return new, weights

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


def _rows(x: jax.Array, batch: int) -> jax.Array:
  """x (B / r, ...) repeated to (B, ...) (each row serves r consecutive examples)."""
  return x if x.shape[0] == batch else jnp.repeat(x, batch // x.shape[0], axis=0)


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(FusionBlock):
  """LXMERT-style cross-modality encoder over all modalities.

  Attributes:
    update: the streams the layers rewrite (default all); the others stay their projected tokens.
    proj: name -> dense (D_m -> features) then `in_norm`, as LXMERT's feature encoders.
    missing: name -> learned (features,) token standing in for an absent modality.
    layers: `depth` CrossModalLayers.
    pool: "mean" (average of the updated streams' masked means) or "concat" (their concatenation,
      projected).
    norm: "post" (LXMERT/BERT: x = LN(x + f(x))) or "pre" (x = x + f(LN(x)), with a final
      LayerNorm per updated stream): pre-LN keeps the query's residual stream un-normalised.
    qk_scale: multiplies the cross-attention logits (1: the usual 1 / sqrt(head_dim)). Larger
      starts the attention sharper: on Sort-of-CLEVR-style colour questions 4 lets the question
      find its object within ~400 steps where 1 can sit at the answer prior for 1,000+.
    spatial: a modality whose N tokens are a square row-major grid: layers after the first add
      the distance bias of the module docstring to the attention over it (None: off).
    revisit: with `spatial`, each head also adds u_h(query) * w_hj / max_j w_hj, w_h its own
      attention over the grid in the previous layer, u_h a signed per-query scale (at
      initialisation the constant `revisit_init`): u < 0 looks away from what the previous hop
      found ("the object closest to the red one" is near it but not it), u > 0 looks at it again.
    distance_init, revisit_init: the initial s_h and u_h (their biases; the query-dependent parts
      start at zero): s_h = -distance_init for even heads (near), +distance_init for odd heads
      (far), u_h = revisit_init. Non-zero values let a head whose previous hop found an object
      look near or far from it from the first step, instead of waiting for s to grow.
    attention_maps: when True, aux["cross_attention"][m][o] holds stream m's weights over
      modality o's tokens, (depth, B, H, N_m, N_o) (the missing-token slots left out).
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, depth: int = 2,
               num_heads: int = 4, mlp_dim: int | None = None, update: Sequence[str] | None = None,
               act: str = "gelu",
               dropout: float = 0.0, attn_dropout: float = 0.0, pool: str = "mean",
               norm: str = "post", qk_scale: float = 1.0, spatial: str | None = None,
               revisit: bool = False, distance_init: float = 0.0, revisit_init: float = 0.0,
               attention_maps: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if pool not in ("mean", "concat"):
      raise ValueError(f"pool must be 'mean' or 'concat', got {pool!r}")
    self.pool, self.attention_maps = pool, attention_maps
    self.update = self.names if update is None else tuple(self._check_member("update", m) for m in update)
    if not self.update:
      raise ValueError("update: expected at least one modality to update")
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
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})
    self.in_norm = nnx.Dict({m: layer_norm(features, eps=1e-12, **kw) for m in self.names})
    self.missing = nnx.Dict({m: learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.names})
    self.layers = nnx.List([
        CrossModalLayer(self.names, features, num_heads, mlp_dim or 4 * features,
                        update=self.update, act=act, norm=norm, qk_scale=qk_scale,
                        spatial=self.spatial if i else None, revisit=revisit,
                        distance_init=distance_init, revisit_init=revisit_init,
                        dropout=dropout, attn_dropout=attn_dropout, **kw) for i in range(depth)])
    self.final_norm = (nnx.Dict({m: layer_norm(features, eps=1e-6, **kw) for m in self.update})
                       if norm == "pre" else None)
    self.out = (dense(len(self.update) * features, features, ("mlp", "embed"), **kw)
                if pool == "concat" else None)

  shares_inputs = True  # a shared stream that is not updated is projected once per row

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    B = x.batch
    xs, masks = {}, {}
    for m in self.names:
      t = x.tokens[m]  # (B / r, N_m, D_m)
      if m in self.update:  # rewritten per example: (B, N_m, D_m), masked per example
        t = jnp.where(x.masks[m][..., None], _rows(t, B), jnp.zeros((), t.dtype))
      h = self.in_norm[m](self.proj[m](t))  # (B / r, N_m, F)
      miss = jnp.broadcast_to(self.missing[m][...].astype(h.dtype), (h.shape[0], 1, self.features))
      xs[m] = sharding.constrain(jnp.concatenate([miss, h], axis=1), ("batch", "length", "embed"))
      masks[m] = jnp.concatenate([~x.present[m][:, None], x.masks[m]], axis=1)  # (B, 1 + N_m)
    coords = None if self.spatial is None else _grid_positions(self.spatial, x.tokens[self.spatial].shape[1])
    maps, w = [], None
    for layer in self.layers:
      xs, w = layer(xs, masks, deterministic=deterministic, previous=w, coords=coords,
                    return_weights=self.attention_maps or self.spatial is not None)
      maps.append(w)
    if self.final_norm is not None:
      xs.update({m: self.final_norm[m](xs[m]) for m in self.update})
    pooled = [masked_mean(xs[m], masks[m]) for m in self.update]  # M x (B, F)
    if self.pool == "mean":
      fused = jnp.mean(jnp.stack(pooled, axis=1), axis=1)
    else:
      fused = self.out(jnp.concatenate(pooled, axis=-1))
    tokens = {m: masked_token_output(_rows(xs[m][:, 1:], B), x.masks[m]) for m in self.names}
    aux = {"cross_attention": self._split_maps(maps, x)} if self.attention_maps else {}
    return FusionOutput(fused, tokens, aux)

  def _split_maps(self, maps: list[dict[str, jax.Array]], x: FusionInputs) -> dict:
    """Per layer (B, H, 1 + N_m, sum_o (1 + N_o)) -> m -> o -> (depth, B, H, N_m, N_o)."""
    out = {}
    for m in self.update:
      stacked = jnp.stack([w[m] for w in maps])  # (depth, B, H, 1 + N_m, ctx)
      out[m], start = {}, 0
      for o in self.names:
        if o == m:
          continue
        n = x.tokens[o].shape[1]
        out[m][o] = stacked[:, :, :, 1:, start + 1:start + 1 + n]
        start += 1 + n
    return out


def _grid_positions(name: str, n: int) -> jax.Array:
  """(n, 2) (row, column) of the tokens of a square row-major grid of n cells."""
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"spatial={name!r}: expected its tokens to form a square grid, got {n} tokens")
  return jnp.asarray(np.stack(np.divmod(np.arange(n), side), axis=-1), jnp.float32)
