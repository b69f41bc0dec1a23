"""Contrastive dual encoders: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

Two towers, each any registered encoder (image-text, audio-text, or any other pair), map their
pooled vector through a bias-free linear projection into one shared space (or, with
`projection=False`, already output it, as SigLIP's towers with their own heads), where embeddings
are L2-normalised. A learnable log logit scale (CLIP: log(1 / 0.07); SigLIP: log 10) and, for SigLIP,
a learnable bias (-10) turn cosine similarities into logits; the losses are `mmjax.losses.clip_loss`
and `siglip_loss` on the global batch (under `jax.jit` with the batch sharded, XLA gathers what the
similarity matrix needs).

Inputs are given per tower as the encoder's arguments: an array (one positional argument), a tuple
(positional arguments, e.g. `(ids, mask)`), or a dict (keyword arguments, e.g. `{"x": audio,
"lengths": n}`), as `mmjax.models.base.encode` takes them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import losses, sharding
from mmjax.layers.common import Dtype, dense, part
from mmjax.models.base import (MODELS, check_examples, encode, encoder_dims, make_encoders,
                               modality_order)

LOSS_TYPES = ("clip", "siglip")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis, in float32 (zeros stay zeros)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _scalar_param(value: float, rngs: nnx.Rngs) -> nnx.Param:
  """A replicated learnable float32 scalar initialised to `value`."""
  return nnx.Param(part(nnx.initializers.constant(value), ())(rngs.params(), (), jnp.float32))


@MODELS.register("dual_encoder")
class DualEncoder(nnx.Module):
  """Two encoders projected into one normalised embedding space, trained contrastively.

  Attributes:
    names: the two tower names in `mmjax.models.base.MODALITY_ORDER` (image, video, audio, text,
      then others alphabetically); the first gives the rows of the similarity matrix (CLIP's
      images), the second its columns (texts).
    encoders: name -> encoder (a tower).
    proj: name -> bias-free dense (pooled width -> embed_dim), or None without projections.
    log_scale: learnable log logit scale t (logits = exp(t) * cosine [+ bias]).
    bias: learnable logit bias b (SigLIP only; None for CLIP).
    loss_type: "clip" (softmax, symmetric) or "siglip" (pairwise sigmoid).
    max_log_scale: log of the cap on exp(t) (CLIP clips it at 100), or None.

  Args:
    encoders: exactly two name -> encoder spec {'name': registered encoder, **kwargs} (or a built
      encoder module), e.g. {"image": {"name": "vit", ...}, "text": {"name": "bert", ...}}.
    input_examples: name -> one example input of that tower as `encode` takes it, with
      `jax.ShapeDtypeStruct`s or arrays as leaves (any batch size); used to size the projections.
    embed_dim: width E of the shared space.
    projection: True: a bias-free dense per tower maps its pooled vector to E. False: the towers
      already output the shared space (their pooled width must be E), as SigLIP's towers do with
      their own heads.
    loss_type: "clip" or "siglip".
    init_log_scale: initial t; default log(1 / 0.07) for CLIP, log 10 for SigLIP.
    init_bias: initial b for SigLIP; default -10.
    max_logit_scale: cap on exp(t) (100 as CLIP), or None for none.
    dtype, param_dtype: compute and parameter dtypes (the scale and bias stay float32).
    rngs: parameter keys (and dropout keys of the encoders).
  """

  def __init__(self, *, encoders: Mapping[str, Any], input_examples: Mapping[str, Any], embed_dim: int,
               projection: bool = True, loss_type: str = "clip", init_log_scale: float | None = None,
               init_bias: float | None = None, max_logit_scale: float | None = 100.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(encoders, Mapping) or len(encoders) != 2:
      got = list(encoders) if isinstance(encoders, Mapping) else type(encoders).__name__
      raise ValueError(f"encoders: expected a dict of exactly two name -> encoder spec, got {got}")
    if loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(embed_dim, int) or embed_dim < 1:
      raise ValueError(f"embed_dim: expected a positive int, got {embed_dim!r}")
    if max_logit_scale is not None and max_logit_scale <= 0:
      raise ValueError(f"max_logit_scale: expected > 0 or None, got {max_logit_scale}")
    if init_bias is not None and loss_type != "siglip":
      raise ValueError("init_bias: only SigLIP has a logit bias")
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    check_examples(input_examples, tuple(encoders))
    self.loss_type, self.embed_dim = loss_type, embed_dim
    self.encoders = make_encoders(encoders, None, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.names = modality_order(encoders)
    widths = {m: encoder_dims(self.encoders[m], input_examples[m])[1] for m in self.names}
    if projection:
      self.proj = nnx.Dict({m: dense(widths[m], embed_dim, ("embed", None), use_bias=False, rngs=rngs,
                                     dtype=dtype, param_dtype=param_dtype) for m in self.names})
    else:
      wrong = {m: w for m, w in widths.items() if w != embed_dim}
      if wrong:
        raise ValueError(f"projection=False: each tower's pooled width must equal embed_dim={embed_dim} "
                         f"(the towers output the shared space), got {wrong}")
      self.proj = None
    if init_log_scale is None:
      init_log_scale = losses.CLIP_INIT_LOG_SCALE if loss_type == "clip" else losses.SIGLIP_INIT_LOG_SCALE
    self.log_scale = _scalar_param(float(init_log_scale), rngs)
    if loss_type == "siglip":
      self.bias = _scalar_param(losses.SIGLIP_INIT_BIAS if init_bias is None else float(init_bias), rngs)
    else:
      self.bias = None
    self.max_log_scale = None if max_logit_scale is None else math.log(max_logit_scale)

  def effective_log_scale(self) -> jax.Array:
    """The log logit scale t, capped at `max_log_scale`."""
    t = self.log_scale[...]
    return t if self.max_log_scale is None else jnp.minimum(t, self.max_log_scale)

  def logit_bias(self) -> jax.Array:
    """The logit bias b (0 for CLIP)."""
    return jnp.zeros((), jnp.float32) if self.bias is None else self.bias[...]

  def embed(self, name: str, args: Any, *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(normalised embeddings (B, E) float32, pooled (B, D)) of one tower's inputs."""
    if name not in self.names:
      raise ValueError(f"tower {name!r}: expected one of {list(self.names)}")
    out = encode(self.encoders[name], args, deterministic=deterministic)
    z = l2_normalize(out.pooled if self.proj is None else self.proj[name](out.pooled))  # (B, E)
    return sharding.constrain(z, ("batch", None)), out.pooled

  def __call__(self, inputs: Mapping[str, Any], *,
               deterministic: bool = True) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Embeds each given tower's inputs (one tower alone is fine, e.g. to index a gallery).

    Args:
      inputs: tower name -> encoder arguments (array, tuple of positional args, or dict of kwargs).
      deterministic: disables dropout when True.

    Returns:
      ({name: L2-normalised embeddings (B, E) float32}, aux) with aux {"logit_scale": exp(t)
      (capped), "logit_bias": b (0 for CLIP), "pooled": {name: the encoder's pooled (B, D)}}.
    """
    if not isinstance(inputs, Mapping) or not inputs:
      raise ValueError(f"inputs: expected a non-empty dict of tower name -> encoder arguments, "
                       f"towers are {list(self.names)}")
    emb, pooled = {}, {}
    for name in inputs:
      emb[name], pooled[name] = self.embed(name, inputs[name], deterministic=deterministic)
    aux = {"logit_scale": jnp.exp(self.effective_log_scale()), "logit_bias": self.logit_bias(),
           "pooled": pooled}
    return emb, aux

  def loss(self, outputs: Mapping[str, jax.Array], mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The contrastive loss of both towers' embeddings over the global batch.

    Args:
      outputs: the embeddings returned by `__call__`, with both towers.
      mask: (B,) bool, False for padded examples (they give no loss and are no negatives).

    Returns:
      The loss and metrics: CLIP {"loss", "i2t_accuracy", "t2i_accuracy", "scale"}; SigLIP
      {"loss", "positive_prob", "scale", "bias"}.
    """
    missing = [m for m in self.names if m not in outputs]
    if missing:
      raise ValueError(f"outputs: missing embeddings of tower(s) {missing}; the loss needs both {list(self.names)}")
    a, b = (outputs[m] for m in self.names)
    if self.loss_type == "clip":
      return losses.clip_loss(a, b, self.effective_log_scale(), mask=mask, normalize=False)
    return losses.siglip_loss(a, b, self.effective_log_scale(), self.bias[...], mask=mask, normalize=False)

  def similarity(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity (N_a, N_b) of embeddings a (N_a, E) and b (N_b, E), in float32.

    Ranks retrieval candidates; `aux["logit_scale"] * similarity + aux["logit_bias"]` gives logits.
    """
    for x, field in ((a, "a"), (b, "b")):
      if getattr(x, "ndim", None) != 2 or x.shape[-1] != self.embed_dim:
        raise ValueError(f"{field}: expected embeddings of shape (N, {self.embed_dim}), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    return l2_normalize(a) @ l2_normalize(b).T
