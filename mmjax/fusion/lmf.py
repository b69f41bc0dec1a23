"""Low-rank multimodal fusion (Liu et al. 2018, arXiv 1806.00064).

The tensor-fusion weight over the outer product of z_m = [h_m; 1] is factored into `rank`
modality-specific factors, so h = sum_i w_i * prod_m (z_m W_m^(i)) + b costs linear time in the
number of modalities instead of materialising the outer product.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, select)
from mmjax.layers.common import Dtype, part, zeros


@FUSIONS.register("lmf")
class LowRankFusion(FusionBlock):
  """LMF over masked-mean pooled modality features.

  An absent modality's pooled features are replaced by a learned "missing" embedding (the
  appended 1 stays), as in the original, where every factor always contributes.

  Attributes:
    rank: number of low-rank factors r.
    factors: name -> (r, D_m + 1, features) modality-specific factors.
    weights: (r,) mix of the rank-1 terms; bias: (features,).
    missing: name -> learned (D_m,) pooled features for an absent modality.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, rank: int = 4,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if rank < 1:
      raise ValueError(f"rank: expected a positive int, got {rank!r}")
    self.rank = rank
    factor_init = part(nnx.initializers.xavier_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                       (None, None, "mlp"))  # D_m + 1 is rarely divisible by a mesh axis.
    self.factors = nnx.Dict({m: nnx.Param(factor_init(rngs.params(), (rank, d + 1, features), param_dtype))
                             for m, d in self.modality_dims})
    self.weights = nnx.Param(part(nnx.initializers.xavier_normal(), (None, None))(
        rngs.params(), (1, rank), param_dtype))
    self.bias = nnx.Param(part(zeros, ("mlp",))(rngs.params(), (features,), param_dtype))
    self.missing = nnx.Dict({m: learned((d,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m, d in self.modality_dims})

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    product = None
    for m in self.names:
      h = select(x.present[m], masked_mean(x.tokens[m], x.masks[m]), self.missing[m][...])
      h = h.astype(self.dtype)
      z = jnp.concatenate([h, jnp.ones(h.shape[:1] + (1,), h.dtype)], axis=-1)  # (B, D_m + 1)
      term = jnp.einsum("bd,rdf->brf", z, self.factors[m][...].astype(self.dtype))  # (B, r, F)
      product = term if product is None else product * term
    w = self.weights[...].astype(self.dtype)[0]
    fused = jnp.einsum("brf,r->bf", product, w) + self.bias[...].astype(self.dtype)
    return FusionOutput(fused, None, {})
