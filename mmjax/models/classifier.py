"""Multimodal classification: one encoder per modality, any fusion block, a classification head.

Optional auxiliary unimodal heads (a linear classifier on each modality's pooled encoder vector)
add their losses to the fused one through `mmjax.losses.joint_loss`, the seed article's
L = sum_m w_m * L_m, with the weights from config, e.g. {"fused": 1.0, "image": 0.3, "audio": 0.3}.
A modality named in the weights gets an auxiliary head; "fused" is the main head.

Missing modalities are first-class: `presence` gives a (B,) bool per modality, and a modality left
out of `inputs` is absent for every example. An absent modality does not change the fused logits
whatever its inputs hold: its floating-point inputs are replaced by zeros before its encoder runs
(so NaN placeholders neither trip input checks nor poison gradients) and the fusion block ignores
its tokens. Its auxiliary loss counts only the examples where it is present. In training, whole
modalities are dropped per example with probability `modality_dropout` (see
`mmjax.fusion.modality_dropout`); that drop affects the fusion only, not the auxiliary heads.
Encoders with BatchNorm in training mode still mix the zeroed inputs of absent examples into their
batch statistics; prefer LayerNorm/GroupNorm encoders when modalities are often missing.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import losses
from mmjax.fusion import build_fusion, modality_dropout
from mmjax.layers.common import Dtype, dense
from mmjax.models.base import MODELS, check_examples, encode, encoder_dims, make_encoders, modality_order
from mmjax.models.vqa import AnswerHead

MAIN = "fused"


def _batch_size(name: str, args: Any) -> int:
  """The leading dimension of the first array among a modality's encoder arguments."""
  for leaf in jax.tree.leaves(args):
    if getattr(leaf, "ndim", 0) >= 1:
      return int(leaf.shape[0])
  raise ValueError(f"inputs[{name!r}]: expected at least one array with a leading batch axis")


def _blank_absent(args: Any, present: jax.Array) -> Any:
  """Zeros in every floating (B, ...) argument where present (B,) is False; other leaves as given."""

  def blank(x):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if x.ndim < 1 or x.shape[0] != present.shape[0]:
      return x
    p = present.reshape(present.shape + (1,) * (x.ndim - 1))
    return jnp.where(p, x, jnp.zeros((), x.dtype))

  return jax.tree.map(blank, args)


@MODELS.register("classifier")
class MultimodalClassifier(nnx.Module):
  """Classifies examples from several modalities fused by any fusion block.

  Attributes:
    names: modality names in `mmjax.models.base.MODALITY_ORDER` (image, video, audio, text, then
      others alphabetically): the order encoders are built and fused in.
    encoders: name -> encoder.
    fusion: the fusion block over all modalities.
    head: classifier on the fused pooled vector (linear, or an MLP when `head_hidden` is set).
    aux_heads: name -> linear classifier on that modality's pooled encoder vector, for the
      modalities named in `loss_weights`.
    loss_weights: "fused" and modality name -> weight of its loss in `joint_loss`.

  Args:
    encoders: name -> encoder spec {'name': registered encoder, **kwargs} (or a built module),
      e.g. {"image": {"name": "small_cnn", ...}, "audio": {"name": "audio_cnn", ...}}.
    input_examples: name -> one example input of that encoder as `mmjax.models.base.encode`
      takes it (an array, a tuple of positional arguments, or a dict of keywords), with
      `jax.ShapeDtypeStruct`s or arrays as leaves (any batch size); used to size the fusion and heads.
    fusion: fusion family name (see `mmjax.fusion.FUSIONS.names()`); fusion_kwargs its extra args.
    features: fused width.
    num_classes: number of classes C.
    loss_weights: {"fused": w, name: w_m, ...}; default {"fused": 1.0} (no auxiliary heads).
    head_hidden: hidden width of an MLP head; None for a linear head.
    head_dropout: dropout inside the MLP head.
    label_smoothing: label smoothing of every cross-entropy term.
    modality_dropout: probability of dropping a whole modality per example in training.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: parameter and dropout keys.
  """

  def __init__(self, *, encoders: Mapping[str, Any], input_examples: Mapping[str, Any], fusion: str,
               features: int, num_classes: int, fusion_kwargs: Mapping[str, Any] | None = None,
               loss_weights: Mapping[str, float] | Any | None = None, head_hidden: int | None = None,
               head_dropout: float = 0.0, label_smoothing: float = 0.0,
               modality_dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(encoders, Mapping) or not encoders:
      raise ValueError("encoders: expected a non-empty dict of modality name -> encoder spec")
    if MAIN in encoders:
      raise ValueError(f"encoders: {MAIN!r} is reserved for the fused head; rename that modality")
    if not isinstance(num_classes, int) or num_classes < 2:
      raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if not 0.0 <= float(modality_dropout) <= 1.0:
      raise ValueError(f"modality_dropout: expected a probability in [0, 1], got {modality_dropout}")
    self.names = modality_order(encoders)
    check_examples(input_examples, self.names)
    weights = {MAIN: 1.0} if loss_weights is None else loss_weights
    if hasattr(weights, "to_dict"):
      weights = weights.to_dict()
    if not isinstance(weights, Mapping) or MAIN not in weights:
      raise ValueError(f"loss_weights: expected a dict with {MAIN!r} and optional modality names, got {weights!r}")
    unknown = sorted(set(weights) - {MAIN, *self.names})
    if unknown:
      raise ValueError(f"loss_weights: unknown term(s) {unknown}; expected {MAIN!r} and some of {list(self.names)}")
    for k, v in weights.items():
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"loss_weights[{k!r}]: expected a finite number >= 0, got {v!r}")
    self.loss_weights = {k: float(v) for k, v in weights.items()}
    self.num_classes, self.label_smoothing = num_classes, float(label_smoothing)
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    kw = dict(rngs=rngs, dtype=dtype)
    self.encoders = make_encoders(encoders, None, param_dtype=param_dtype, **kw)
    dims = {m: encoder_dims(self.encoders[m], input_examples[m]) for m in self.names}
    self.fusion = build_fusion(fusion, modalities={m: d[0] for m, d in dims.items()}, features=features,
                               param_dtype=param_dtype, **kw, **dict(fusion_kwargs or {}))
    if head_hidden is None:
      self.head = dense(features, num_classes, ("embed", "vocab"), param_dtype=param_dtype, **kw)
    else:
      self.head = AnswerHead(features, head_hidden, num_classes, dropout=head_dropout,
                             param_dtype=param_dtype, **kw)
    self.aux_heads = nnx.Dict({m: dense(dims[m][1], num_classes, ("embed", "vocab"),
                                        param_dtype=param_dtype, **kw)
                               for m in self.names if m in self.loss_weights})
    self.modality_dropout = float(modality_dropout)
    self.rngs = rngs.fork() if self.modality_dropout else None

  def _presence(self, inputs: Mapping[str, Any], presence: Mapping[str, Any] | None,
                batch: int) -> dict[str, jax.Array]:
    """Validated (B,) bool presence of every given modality (True when not specified)."""
    presence = {} if presence is None else presence
    if not isinstance(presence, Mapping):
      raise TypeError(f"presence: expected a dict of modality name -> (B,) bool, got {type(presence).__name__}")
    unknown = [m for m in presence if m not in self.names]
    if unknown:
      raise ValueError(f"presence: unknown modality {unknown[0]!r}; modalities are {list(self.names)}")
    out = {}
    for m in inputs:
      if m not in presence:
        out[m] = jnp.ones((batch,), bool)
        continue
      p = jnp.asarray(presence[m])
      if p.shape != (batch,):
        raise ValueError(f"presence[{m!r}]: expected shape (B,) = ({batch},), got {p.shape}")
      out[m] = p.astype(bool)
    return out

  def __call__(self, inputs: Mapping[str, Any], presence: Mapping[str, Any] | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, dict[str, Any]]:
    """Classifies a batch.

    Args:
      inputs: modality name -> encoder arguments (an array, a tuple of positional arguments, or
        a dict of keywords); a left-out modality is absent for every example.
      presence: modality name -> (B,) bool, False where the example lacks that modality.
      deterministic: disables dropout and modality dropout when True.

    Returns:
      logits (B, C) float32 and aux {"unimodal_logits": {name: (B, C)} (modalities with an
      auxiliary head that are in `inputs`), "presence": {name: (B,) bool} (as given, for the
      auxiliary losses), "pooled": {name: (B, D_m)}, "fusion": the fusion block's aux (its
      "present" is the effective presence after modality dropout)}.
    """
    if not isinstance(inputs, Mapping) or not inputs:
      raise ValueError(f"inputs: expected a non-empty dict of modality name -> encoder arguments, "
                       f"modalities are {list(self.names)}")
    unknown = [m for m in inputs if m not in self.names]
    if unknown:
      raise ValueError(f"inputs: unknown modality {unknown[0]!r}; modalities are {list(self.names)}")
    sizes = {m: _batch_size(m, inputs[m]) for m in inputs}
    batch = next(iter(sizes.values()))
    if any(b != batch for b in sizes.values()):
      raise ValueError(f"inputs: every modality needs the same batch size, got {sizes}")
    present = self._presence(inputs, presence, batch)
    given = presence or {}
    outs = {m: encode(self.encoders[m], _blank_absent(inputs[m], present[m]) if m in given else inputs[m],
                      deterministic=deterministic) for m in inputs}
    fusion_presence = present
    if self.modality_dropout and not deterministic:
      fusion_presence = modality_dropout(present, self.modality_dropout, self.rngs.dropout())
    fused = self.fusion({m: (o.tokens, o.mask) for m, o in outs.items()}, fusion_presence,
                        deterministic=deterministic)
    if isinstance(self.head, AnswerHead):
      logits = self.head(fused.pooled, deterministic=deterministic)
    else:
      logits = self.head(fused.pooled)
    unimodal = {m: self.aux_heads[m](outs[m].pooled).astype(jnp.float32)
                for m in outs if m in self.aux_heads}
    aux = {"unimodal_logits": unimodal, "presence": present,
           "pooled": {m: o.pooled for m, o in outs.items()}, "fusion": fused.aux}
    return logits.astype(jnp.float32), aux

  def loss(self, outputs: jax.Array, aux: Mapping[str, Any], labels: jax.Array,
           weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The joint loss sum_k w_k * L_k over the fused head and the auxiliary heads.

    Each L_k is `mmjax.losses.softmax_cross_entropy`; an auxiliary term weighs each example by
    its modality's presence (a modality left out of the inputs gives 0).

    Args:
      outputs: logits (B, C) from `__call__`; aux: its aux.
      labels: (B,) integer class ids.
      weights: (B,) per-example weights or bool mask (padding False).

    Returns:
      The total and metrics {"loss", "accuracy" (fused head), "<term>/loss", "<term>/accuracy",
      "<term>/weight"} for the terms "fused" and each auxiliary modality.
    """
    labels = jnp.asarray(labels)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != labels.shape:
      raise ValueError(f"weights: expected the labels' shape {labels.shape}, got {w.shape}")
    ce = lambda logits, ww: losses.softmax_cross_entropy(logits, labels, weights=ww,
                                                         label_smoothing=self.label_smoothing)
    terms = {MAIN: ce(outputs, w)}
    for m in self.aux_heads:
      if m in aux["unimodal_logits"]:
        terms[m] = ce(aux["unimodal_logits"][m], w * aux["presence"][m].astype(jnp.float32))
      else:
        zero = jnp.zeros((), jnp.float32)
        terms[m] = (zero, {"loss": zero, "accuracy": zero, "weight": zero})
    total, metrics = losses.joint_loss(terms, self.loss_weights)
    metrics["accuracy"] = metrics[f"{MAIN}/accuracy"]
    return total, metrics
