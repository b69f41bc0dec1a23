"""Relation network (Santoro et al. 2017, arXiv 1706.01427).

RN(O, q) = f_phi(sum_{i,j} g_theta(o_i, o_j, q)): the objects are the tokens of every modality but
the query one (an image encoder that appends coordinates to its grid cells gives the paper's
objects), q is the query modality's pooled vector. g_theta's first layer on the concatenation
[o_i; o_j; q] equals W_a o_i + W_b o_j + W_q q, so it is computed per object and broadcast over
the pairs instead of materialising the concatenated pairs.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, select)
from mmjax.layers import Mlp, dense
from mmjax.layers.common import Dtype


@FUSIONS.register("relation")
class RelationFusion(FusionBlock):
  """Relation network over the non-query modalities' tokens, conditioned on the query modality.

  Each object modality gets one learned "missing" object, valid only when that modality is
  absent; an absent query modality is replaced by a learned "missing" query vector.

  Attributes:
    query: the conditioning modality.
    objects: the modalities whose tokens are the objects, in construction order.
    g_a, g_b: name -> dense (D_m -> g_dim) without bias: W_a and W_b of g's first layer.
    g_q: dense (D_query -> g_dim) with g's first-layer bias: W_q.
    g_rest: the remaining `g_layers - 1` dense (g_dim -> g_dim) layers of g, ReLU after each.
    f: f_phi, (g_dim -> f_dim -> features) with ReLU and dropout.
    pair_reduce: "sum" over valid pairs (the paper) or "mean".
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, query: str = "text",
               g_dim: int | None = None, g_layers: int = 4, f_dim: int | None = None,
               pair_reduce: str = "sum", dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    self.query = self._check_member("query", query)
    if g_layers < 1:
      raise ValueError(f"g_layers: expected a positive int, got {g_layers!r}")
    if pair_reduce not in ("sum", "mean"):
      raise ValueError(f"pair_reduce must be 'sum' or 'mean', got {pair_reduce!r}")
    self.pair_reduce = pair_reduce
    self.objects = tuple(m for m in self.names if m != query)
    dims = dict(self.modality_dims)
    g_dim = g_dim or features
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    first = lambda m: dense(dims[m], g_dim, ("embed", "mlp"), use_bias=False, **kw)
    self.g_a = nnx.Dict({m: first(m) for m in self.objects})
    self.g_b = nnx.Dict({m: first(m) for m in self.objects})
    self.g_q = dense(dims[query], g_dim, ("embed", "mlp"), **kw)
    self.g_rest = nnx.List([dense(g_dim, g_dim, ("mlp", "mlp"), **kw) for _ in range(g_layers - 1)])
    self.missing_query = learned((dims[query],), ("embed",), rngs=rngs, param_dtype=param_dtype)
    self.missing = nnx.Dict({m: learned((dims[m],), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.objects})
    self.f = Mlp(g_dim, f_dim or g_dim, out_features=features, act="relu", dropout=dropout, **kw)

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    B = x.batch
    qm = self.query
    q = select(x.present[qm], masked_mean(x.tokens[qm], x.masks[qm]), self.missing_query[...])  # (B, D_q)
    a, b, masks = [], [], []
    for m in self.objects:
      tok = x.tokens[m]
      miss = jnp.broadcast_to(self.missing[m][...].astype(tok.dtype), (B, 1, tok.shape[-1]))
      objs = jnp.concatenate([miss, tok], axis=1)  # (B, 1 + N_m, D_m)
      a.append(self.g_a[m](objs))
      b.append(self.g_b[m](objs))
      masks.append(jnp.concatenate([~x.present[m][:, None], x.masks[m]], axis=1))
    a, b, mask = (jnp.concatenate(v, axis=1) for v in (a, b, masks))  # (B, N, G), (B, N)
    h = jax.nn.relu(a[:, :, None] + b[:, None, :] + self.g_q(q)[:, None, None])  # (B, N, N, G)
    h = sharding.constrain(h, ("batch", None, None, "mlp"))
    for layer in self.g_rest:
      h = jax.nn.relu(layer(h))
    pairs = mask[:, :, None] & mask[:, None, :]  # (B, N, N)
    s = jnp.where(pairs[..., None], h, jnp.zeros((), h.dtype)).sum(axis=(1, 2), dtype=jnp.float32)
    if self.pair_reduce == "mean":
      s = s / jnp.maximum(pairs.sum(axis=(1, 2), dtype=jnp.float32), 1.0)[:, None]
    fused = self.f(s.astype(h.dtype), deterministic=deterministic)
    return FusionOutput(fused, None, {})
