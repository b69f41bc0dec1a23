"""FiLM: feature-wise linear modulation (Perez et al. 2018, arXiv 1709.07871).

A conditioning modality (the question text, typically) predicts per-channel (gamma, beta) for
every residual block of the other modalities' token streams. The residual block follows the
paper's, with per-token dense layers in place of the 1x1 / 3x3 convolutions:
a = relu(W1 x); out = a + relu(gamma * norm(W2 a) + beta), norm without learned affine.
The generator predicts gamma - 1, so a fresh block starts near identity modulation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, masked_token_output)
from mmjax.layers import Mlp, dense
from mmjax.layers.common import Dtype


class FiLMBlock(nnx.Module):
  """One FiLM-ed residual block over tokens (B, N, F)."""

  def __init__(self, features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = dense(features, features, ("embed", "mlp"), **kw)
    self.fc2 = dense(features, features, ("mlp", "embed"), **kw)
    self.norm = nnx.LayerNorm(features, epsilon=1e-6, use_scale=False, use_bias=False,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    """x: (B, N, F); gamma, beta: (B, F)."""
    a = jax.nn.relu(self.fc1(x))
    h = self.norm(self.fc2(a)) * gamma[:, None] + beta[:, None]
    return sharding.constrain(a + jax.nn.relu(h), ("batch", "length", "embed"))


@FUSIONS.register("film")
class FiLMFusion(FusionBlock):
  """FiLM fusion: the `condition` modality modulates every other modality's tokens.

  If the conditioning modality is absent the modulation is the identity (gamma = 1, beta = 0).
  Each modulated stream is prefixed with a learned "missing" token that is real only when its
  modality is absent, so an absent modality is a learned embedding that is still modulated.
  Each stream is pooled over its tokens, by a masked mean or (as in the FiLM paper's classifier)
  a masked max, and the pooled streams are concatenated into an MLP. Max pooling lets the
  question select one object's cell without the dilution of averaging over every grid cell. Fused
  tokens are returned for the modulated modalities only.

  Attributes:
    condition: name of the conditioning modality.
    targets: the modulated modalities, in construction order.
    proj: name -> dense (D_m -> features) token projection.
    film: name -> dense (D_condition -> num_blocks * 2 * features) FiLM generator.
    blocks: name -> `num_blocks` FiLMBlocks.
    missing: name -> learned (features,) token standing in for an absent modulated modality.
    pool: "mean" or "max" over each modulated stream's tokens.
    head: (len(targets) * features -> mlp_dim -> features).
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, condition: str = "text",
               num_blocks: int = 2, mlp_dim: int | None = None, pool: str = "mean",
               dropout: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    self.condition = self._check_member("condition", condition)
    if pool not in ("mean", "max"):
      raise ValueError(f"pool: expected 'mean' or 'max', got {pool!r}")
    self.pool = pool
    if num_blocks < 1:
      raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
    self.num_blocks = num_blocks
    self.targets = tuple(m for m in self.names if m != condition)
    dims = dict(self.modality_dims)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(dims[m], features, ("embed", "mlp"), **kw) for m in self.targets})
    self.film = nnx.Dict({m: dense(dims[condition], num_blocks * 2 * features, ("embed", "mlp"), **kw)
                          for m in self.targets})
    self.blocks = nnx.Dict({m: nnx.List([FiLMBlock(features, **kw) for _ in range(num_blocks)])
                            for m in self.targets})
    self.missing = nnx.Dict({m: learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.targets})
    self.head = Mlp(len(self.targets) * features, mlp_dim or 2 * features, out_features=features,
                    act="relu", dropout=dropout, **kw)

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    c = self.condition
    cond = masked_mean(x.tokens[c], x.masks[c])  # (B, D_c)
    has_cond = x.present[c][:, None, None]  # (B, 1, 1)
    tokens, pooled, gammas, betas = {}, [], {}, {}
    for m in self.targets:
      params = self.film[m](cond).reshape(cond.shape[0], self.num_blocks, 2, self.features)
      gamma = jnp.where(has_cond, 1 + params[:, :, 0], jnp.ones((), params.dtype))  # (B, K, F)
      beta = jnp.where(has_cond, params[:, :, 1], jnp.zeros((), params.dtype))
      h = self.proj[m](x.tokens[m])  # (B, N_m, F)
      miss = jnp.broadcast_to(self.missing[m][...].astype(h.dtype), (h.shape[0], 1, self.features))
      h = jnp.concatenate([miss, h], axis=1)  # (B, 1 + N_m, F)
      mask = jnp.concatenate([~x.present[m][:, None], x.masks[m]], axis=1)
      for k, block in enumerate(self.blocks[m]):
        h = block(h, gamma[:, k], beta[:, k])
      tokens[m] = masked_token_output(h[:, 1:], x.masks[m])
      if self.pool == "max":
        top = jnp.where(mask[..., None], h, jnp.asarray(-jnp.inf, h.dtype)).max(axis=1)  # (B, F)
        pooled.append(jnp.where(mask.any(axis=1)[:, None], top, jnp.zeros((), h.dtype)))
      else:
        pooled.append(masked_mean(h, mask))
      gammas[m], betas[m] = gamma, beta
    fused = self.head(jnp.concatenate(pooled, axis=-1), deterministic=deterministic)
    return FusionOutput(fused, tokens, {"gamma": gammas, "beta": betas})
