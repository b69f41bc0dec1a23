"""The Sort-of-CLEVR project's model pieces, each built on one of the library's extension points.

- `PixelFreqCNN` (ENCODERS "mmjax.projects.sort_of_clevr.model:pixel_freq_cnn"): `SmallCNN`
  whose first conv also reads sin/cos features of the pixel values (`SmallCNN.input_features`).
- `FlatConcatFusion` (FUSIONS "mmjax.projects.sort_of_clevr.model:flat_concat"): concat fusion
  that flattens a modality's grid instead of pooling it (`ConcatFusion.summarize`).
- `UniqueQuestionsVQA` (MODELS "mmjax.projects.sort_of_clevr.model:unique_questions_vqa"):
  `VQAModel` that encodes each distinct question of a call once (`VQAModel.encode_questions`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders import ENCODERS, EncoderOutput
from mmjax.encoders.vision import SmallCNN
from mmjax.fusion.base import FUSIONS, FusionInputs
from mmjax.fusion.late import ConcatFusion
from mmjax.models.base import MODELS
from mmjax.models.vqa import VQAModel


def pixel_fourier_features(x: jax.Array, freqs: int) -> jax.Array:
  """(..., C) pixel values -> (..., C (1 + 2 freqs)): the values, then sin(pi k v) and then
  cos(pi k v) for k = 1..freqs, each block in (C, k) order."""
  k = jnp.pi * jnp.arange(1, freqs + 1, dtype=x.dtype)  # (K,)
  v = (x[..., None] * k).reshape(*x.shape[:-1], -1)  # (..., C K)
  return jnp.concatenate([x, jnp.sin(v), jnp.cos(v)], axis=-1)


@ENCODERS.register("pixel_freq_cnn")
class PixelFreqCNN(SmallCNN):
  """`SmallCNN` whose first conv reads each pixel value v (in [0, 1]) and sin(pi k v), cos(pi k v)
  for k = 1..pixel_freqs (C (1 + 2K) input channels), so its units can respond to a band of values.

  Without them a pixel's first-layer features are a linear function of its colour followed by a
  ReLU whose threshold a following norm sets at the (background's) mean, and a colour that is a
  convex combination of others relative to the background (orange between red and yellow, gray
  among red, green and blue against white) gets no unit that fires for it and not for them.

  Args:
    pixel_freqs: K >= 0 (0: a plain `SmallCNN`).
    features, **kwargs: as `SmallCNN`'s.
  """

  def __init__(self, features: int = 64, *, pixel_freqs: int = 2, **kwargs):
    if not isinstance(pixel_freqs, (int, np.integer)) or pixel_freqs < 0:
      raise ValueError(f"pixel_freqs: expected a non-negative int, got {pixel_freqs!r}")
    self.pixel_freqs = int(pixel_freqs)  # read by `input_features` while the parent sizes its first conv
    super().__init__(features, **kwargs)

  def input_features(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, C) -> (B, H, W, C (1 + 2K))."""
    return pixel_fourier_features(images, self.pixel_freqs) if self.pixel_freqs else images


@FUSIONS.register("flat_concat")
class FlatConcatFusion(ConcatFusion):
  """Concat fusion where each modality named in `flatten` is not pooled: its N_m tokens are
  concatenated (N_m * D_m features, padded tokens as zeros) before the projection, so the MLP
  sees where each feature is: the CNN+MLP baseline of Santoro et al. 2017 flattens the CNN's
  feature map.

  Args:
    flatten: name -> N_m, the token count of each flattened modality (none: `ConcatFusion`).
    modalities, features, **kwargs: as `ConcatFusion`'s.
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *,
               flatten: Mapping[str, int] | None = None, **kwargs):
    flatten = dict(flatten or {})
    for m, n in flatten.items():
      if m not in modalities:
        raise ValueError(f"flatten: {m!r} is not one of the modalities {list(modalities)}")
      if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"flatten[{m!r}]: expected the modality's token count (a positive int), got {n!r}")
    self.flatten = flatten  # read by `summary_dim` while the parent builds its projections
    super().__init__(modalities, features, **kwargs)

  def summary_dim(self, m: str, d: int) -> int:
    return d * self.flatten.get(m, 1)

  def summarize(self, m: str, x: FusionInputs) -> jax.Array:
    """Modality m's (B, D_m) masked mean, or its (B, N_m * D_m) flattened tokens."""
    if m not in self.flatten:
      return super().summarize(m, x)
    tokens = x.tokens[m]  # (B, N_m, D_m), zero where masked
    if tokens.shape[1] != self.flatten[m]:
      raise ValueError(f"flatten[{m!r}]: built for {self.flatten[m]} tokens, got {m} tokens of shape "
                       f"{tokens.shape} (B, N, D)")
    return tokens.reshape(tokens.shape[0], -1)


@MODELS.register("unique_questions_vqa")
class UniqueQuestionsVQA(VQAModel):
  """`VQAModel` that encodes each distinct question of a call once and gathers its output for
  every copy: with 108 distinct training questions, a step of 32 images x 20 questions encodes
  <= 108 instead of 640.

  The result equals encoding every question (identical ids and masks give identical outputs),
  except that copies share one dropout mask in training. With a batch sharded over devices the
  distinct questions are gathered and encoded on each device, so use it where one device (or
  few) holds the batch.

  Args:
    unique_questions: U > 0 encodes at most U distinct questions; a call with more encodes them
      all (one `cond`: never truncated). 0: always encode every question.
    **kwargs: as `VQAModel`'s.
  """

  def __init__(self, *, unique_questions: int = 0, **kwargs):
    if not isinstance(unique_questions, (int, np.integer)) or unique_questions < 0:
      raise ValueError(f"unique_questions: expected an int >= 0, got {unique_questions!r}")
    self.unique_questions = int(unique_questions)
    super().__init__(**kwargs)

  def encode_questions(self, ids: jax.Array, mask: jax.Array, deterministic: bool) -> EncoderOutput:
    """ids, mask (N, L) -> the text encoder's output for every row."""
    n, u = ids.shape[0], self.unique_questions
    encode = lambda text, i, m: text(i, m, deterministic=deterministic)
    text = self.encoders["text"]
    if not u or u >= n:
      return encode(text, ids, mask)
    # One int per token holds both the id and whether it is masked, so rows are equal iff both are.
    key = jnp.where(mask, ids, -1 - ids)
    rows, inverse = jnp.unique(key, axis=0, size=n, fill_value=0, return_inverse=True)
    inverse = inverse.reshape(n)
    distinct = inverse.max() + 1

    def few(text, rows, inverse):  # rows past `distinct` repeat row 0: valid input, never read
      r = jnp.where(jnp.arange(u)[:, None] < distinct, rows[:u], rows[:1])
      out = encode(text, jnp.where(r >= 0, r, -1 - r), r >= 0)
      return jax.tree.map(lambda x: x[inverse], out)

    return nnx.cond(distinct <= u, few, lambda text, rows, inverse: encode(text, ids, mask),
                    text, rows, inverse)
