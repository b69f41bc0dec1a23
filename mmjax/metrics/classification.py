"""Classification metrics: accuracy and confusion matrix (jit-able), and their accumulator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.metrics.accumulate import Accumulator


def _predictions(predictions: jax.Array, labels: jax.Array) -> jax.Array:
  """Class ids from ids (same shape as labels) or from scores (labels' shape + (C,))."""
  if predictions.shape == labels.shape:
    return predictions
  if predictions.shape[:-1] == labels.shape:
    return jnp.argmax(predictions, axis=-1)
  raise ValueError(f"predictions: expected class ids of shape {labels.shape} or scores of shape "
                   f"{labels.shape + ('C',)}, got {predictions.shape}")


def _mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  if jnp.shape(mask) != shape:
    raise ValueError(f"mask: expected shape {shape}, got {jnp.shape(mask)}")
  return jnp.asarray(mask).astype(jnp.float32)


@jax.jit
def accuracy(predictions: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of correct predictions over the unmasked examples (0 when all are masked).

  Args:
    predictions: class ids (...) or scores (..., C), arg-maxed.
    labels: (...) integer class ids.
    mask: (...) bool, False for padding.
  """
  labels = jnp.asarray(labels)
  preds = _predictions(jnp.asarray(predictions), labels)
  m = _mask(mask, labels.shape)
  total = jnp.sum(m)
  return jnp.where(total > 0, jnp.sum((preds == labels) * m) / jnp.where(total > 0, total, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames="num_classes")
def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """(C, C) int32 counts, rows true class, columns predicted (scikit-learn's layout).

  Args:
    predictions: class ids (...) or scores (..., C).
    labels: (...) integer class ids in [0, C).
    num_classes: C.
    mask: (...) bool, False for padding. Pairs with an id outside [0, C) are not counted either.
  """
  labels = jnp.asarray(labels)
  preds = _predictions(jnp.asarray(predictions), labels)
  in_range = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  m = (_mask(mask, labels.shape) * in_range).astype(jnp.int32)
  flat = jnp.where(in_range, labels * num_classes + preds, 0).reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(m.reshape(-1))
  return counts.reshape(num_classes, num_classes)


class ConfusionMatrix(Accumulator):
  """Accumulates a confusion matrix over batches and hosts.

  `compute()` gives accuracy, balanced accuracy (mean per-class recall over classes that occur)
  and the matrix itself (rows true, columns predicted).

  Attributes:
    num_classes: C.
  """

  def __init__(self, num_classes: int):
    if num_classes < 1:
      raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    self.num_classes = num_classes
    super().__init__()

  def _config(self) -> tuple:
    return super()._config() + (self.num_classes,)

  def _zero_sums(self) -> dict[str, np.ndarray]:
    return {"matrix": np.zeros((self.num_classes, self.num_classes), np.int64)}

  def update(self, predictions, labels, mask=None) -> None:
    """Adds a batch of class ids (...) or scores (..., C) with labels (...); `mask` marks real
    examples. Counted on the host with numpy (no compilation per batch shape)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if predictions.shape == labels.shape + (self.num_classes,):
      predictions = predictions.argmax(-1)
    if predictions.shape != labels.shape:
      raise ValueError(f"predictions: expected class ids of shape {labels.shape} or scores of shape "
                       f"{labels.shape + (self.num_classes,)}, got {predictions.shape}")
    keep = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    if keep.shape != labels.shape:
      raise ValueError(f"mask: expected shape {labels.shape}, got {keep.shape}")
    labels, predictions = labels[keep], predictions[keep]
    for name, ids in (("labels", labels), ("predictions", predictions)):
      if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
        raise ValueError(f"{name}: expected ids in [0, {self.num_classes}), got range [{ids.min()}, {ids.max()}]")
    np.add.at(self.sums["matrix"], (labels, predictions), 1)

  @property
  def matrix(self) -> np.ndarray:
    return self.sums["matrix"]

  def compute(self) -> dict[str, object]:
    mat = self.matrix
    total = mat.sum()
    per_class = mat.sum(axis=1)
    seen = per_class > 0
    recall = np.diag(mat)[seen] / per_class[seen]
    return {
        "accuracy": float(np.trace(mat) / total) if total else 0.0,
        "balanced_accuracy": float(recall.mean()) if recall.size else 0.0,
        "confusion_matrix": mat.copy(),
    }
