"""Attention bottlenecks (MBT, Nagrani et al. 2021, arXiv 2107.00135).

Each modality keeps its own transformer layers; from layer `fusion_layer` on, a small set of
shared bottleneck tokens is appended to every stream, and the bottleneck tokens each stream
produces are averaged across modalities to form the next layer's bottleneck. Cross-modal
information flows only through the bottleneck:
[z_m; b_m'] = Layer_m([z_m; b]), b <- mean over present m of b_m'.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, masked_token_output)
from mmjax.layers import EncoderBlock, dense, layer_norm
from mmjax.layers.common import Dtype


@FUSIONS.register("bottleneck")
class BottleneckFusion(FusionBlock):
  """Multimodal bottleneck transformer over already-encoded modality tokens.

  An absent modality's stream neither reads nor writes the bottleneck (its update is left out
  of the average); an example with no modality keeps the learned initial bottleneck.
  The pooled vector is the mean over present modalities of each stream's masked-mean tokens.

  Attributes:
    proj: name -> dense (D_m -> features).
    bottleneck: learned (num_bottleneck, features) initial bottleneck tokens.
    layers: name -> `depth` pre-LN EncoderBlocks (modality-specific weights).
    norm: name -> final LayerNorm.
    fusion_layer: index of the first layer that uses the bottleneck.

  Args:
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, depth: int = 2,
               num_heads: int = 4, mlp_dim: int | None = None, num_bottleneck: int = 4,
               fusion_layer: int = 0, act: str = "gelu", dropout: float = 0.0,
               attn_dropout: float = 0.0, attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if num_bottleneck < 1:
      raise ValueError(f"num_bottleneck: expected a positive int, got {num_bottleneck!r}")
    if not 0 <= fusion_layer < depth:
      raise ValueError(f"fusion_layer: expected 0 <= fusion_layer < depth={depth}, got {fusion_layer!r}")
    self.fusion_layer = fusion_layer
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})
    self.bottleneck = learned((num_bottleneck, features), (None, "embed"), rngs=rngs,
                              param_dtype=param_dtype)
    self.layers = nnx.Dict({m: nnx.List([
        EncoderBlock(features, num_heads, mlp_dim or 4 * features, act=act, dropout=dropout,
                     attn_dropout=attn_dropout, attention=attention, **kw) for _ in range(depth)])
        for m in self.names})
    self.norm = nnx.Dict({m: layer_norm(features, **kw) for m in self.names})

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    B = x.batch
    nb = self.bottleneck.shape[0]
    h = {m: self.proj[m](x.tokens[m]) for m in self.names}  # (B, N_m, F)
    present = jnp.stack([x.present[m] for m in self.names], axis=1)[..., None, None]  # (B, M, 1, 1)
    count = present.sum(axis=1)  # (B, 1, 1)
    b = jnp.broadcast_to(self.bottleneck[...].astype(self.dtype), (B, nb, self.features))
    ones = jnp.ones((B, nb), bool)
    for i in range(len(self.layers[self.names[0]])):
      if i < self.fusion_layer:
        h = {m: self.layers[m][i](h[m], x.masks[m], deterministic=deterministic) for m in self.names}
        continue
      updates = []
      for m in self.names:
        n = h[m].shape[1]
        out = self.layers[m][i](jnp.concatenate([h[m], b], axis=1),
                                jnp.concatenate([x.masks[m], ones], axis=1), deterministic=deterministic)
        h[m] = out[:, :n]
        updates.append(out[:, n:])
      updates = jnp.stack(updates, axis=1)  # (B, M, nb, F)
      total = jnp.where(present, updates, jnp.zeros((), updates.dtype)).sum(axis=1)
      avg = total / jnp.maximum(count, 1).astype(total.dtype)
      b = sharding.constrain(jnp.where(count > 0, avg, b), ("batch", "length", "embed"))
    h = {m: self.norm[m](h[m]) for m in self.names}
    pooled = jnp.stack([masked_mean(h[m], x.masks[m]) for m in self.names], axis=1)  # (B, M, F)
    pooled = jnp.where(present[..., 0], pooled, jnp.zeros((), pooled.dtype)).sum(axis=1)
    pooled = pooled / jnp.maximum(count[..., 0], 1).astype(pooled.dtype)
    tokens = {m: masked_token_output(h[m], x.masks[m]) for m in self.names}
    return FusionOutput(pooled, tokens, {"bottleneck": b})
