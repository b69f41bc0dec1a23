"""Gated multimodal unit (Arevalo et al. 2017, arXiv 1702.01992), generalised to M modalities.

The GMU computes h_m = tanh(W_m x_m) per modality and gates z = sigma(W_z [x_1; ...; x_M]); for
two modalities h = z * h_1 + (1 - z) * h_2. With M modalities the gate gives one logit vector per
modality and either a softmax over the present modalities (`gate="softmax"`, equal to the
original for M = 2) or independent sigmoids (`gate="sigmoid"`) weights the h_m.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, select)
from mmjax.layers import dense
from mmjax.layers.common import Dtype


@FUSIONS.register("gated")
class GatedFusion(FusionBlock):
  """Gated multimodal unit over masked-mean pooled modality features.

  An absent modality gets gate 0; in the gate's input its pooled features are replaced by a
  learned "missing" embedding.

  Attributes:
    hidden: name -> dense (D_m -> features), followed by tanh.
    gate: dense (sum D_m -> M * features) giving per-modality, per-channel gate logits.
    missing: name -> learned (D_m,) gate input for an absent modality.
    gate_fn: "softmax" (over present modalities) or "sigmoid" (independent gates).
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, gate: str = "softmax",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if gate not in ("softmax", "sigmoid"):
      raise ValueError(f"gate must be 'softmax' or 'sigmoid', got {gate!r}")
    self.gate_fn = gate
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.hidden = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})
    total = sum(d for _, d in self.modality_dims)
    self.gate = dense(total, len(self.names) * features, ("embed", "mlp"), **kw)
    self.missing = nnx.Dict({m: learned((d,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m, d in self.modality_dims})

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    pooled = {m: masked_mean(x.tokens[m], x.masks[m]) for m in self.names}  # (B, D_m)
    present = jnp.stack([x.present[m] for m in self.names], axis=1)[..., None]  # (B, M, 1)
    h = jnp.stack([jnp.tanh(self.hidden[m](pooled[m])) for m in self.names], axis=1)  # (B, M, F)
    gate_in = jnp.concatenate([select(x.present[m], pooled[m], self.missing[m][...])
                               for m in self.names], axis=-1)  # (B, sum D_m)
    logits = self.gate(gate_in).reshape(h.shape).astype(jnp.float32)  # (B, M, F)
    if self.gate_fn == "softmax":
      z = jax.nn.softmax(jnp.where(present, logits, jnp.finfo(jnp.float32).min), axis=1)
    else:
      z = jax.nn.sigmoid(logits)
    z = jnp.where(present, z, 0.0).astype(h.dtype)
    fused = (z * h).sum(axis=1)  # (B, F)
    return FusionOutput(fused, None, {"gates": z})
