"""Tensor fusion network (Zadeh et al. 2017, arXiv 1707.07250).

Each modality's pooled features are projected to a small `tensor_dim`, extended with a constant 1
and combined by the outer product z = [h_1; 1] x ... x [h_M; 1], which holds the unimodal, bimodal
and trimodal interactions; the flattened (tensor_dim + 1)**M tensor goes through an MLP.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, select)
from mmjax.layers import Mlp, dense
from mmjax.layers.common import Dtype


@FUSIONS.register("tfn")
class TensorFusion(FusionBlock):
  """Tensor fusion over masked-mean pooled modality features.

  An absent modality's projected features are replaced by a learned "missing" embedding.

  Attributes:
    proj: name -> dense (D_m -> tensor_dim) applied to the pooled tokens (tensor_dim is small, so
      it stays unsharded).
    missing: name -> learned (tensor_dim,) for an absent modality.
    mlp: ((tensor_dim + 1)**M -> mlp_dim -> features), ReLU as in the paper.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, tensor_dim: int = 8,
               mlp_dim: int | None = None, dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if tensor_dim < 1:
      raise ValueError(f"tensor_dim: expected a positive int, got {tensor_dim!r}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, tensor_dim, ("embed", None), **kw) for m, d in self.modality_dims})
    self.missing = nnx.Dict({m: learned((tensor_dim,), (None,), rngs=rngs, param_dtype=param_dtype)
                             for m in self.names})
    width = (tensor_dim + 1) ** len(self.names)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim or 2 * features, out_features=features, act="relu",
                   dropout=dropout, **kw)

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    z = None
    for m in self.names:
      h = select(x.present[m], self.proj[m](masked_mean(x.tokens[m], x.masks[m])), self.missing[m][...])
      h = jnp.concatenate([h, jnp.ones(h.shape[:1] + (1,), h.dtype)], axis=-1)  # (B, d + 1)
      z = h if z is None else jnp.einsum("bi,bj->bij", z, h).reshape(h.shape[0], -1)
    z = self.dropout(z, deterministic=deterministic)  # (B, (d + 1)**M)
    return FusionOutput(self.mlp(z, deterministic=deterministic), None, {})
