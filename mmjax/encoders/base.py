"""The encoder contract: one modality in, tokens + mask + pooled vector out."""

from __future__ import annotations

from typing import NamedTuple

import jax

from mmjax.registry import Registry

ENCODERS = Registry("encoder")


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
