"""Single-stream fusion, after VisualBERT (Li et al. 2019) and UNITER (Chen et al. 2020).

All modalities' tokens are projected to one width, tagged with a learned modality embedding
(and optionally learned positions), concatenated behind a [CLS] token and run through one
transformer encoder with the joint mask; the [CLS] output is the pooled vector. Absent
modalities and padded tokens are simply masked out; [CLS] is always attendable.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_token_output)
from mmjax.layers import Encoder, LearnedPositions, ModalityEmbed, dense, layer_norm
from mmjax.layers.attention import record_attention
from mmjax.layers.common import Dtype


@FUSIONS.register("single_stream")
class SingleStreamFusion(FusionBlock):
  """One joint transformer over the concatenated modalities.

  Attributes:
    proj: name -> dense (D_m -> features).
    modality_embed: one learned vector per modality, in construction order.
    positions: name -> LearnedPositions(max_len) when `max_len` is set, else None.
    cls: learned (features,) [CLS] token.
    embed_norm: LayerNorm over the summed embeddings (BERT's embedding norm).
    encoder: `depth` EncoderBlocks (`norm` "pre" with a final norm, or BERT's "post"); `attention`
      picks their attention kernel (see `MultiHeadAttention`).
    attention_maps: when True, aux["self_attention"][q][o] holds the weights of query rows q
      ("cls" or a modality) over modality o's tokens, (depth, B, H, N_q, N_o), recorded from the
      encoder's attention modules (with the reference kernel). May be switched on for one call
      of a built block (as `mmjax.viz` does).
  """

  def __init__(self, modalities: Mapping[str, int], features: int, *, depth: int = 2,
               num_heads: int = 4, mlp_dim: int | None = None, norm: str = "pre",
               max_len: int | None = None, act: str = "gelu", dropout: float = 0.0,
               attn_dropout: float = 0.0, attention: str = "auto", attention_maps: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    self.attention_maps = attention_maps
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})
    self.modality_embed = ModalityEmbed(len(self.names), features, param_dtype=param_dtype, rngs=rngs)
    self.positions = (nnx.Dict({m: LearnedPositions(max_len, features, param_dtype=param_dtype, rngs=rngs)
                                for m in self.names}) if max_len else None)
    self.cls = learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
    self.embed_norm = layer_norm(features, **kw)
    self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.encoder = Encoder(depth, features, num_heads, mlp_dim or 4 * features, norm=norm, act=act,
                           dropout=dropout, attn_dropout=attn_dropout, attention=attention, **kw)

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    B = x.batch
    cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (B, 1, self.features))
    seqs, masks = [cls], [jnp.ones((B, 1), bool)]
    for i, m in enumerate(self.names):
      h = self.modality_embed(self.proj[m](x.tokens[m]), i)  # (B, N_m, F)
      if self.positions is not None:
        h = self.positions[m](h)
      seqs.append(h)
      masks.append(x.masks[m])
    h = self.embed_dropout(self.embed_norm(jnp.concatenate(seqs, axis=1)), deterministic=deterministic)
    h = sharding.constrain(h, ("batch", "length", "embed"))  # (B, 1 + sum N_m, F)
    joint = jnp.concatenate(masks, axis=1)
    if self.attention_maps:
      with record_attention(self.encoder):
        h, recorded = nnx.capture(self.encoder, nnx.Intermediate)(h, joint, deterministic=deterministic)
      weights = jnp.stack([recorded["layers"][i]["attn"]["attention_weights"].get_value()[0]
                           for i in range(len(self.encoder.layers))])  # (depth, B, H, L, L)
    else:
      h = self.encoder(h, joint, deterministic=deterministic)
    tokens, slots, start = {}, {"cls": (0, 1)}, 1
    for m in self.names:
      n = x.tokens[m].shape[1]
      tokens[m] = masked_token_output(h[:, start:start + n], x.masks[m])
      slots[m] = (start, n)
      start += n
    aux = {}
    if self.attention_maps:
      aux["self_attention"] = {q: {o: weights[:, :, :, qs:qs + qn, ks:ks + kn]
                                   for o, (ks, kn) in slots.items() if o != "cls"}
                               for q, (qs, qn) in slots.items()}
    return FusionOutput(h[:, 0], tokens, aux)
