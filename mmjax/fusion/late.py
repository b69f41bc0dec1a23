"""Late fusion: per-modality masked-mean pooling and projection, then concat + MLP, mean or sum."""

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

  An absent modality's projected vector is replaced by a learned "missing" embedding. Subclasses
  change how a modality is summarised before its projection by overriding `summarize` and
  `summary_dim` (e.g. flattening a fixed-size grid instead of pooling it).

  Attributes:
    proj: name -> dense (summary_dim(m, D_m) -> features).
    missing: name -> learned (features,) used when the modality is absent.
    mlp: (M * features -> mlp_dim -> features).
  """

  min_modalities = 1  # one modality: its pooled projection through the MLP (single-input classifiers)

  def __init__(self, modalities: Mapping[str, int], features: int, *, mlp_dim: int | None = None,
               act: str = "gelu", dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(self.summary_dim(m, d), features, ("embed", "mlp"), **kw)
                          for m, d in self.modality_dims})
    self.missing = nnx.Dict({m: learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.names})
    width = len(self.names) * features
    self.mlp = Mlp(width, mlp_dim or 2 * features, out_features=features, act=act, dropout=dropout, **kw)

  def summary_dim(self, m: str, d: int) -> int:
    """Width of modality m's summary, given its token width d: d (the masked mean)."""
    del m
    return d

  def summarize(self, m: str, x: FusionInputs) -> jax.Array:
    """Modality m's (B, summary_dim) summary: the masked mean of its tokens."""
    return masked_mean(x.tokens[m], x.masks[m])

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    parts = [select(x.present[m], self.proj[m](self.summarize(m, x)), self.missing[m][...])
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
