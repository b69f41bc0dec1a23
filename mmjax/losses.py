"""Losses for multimodal training: each maps arrays to `(scalar, metrics)`.

Every loss takes optional per-example `weights` (or a bool `mask`) so that padded examples of a
fixed-shape batch count for nothing; reductions are weighted means over the real examples, and an
all-padding batch gives 0, not NaN. Losses are computed in float32 whatever the input dtype.

The contrastive losses take the embeddings of the *global* batch. Under `jax.jit` with the batch
sharded over a mesh, XLA inserts the gathers the similarity matrix needs, so the value is the same
as on one device; no mesh axis is named here.

`joint_loss` is the seed article's multimodal objective L = sum_m w_m * L_m, with the weights taken
from config.

Temperature and bias are passed in as (learnable) arrays owned by the model; the constants below
are the published initial values.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]

# CLIP: logit scale exp(t) with t initialised to log(1 / 0.07).
CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
# SigLIP: t' = log 10 and b = -10.
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0

# Finite stand-in for -inf on masked logits: keeps softmax rows finite even when fully masked.
_MASKED_LOGIT = -1e30


def _example_weights(weights: jax.Array | None, shape: tuple[int, ...], field: str = "weights") -> jax.Array:
  """Float32 weights of `shape` (ones when None); bool masks become 0/1."""
  if weights is None:
    return jnp.ones(shape, jnp.float32)
  weights = jnp.asarray(weights)
  if weights.shape != shape:
    raise ValueError(f"{field}: expected shape {shape}, got {weights.shape}")
  return weights.astype(jnp.float32)


def _zero_unweighted(x: jax.Array, weights: jax.Array) -> jax.Array:
  """`x` with its zero-weight rows set to 0 before any arithmetic: a NaN or Inf there (a padded
  example's garbage) then reaches neither the loss nor, through the backward pass, the gradients."""
  keep = (weights != 0).reshape(weights.shape + (1,) * (x.ndim - weights.ndim))
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _weighted_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum(w * v) / sum(w), sum(w)); 0 when every weight is 0."""
  total = jnp.sum(weights)
  num = jnp.sum(jnp.where(weights != 0, values * weights, 0.0))
  return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0), total


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
  """Softmax cross-entropy with integer labels and optional label smoothing.

  With smoothing `a` over C classes the target is (1 - a) * one_hot + a / C (optax.smooth_labels).

  Args:
    logits: (..., C) unnormalised scores.
    labels: (...) integer class ids.
    weights: (...) per-example weights or bool mask; None weighs every example 1.
    label_smoothing: a in [0, 1).

  Returns:
    The weighted mean loss and {"loss", "accuracy", "weight"} (weight: sum of weights, for
    accumulating means across batches).
  """
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels: expected shape {logits.shape[:-1]} (logits without the class axis), "
                     f"got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels: expected integer class ids, got dtype {labels.dtype}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")
  w = _example_weights(weights, labels.shape)
  logits = _zero_unweighted(logits.astype(jnp.float32), w)
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss, total = _weighted_mean(per_example, w)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  accuracy, _ = _weighted_mean(correct, w)
  return loss, {"loss": loss, "accuracy": accuracy, "weight": total}


def soft_score_bce(
    logits: jax.Array,
    scores: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Sigmoid binary cross-entropy against VQA soft scores (bottom-up/top-down, LXMERT).

  Each answer is an independent sigmoid whose target is its soft score min(#humans / 3, 1). The
  per-example loss sums over answers (as `BCEWithLogits(mean) * num_answers` in LXMERT), then the
  batch is averaged.

  Args:
    logits: (B, A) answer logits.
    scores: (B, A) targets in [0, 1].
    weights: (B,) per-example weights or bool mask.

  Returns:
    The loss and {"loss", "score", "weight"}; score is the mean soft score of the arg-max answer,
    the usual training-time VQA accuracy.
  """
  if logits.ndim != 2 or scores.shape != logits.shape:
    raise ValueError(f"scores: expected the logits' shape (B, A) = {logits.shape}, got {scores.shape}")
  w = _example_weights(weights, logits.shape[:1])
  logits, scores = (_zero_unweighted(x.astype(jnp.float32), w) for x in (logits, scores))
  per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, scores), axis=-1)  # (B,)
  loss, total = _weighted_mean(per_example, w)
  top = jnp.take_along_axis(scores, jnp.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0]
  score, _ = _weighted_mean(top, w)
  return loss, {"loss": loss, "score": score, "weight": total}


def mse(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Mean squared error.

  Args:
    predictions: (B, ...) values.
    targets: same shape as predictions.
    weights: shape equal to a prefix of predictions' shape, e.g. (B,) or (B, L); the squared
      error is averaged over the remaining axes, then weighted-averaged over these.

  Returns:
    The loss and {"loss", "weight"}.
  """
  if targets.shape != predictions.shape:
    raise ValueError(f"targets: expected the predictions' shape {predictions.shape}, got {targets.shape}")
  if weights is not None and jnp.shape(weights) != predictions.shape[:jnp.ndim(weights)]:
    raise ValueError(f"weights: expected a prefix of {predictions.shape}, got {jnp.shape(weights)}")
  lead = predictions.shape[:jnp.ndim(weights)] if weights is not None else predictions.shape[:1]
  w = _example_weights(weights, lead)
  err = jnp.square(_zero_unweighted(predictions.astype(jnp.float32), w)
                   - _zero_unweighted(targets.astype(jnp.float32), w))
  per_example = jnp.mean(err.reshape(lead + (-1,)), axis=-1)
  loss, total = _weighted_mean(per_example, w)
  return loss, {"loss": loss, "weight": total}


def _contrastive_inputs(a: jax.Array, b: jax.Array, mask: jax.Array | None, normalize: bool,
                        names: tuple[str, str]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks (B, D) pairs, L2-normalises in float32, returns (a, b, mask as float (B,))."""
  for x, name in zip((a, b), names):
    if x.ndim != 2:
      raise ValueError(f"{name}: expected shape (B, D), got {x.shape}")
  if a.shape != b.shape:
    raise ValueError(f"{names[1]}: expected the {names[0]} shape {a.shape}, got {b.shape}")
  m = _example_weights(mask, a.shape[:1], "mask")
  a, b = (_zero_unweighted(x.astype(jnp.float32), m) for x in (a, b))
  if normalize:
    a = a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-12))
    b = b * jax.lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1, keepdims=True), 1e-12))
  return a, b, m


def _scale(log_scale: jax.Array | float) -> jax.Array:
  log_scale = jnp.asarray(log_scale, jnp.float32)
  if log_scale.ndim != 0:
    raise ValueError(f"log_scale: expected a scalar, got shape {log_scale.shape}")
  return jnp.exp(log_scale)


def _info_nce_logits(logits: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row-wise InfoNCE on (B, B) logits with positives on the diagonal: (loss, top-1 accuracy)."""
  logits = jnp.where(m[None, :] > 0, logits, _MASKED_LOGIT)  # padded keys are no negatives
  labels = jnp.arange(logits.shape[0])
  per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss, _ = _weighted_mean(per_row, m)
  acc, _ = _weighted_mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), m)
  return loss, acc


def info_nce(
    queries: jax.Array,
    keys: jax.Array,
    log_scale: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    normalize: bool = True,
) -> tuple[jax.Array, Metrics]:
  """One-directional InfoNCE: query i's positive is key i, every other key is a negative.

  loss = mean_i -log softmax_j(exp(log_scale) * <q_i, k_j>)[i]; exp(log_scale) is 1 / temperature.

  Args:
    queries: (B, D) global-batch embeddings.
    keys: (B, D) global-batch embeddings, paired with queries by index.
    log_scale: scalar, the (learnable) log inverse temperature.
    mask: (B,) bool, False for padding: padded pairs give no loss and are no negatives.
    normalize: L2-normalise both sides first (cosine similarity).

  Returns:
    The loss and {"loss", "accuracy"} (top-1 in-batch retrieval of the positive).
  """
  scale = _scale(log_scale)
  q, k, m = _contrastive_inputs(queries, keys, mask, normalize, ("queries", "keys"))
  loss, acc = _info_nce_logits(scale * (q @ k.T), m)  # (B, B)
  return loss, {"loss": loss, "accuracy": acc}


def clip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    log_scale: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    normalize: bool = True,
) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric softmax contrastive loss: the mean of image->text and text->image InfoNCE.

  Args:
    image_emb: (B, D) global-batch embeddings of one modality (image, or audio).
    text_emb: (B, D) global-batch embeddings of the other, paired by index.
    log_scale: scalar, learnable log logit scale (init `CLIP_INIT_LOG_SCALE`).
    mask: (B,) bool, False for padding.
    normalize: L2-normalise the embeddings first.

  Returns:
    The loss and {"loss", "i2t_accuracy", "t2i_accuracy", "scale"}.
  """
  scale = _scale(log_scale)
  x, y, m = _contrastive_inputs(image_emb, text_emb, mask, normalize, ("image_emb", "text_emb"))
  logits = scale * (x @ y.T)  # (B, B): rows images, columns texts
  i2t, i2t_acc = _info_nce_logits(logits, m)
  t2i, t2i_acc = _info_nce_logits(logits.T, m)
  loss = 0.5 * (i2t + t2i)
  return loss, {"loss": loss, "i2t_accuracy": i2t_acc, "t2i_accuracy": t2i_acc, "scale": scale}


def siglip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    log_scale: jax.Array | float,
    bias: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    normalize: bool = True,
) -> tuple[jax.Array, Metrics]:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

  loss = -1/|B| sum_i sum_j log sigmoid(z_ij * (exp(t') <x_i, y_j> + b)), z_ij = 1 if i = j else -1;
  with a mask, the sums run over real pairs and |B| counts real examples.

  Args:
    image_emb: (B, D) global-batch embeddings.
    text_emb: (B, D) global-batch embeddings, paired by index.
    log_scale: scalar t', learnable (init `SIGLIP_INIT_LOG_SCALE`).
    bias: scalar b, learnable (init `SIGLIP_INIT_BIAS`).
    mask: (B,) bool, False for padding.
    normalize: L2-normalise the embeddings first.

  Returns:
    The loss and {"loss", "positive_prob", "scale", "bias"}; positive_prob is the mean sigmoid
    of the matching pairs.
  """
  scale = _scale(log_scale)
  bias = jnp.asarray(bias, jnp.float32)
  if bias.ndim != 0:
    raise ValueError(f"bias: expected a scalar, got shape {bias.shape}")
  x, y, m = _contrastive_inputs(image_emb, text_emb, mask, normalize, ("image_emb", "text_emb"))
  logits = scale * (x @ y.T) + bias  # (B, B)
  eye = jnp.eye(logits.shape[0], dtype=bool)
  signs = jnp.where(eye, 1.0, -1.0)
  pair_w = m[:, None] * m[None, :]
  pair_loss = -jax.nn.log_sigmoid(signs * logits)
  total = jnp.sum(m)
  denom = jnp.where(total > 0, total, 1.0)
  loss = jnp.sum(jnp.where(pair_w > 0, pair_loss * pair_w, 0.0)) / denom
  pos, _ = _weighted_mean(jax.nn.sigmoid(jnp.diagonal(logits)), m)
  return loss, {"loss": loss, "positive_prob": pos, "scale": scale, "bias": bias}


def joint_loss(
    terms: Mapping[str, jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]],
    weights: Mapping[str, float] | Any,
) -> tuple[jax.Array, Metrics]:
  """The seed article's multimodal loss L = sum_m w_m * L_m.

  Args:
    terms: name -> loss, or name -> (loss, metrics) as returned by the losses above; one entry per
      modality, task or auxiliary head.
    weights: name -> w_m >= 0 (a dict or an ml_collections ConfigDict). Its names must be exactly
      those of `terms`: a term without a weight and a weight without a term are both errors.

  Returns:
    The total and metrics {"loss": total, "<name>/loss": L_m, "<name>/<metric>": ...}.
  """
  if hasattr(weights, "to_dict"):
    weights = weights.to_dict()
  if not isinstance(weights, Mapping):
    raise TypeError(f"weights: expected a mapping of loss name -> weight, got {type(weights).__name__}")
  missing = sorted(set(terms) - set(weights))
  unknown = sorted(set(weights) - set(terms))
  if missing or unknown:
    raise ValueError(f"joint_loss weights: no weight for terms {missing}; weights name unknown terms "
                     f"{unknown}; terms are {sorted(terms)}, weights are {sorted(weights)}")
  total = jnp.zeros((), jnp.float32)
  metrics: Metrics = {}
  for name in sorted(terms):
    w = weights[name]
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
      raise ValueError(f"weights[{name!r}]: expected a finite number >= 0, got {w!r}")
    term = terms[name]
    value, term_metrics = term if isinstance(term, tuple) else (term, {})
    value = jnp.asarray(value, jnp.float32)
    if value.ndim != 0:
      raise ValueError(f"terms[{name!r}]: expected a scalar loss, got shape {value.shape}")
    total = total + w * value
    metrics[f"{name}/loss"] = value
    metrics.update({f"{name}/{k}": v for k, v in term_metrics.items() if k != "loss"})
  metrics["loss"] = total
  return total, metrics
