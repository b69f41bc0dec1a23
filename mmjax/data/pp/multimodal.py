"""Augmentations across modalities that keep labels true, and batch-level mixup.

A mirror changes what "left" and "right" mean, so flipping an image alone would make some
labels wrong: `mm.caption_flip` swaps the words "left" and "right" in the captions flipped with
their image. `mixup` mixes whole batches, every modality with the same lambda.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from mmjax.data.pp.image import get_image
from mmjax.data.pp.registry import Example, field, register
from mmjax.data.pp.text import get_texts

_LEFT_RIGHT = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
  """Swaps the words left <-> right (also -most/-ward/-wards forms), keeping their case."""

  def repl(m: re.Match) -> str:
    word = m.group(1)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
      new = new.upper()
    elif word[0].isupper():
      new = new.capitalize()
    return new + (m.group(2) or "")

  return _LEFT_RIGHT.sub(repl, text)


@register("mm.caption_flip")
@dataclasses.dataclass
class CaptionFlip:
  """Mirrors the image and swaps "left"/"right" in its captions, together, with probability p.

  Exact for captions whose left/right words describe relations a mirror reverses: one object
  left of another, or an object in the left half. An object on the centre column stays in the
  "left" half under the rule x < W / 2 (as in `mmjax.data.scenes`), so when the record has
  scene metadata (`xs_key`) and some object sits on the centre column, the example is left
  unflipped; otherwise the metadata is mirrored with the image.

  Attributes:
    p: probability of flipping.
    key: the (H, W, C) image field.
    text_keys: caption field(s): a string or a sequence of strings each.
    xs_key: field of object centre columns, used when present.
  """

  p: float = 0.5
  key: str = "image"
  text_keys: str | Sequence[str] = "captions"
  xs_key: str = "xs"

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    image = get_image(example, self.key)
    if rng.random() >= self.p:
      return example
    width = image.shape[1]
    out = {**example, self.key: np.ascontiguousarray(image[:, ::-1])}
    if self.xs_key in example:
      xs = np.asarray(example[self.xs_key])
      if (2 * xs == width - 1).any():
        return example
      out[self.xs_key] = (width - 1 - xs).astype(xs.dtype)
    keys = (self.text_keys,) if isinstance(self.text_keys, str) else tuple(self.text_keys)
    for k in keys:
      texts, scalar = get_texts(example, k)
      swapped = [swap_left_right(t) for t in texts]
      out[k] = swapped[0] if scalar else np.asarray(swapped, dtype=str)
    return out


def mixup(batch: dict[str, Any], rng: np.random.Generator, *, alpha: float = 0.2,
          keys: Sequence[str] = ("image", "audio"), label_key: str = "label",
          num_classes: int | None = None) -> dict[str, Any]:
  """Mixup (Zhang et al. 2018) of a paired batch: every modality mixed with one shared lambda.

  Each example is mixed with a partner from a random permutation of the batch:
  x = lam * x + (1 - lam) * x[perm] for every key in `keys`, and the labels become soft labels
  lam * y + (1 - lam) * y[perm], which sum to 1. A `{key}_len` field becomes the larger of the
  two lengths and a `{key}_mask` field the union of the two masks.

  Args:
    batch: arrays with a leading batch axis B.
    rng: the generator lambda and the permutation are drawn from.
    alpha: lam ~ Beta(alpha, alpha).
    keys: float fields to mix (missing ones are an error).
    label_key: (B,) int class ids (needs `num_classes`) or (B, K) one-hot/soft labels.
    num_classes: K, for int labels.
  Returns:
    A new batch with mixed fields, soft (B, K) float32 labels and `mixup_lambda` () float32.
  """
  labels = np.asarray(field(batch, label_key))
  if labels.ndim == 1:
    if num_classes is None:
      raise ValueError(f"mixup: field {label_key!r} holds class ids; pass num_classes")
    labels = np.eye(num_classes, dtype=np.float32)[labels]
  elif labels.ndim != 2:
    raise ValueError(f"mixup: field {label_key!r} must be (B,) ids or (B, K) labels, got {labels.shape}")
  b = labels.shape[0]
  lam = np.float32(rng.beta(alpha, alpha))
  perm = rng.permutation(b)
  out = dict(batch)
  for k in keys:
    x = np.asarray(field(batch, k))
    if x.shape[:1] != (b,) or not np.issubdtype(x.dtype, np.floating):
      raise TypeError(f"mixup: field {k!r} must be a float array with batch size {b}, got "
                      f"{x.dtype} {x.shape}")
    out[k] = (lam * x + (1 - lam) * x[perm]).astype(x.dtype)
    if f"{k}_len" in batch:
      out[f"{k}_len"] = np.maximum(batch[f"{k}_len"], np.asarray(batch[f"{k}_len"])[perm])
    if f"{k}_mask" in batch:
      out[f"{k}_mask"] = np.logical_or(batch[f"{k}_mask"], np.asarray(batch[f"{k}_mask"])[perm])
  out[label_key] = (lam * labels + (1 - lam) * labels[perm]).astype(np.float32)
  out["mixup_lambda"] = lam
  return out
