"""Cross-modal retrieval recall@K from a similarity matrix, with several captions per image.

Rank convention: the rank of a ground truth is the number of other candidates scoring at least as
high (ties resolve against it, independently of candidate order, so a collapsed encoder whose
scores are all equal does not score perfect recall); a NaN ground-truth score has rank `MISS`, a
miss at every K.
Image->text uses the best ranked of the image's captions (the image's other captions are no
competitors); text->image the caption's one image. recall@K is the fraction of queries whose rank
is < K.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.metrics.accumulate import Accumulator

DEFAULT_KS = (1, 5, 10)
MISS = np.iinfo(np.int64).max  # the rank of a NaN ground-truth score


def retrieval_ranks(similarity, text_to_image) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of the ground truths: image->text (I,) and text->image (T,).

  Args:
    similarity: (I, T) scores (numpy or jax), rows images (or the other modality), columns texts.
    text_to_image: (T,) the row index of each text's image; every image needs >= 1 text.
  """
  similarity = np.asarray(similarity)
  if similarity.ndim != 2:
    raise ValueError(f"similarity: expected shape (I, T), got {similarity.shape}")
  n_img, n_txt = similarity.shape
  owners = np.asarray(text_to_image)
  if owners.shape != (n_txt,) or not np.issubdtype(owners.dtype, np.integer):
    raise ValueError(f"text_to_image: expected ({n_txt},) integer row ids, got {owners.shape} {owners.dtype}")
  if n_txt and (owners.min() < 0 or owners.max() >= n_img):
    raise ValueError(f"text_to_image: ids must lie in [0, {n_img})")
  if np.any(np.bincount(owners, minlength=n_img) == 0):
    raise ValueError("text_to_image: every image needs at least one text")
  similarity = similarity.astype(np.result_type(similarity.dtype, np.float32))  # bool, int: NaN below
  gt = similarity[owners, np.arange(n_txt)]  # (T,) score of each text with its own image
  best = np.full(n_img, np.nan, similarity.dtype)
  np.fmax.at(best, owners, gt)  # (I,) best own-caption score, NaN only where every one is NaN
  own = owners[None, :] == np.arange(n_img)[:, None]  # (I, T)
  i2t = np.sum((similarity >= best[:, None]) & ~own, axis=1)
  t2i = np.sum(similarity >= gt[None, :], axis=0) - 1  # the ground truth itself is no competitor
  i2t = np.where(np.isnan(best), MISS, i2t)  # a diverged model's NaN scores miss at every K
  t2i = np.where(np.isnan(gt), MISS, t2i)
  return i2t, t2i


def recall_at_k(similarity, text_to_image, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """{"i2t_r@K", "t2i_r@K" for K in ks, "rsum"} in [0, 1] (rsum: the sum of all of them)."""
  i2t, t2i = retrieval_ranks(similarity, text_to_image)
  out = {}
  for k in ks:
    out[f"i2t_r@{k}"] = int(np.sum(i2t < k)) / len(i2t)
  for k in ks:
    out[f"t2i_r@{k}"] = int(np.sum(t2i < k)) / len(t2i)
  out["rsum"] = float(sum(out.values()))
  return out


def _mask(mask, shape: tuple[int, ...], field: str) -> np.ndarray:
  mask = np.asarray(mask, bool)
  if mask.shape != shape:
    raise ValueError(f"{field}: expected shape {shape}, got {mask.shape}")
  return mask


class Retrieval(Accumulator):
  """Collects image and text embeddings over batches and hosts; recall@K over the whole set.

  Images are identified by dataset-wide integer ids, so a batch may hold texts of images seen in
  another batch, and an image seen twice counts once (its first embedding is used).

  Attributes:
    ks: the K of recall@K.
    normalize: L2-normalise embeddings before the dot-product similarity.
  """

  def __init__(self, ks: Sequence[int] = DEFAULT_KS, normalize: bool = True):
    self.ks = tuple(ks)
    self.normalize = normalize
    super().__init__()

  def _config(self) -> tuple:
    return super()._config() + (self.ks, self.normalize)

  def update(self, image_emb, image_ids, text_emb, text_image_ids, image_mask=None, text_mask=None) -> None:
    """Adds (Bi, D) image embeddings with (Bi,) ids and (Bt, D) text embeddings with the (Bt,) ids
    of their images; the masks (bool) drop padding."""
    image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    image_ids, text_image_ids = np.asarray(image_ids, np.int64), np.asarray(text_image_ids, np.int64)
    if image_emb.ndim != 2 or image_ids.shape != image_emb.shape[:1]:
      raise ValueError(f"image_emb, image_ids: expected (B, D) and (B,), got {image_emb.shape}, {image_ids.shape}")
    if text_emb.ndim != 2 or text_image_ids.shape != text_emb.shape[:1]:
      raise ValueError(f"text_emb, text_image_ids: expected (B, D) and (B,), got {text_emb.shape}, "
                       f"{text_image_ids.shape}")
    if image_mask is not None:
      keep = _mask(image_mask, image_ids.shape, "image_mask")
      image_emb, image_ids = image_emb[keep], image_ids[keep]
    if text_mask is not None:
      keep = _mask(text_mask, text_image_ids.shape, "text_mask")
      text_emb, text_image_ids = text_emb[keep], text_image_ids[keep]
    self._add_rows(image_emb=image_emb, image_ids=image_ids, text_emb=text_emb, text_image_ids=text_image_ids)

  def similarity(self) -> tuple[np.ndarray, np.ndarray]:
    """(I, T) similarity of the unique images with every text, and each text's image row."""
    img, ids = self.row("image_emb"), self.row("image_ids")
    txt, owner_ids = self.row("text_emb"), self.row("text_image_ids")
    if img is None or txt is None:
      raise ValueError("Retrieval: no images or no texts were added")
    unique_ids, first = np.unique(ids, return_index=True)
    img = img[first]
    pos = np.searchsorted(unique_ids, owner_ids)
    pos = np.minimum(pos, len(unique_ids) - 1)
    if np.any(unique_ids[pos] != owner_ids):
      missing = sorted(set(owner_ids.tolist()) - set(unique_ids.tolist()))[:10]
      raise ValueError(f"Retrieval: texts refer to image ids never added: {missing}")
    if self.normalize:
      img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
      txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
    return img @ txt.T, pos

  def compute(self) -> dict[str, float]:
    sim, owners = self.similarity()
    return recall_at_k(sim, owners, self.ks)
