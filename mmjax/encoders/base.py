"""The encoder contract: one modality in, tokens + mask + pooled vector out."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmjax.registry import Registry

# The modules that register the built-in encoders ("minilm" lives beside its pretrained loader).
ENCODERS = Registry("encoder", modules=("mmjax.encoders.audio", "mmjax.encoders.text",
                                        "mmjax.encoders.vision", "mmjax.transfer.minilm"))


class EncoderOutput(NamedTuple):
  """What every encoder returns.

  Attributes:
    tokens: (B, N, D) token features (a flattened grid for images and spectrograms).
    mask: (B, N) bool, True where a token is real.
    pooled: (B, D) summary vector.
  """

  tokens: jax.Array
  mask: jax.Array
  pooled: jax.Array


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of tokens (B, L, D) over positions where mask (B, L) is True, in float32; 0 if none."""
  m = mask.astype(jnp.float32)[..., None]  # (B, L, 1)
  total = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)  # (B, D)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)
