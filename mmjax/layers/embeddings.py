"""Embeddings: tokens, patches, learned / sinusoidal / 2-D sin-cos positions, modality types."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.layers.common import Dtype, part

normal02 = nnx.initializers.normal(0.02)


def sinusoidal_positions(length: int, features: int, max_period: float = 10_000.0) -> np.ndarray:
  """Transformer sin/cos table (length, features): sin in the first half, cos in the second."""
  half = features // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half) / max(half, 1))
  angles = np.arange(length)[:, None] * freqs[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  if features % 2:
    table = np.concatenate([table, np.zeros((length, 1))], axis=1)
  return table.astype(np.float32)


def sincos_2d_positions(h: int, w: int, features: int, temperature: float = 10_000.0) -> np.ndarray:
  """MoCo-v3 / big_vision 2-D sin-cos table (h*w, features), rows major."""
  if features % 4:
    raise ValueError(f"sincos_2d_positions: features={features} must be divisible by 4")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(features // 4) / (features // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Embed(nnx.Module):
  """Token embedding table (vocab, D) named ('vocab', 'embed'); `attend` gives tied output logits."""

  def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.02,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.num_embeddings = num_embeddings
    self.dtype = dtype
    init = nnx.initializers.normal(init_std)
    self.embedding = nnx.Param(part(init, ("vocab", "embed"))(rngs.params(), (num_embeddings, features), param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"token ids: expected an integer array, got {ids.dtype}")
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].astype(self.dtype).T


class LearnedPositions(nnx.Module):
  """Learned absolute positions (max_len, D), added to the first L tokens."""

  def __init__(self, max_len: int, features: int, *, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.max_len = max_len
    self.embedding = nnx.Param(part(normal02, (None, "embed"))(rngs.params(), (max_len, features), param_dtype))

  def __call__(self, x: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
    L = x.shape[1]
    if isinstance(offset, int) and offset + L > self.max_len:
      raise ValueError(f"sequence length {offset + L} exceeds max_len={self.max_len} of the position table")
    pos = jax.lax.dynamic_slice_in_dim(self.embedding[...], offset, L, axis=0)
    return x + pos[None].astype(x.dtype)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches of (B, H, W, C) images -> (B, H//p * W//p, D) tokens via a strided
  conv; a size that is no multiple of the patch drops the last rows / columns, as HF's does."""

  def __init__(self, patch: int | tuple[int, int], in_channels: int, features: int, *,
               use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    self.conv = nnx.Conv(
        in_channels, features, kernel_size=self.patch, strides=self.patch, padding="VALID",
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=part(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=part(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Returns tokens (B, N, D) and the grid size (h, w)."""
    if x.ndim != 4:
      raise ValueError(f"images: expected shape (B, H, W, C), got {x.shape}")
    ph, pw = self.patch
    if x.shape[1] < ph or x.shape[2] < pw:
      raise ValueError(f"images: height/width {x.shape[1:3]} smaller than one patch {self.patch}")
    y = self.conv(x)  # (B, h, w, D)
    b, h, w, d = y.shape
    return y.reshape(b, h * w, d), (h, w)


class ModalityEmbed(nnx.Module):
  """One learned vector per modality (token type), added to that modality's tokens."""

  def __init__(self, num_types: int, features: int, *, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.num_types = num_types
    self.embedding = nnx.Param(part(normal02, (None, "embed"))(rngs.params(), (num_types, features), param_dtype))

  def __call__(self, x: jax.Array, type_id: int | jax.Array) -> jax.Array:
    """x: (B, L, D); type_id: an int for all tokens, or (B, L) ids."""
    emb = self.embedding[...]
    t = emb[type_id] if isinstance(type_id, int) else jnp.take(emb, type_id, axis=0)
    return x + t.astype(x.dtype)
