"""Late fusion: per-modality masked-mean pooling (or flattening) and projection, then concat +
MLP, mean or sum."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, select)
from mmjax.layers import Mlp, dense
from mmjax.layers.common import Dtype


@FUSIONS.register("concat")
class ConcatFusion(FusionBlock):
  """Late fusion by concatenation: pool each modality, project it, concatenate, then an MLP.

  An absent modality's projected vector is replaced by a learned "missing" embedding. A modality
  named in `flatten` is not pooled: its N_m tokens are concatenated (N_m * D_m features, padded
  tokens as zeros) before the projection, so the MLP sees where each feature is, as in the
  CNN+MLP baseline of Santoro et al. 2017, which flattens the CNN's feature map.

  Attributes:
    proj: name -> dense (D_m, or N_m * D_m if flattened, -> features).
    missing: name -> learned (features,) used when the modality is absent.
    mlp: (M * features -> mlp_dim -> features).
    flatten: name -> N_m for the flattened modalities.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, mlp_dim: int | None = None,
               act: str = "gelu", dropout: float = 0.0, flatten: Mapping[str, int] | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    flatten = dict(flatten or {})
    for m, n in flatten.items():
      if m not in self.names:
        raise ValueError(f"flatten: {m!r} is not one of the modalities {list(self.names)}")
      if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"flatten[{m!r}]: expected the modality's token count (a positive int), got {n!r}")
    self.flatten = flatten
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d * flatten.get(m, 1), features, ("embed", "mlp"), **kw)
                          for m, d in self.modality_dims})
    self.missing = nnx.Dict({m: learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.names})
    width = len(self.names) * features
    self.mlp = Mlp(width, mlp_dim or 2 * features, out_features=features, act=act, dropout=dropout, **kw)

  def _summary(self, m: str, x: FusionInputs) -> jax.Array:
    """Modality m's (B, D_m) masked mean, or its (B, N_m * D_m) flattened tokens."""
    if m not in self.flatten:
      return masked_mean(x.tokens[m], x.masks[m])
    tokens = x.tokens[m]  # (B, N_m, D_m), zero where masked
    if tokens.shape[1] != self.flatten[m]:
      raise ValueError(f"flatten[{m!r}]: built for {self.flatten[m]} tokens, got {m} tokens of shape "
                       f"{tokens.shape} (B, N, D)")
    return tokens.reshape(tokens.shape[0], -1)

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    parts = [select(x.present[m], self.proj[m](self._summary(m, x)), self.missing[m][...])
             for m in self.names]  # M x (B, F)
    pooled = self.mlp(jnp.concatenate(parts, axis=-1), deterministic=deterministic)
    return FusionOutput(pooled, None, {})


class PooledFusion(FusionBlock):
  """Late fusion by reduction: pool and project each modality, then mean or sum the present ones.

  Examples with no modality present get zeros.

  Attributes:
    reduce: "mean" or "sum" over the present modalities.
    proj: name -> dense (D_m -> features) applied to the masked-mean pooled tokens.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, reduce: str = "mean",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if reduce not in ("mean", "sum"):
      raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    self.reduce = reduce
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    present = jnp.stack([x.present[m] for m in self.names], axis=1)  # (B, M)
    h = jnp.stack([self.proj[m](masked_mean(x.tokens[m], x.masks[m])) for m in self.names], axis=1)
    total = jnp.where(present[..., None], h, jnp.zeros((), h.dtype)).sum(axis=1)  # (B, F)
    if self.reduce == "mean":
      total = total / jnp.maximum(present.sum(axis=1), 1)[:, None].astype(total.dtype)
    return FusionOutput(total, None, {})


@FUSIONS.register("mean")
def mean_fusion(modalities: Mapping[str, int], features: int, **kwargs) -> PooledFusion:
  """Mean of the present modalities' pooled projections."""
  return PooledFusion(modalities, features, reduce="mean", **kwargs)


@FUSIONS.register("sum")
def sum_fusion(modalities: Mapping[str, int], features: int, **kwargs) -> PooledFusion:
  """Sum of the present modalities' pooled projections."""
  return PooledFusion(modalities, features, reduce="sum", **kwargs)
