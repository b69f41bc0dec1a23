"""Two-stream (here M-stream) cross-modality encoder, after LXMERT (Tan & Bansal 2019, arXiv 1908.07490).

Each layer first lets every stream cross-attend to the other streams (with three or more
modalities, to their concatenation), then runs self-attention and an MLP per stream. As in
LXMERT the cross-attention weights are shared by all directions and the sub-layers are post-LN
(BERT style): x = LN(x + CrossAtt(x, others)); x = LN(x + SelfAtt(x)); x = LN(x + MLP(x)).

`update` restricts which streams the layers rewrite: with `update=("text",)` only the question
attends to (fixed) image tokens, a decoder-style one-way fusion whose cost does not grow with
the number of image tokens per question beyond the attention itself.

Every stream is prefixed with one learned "missing" token that is attendable only when its
modality is absent, so an absent modality is represented by a learned embedding that the other
streams can attend to, and no attention row is ever fully masked.

Variants: a subclass of `CrossAttentionFusion` adds a bias to any layer's cross-attention logits
by overriding `layer_bias` (which may read the previous layer's attention weights), and builds
layers with parameters of their own by overriding `make_layer` (a project registers it in
`FUSIONS` and configs name it "package.module:name").
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, learned,
                               masked_mean, masked_token_output)
from mmjax.layers import EncoderBlock, MultiHeadAttention, dense, layer_norm
from mmjax.layers.common import Dtype

# bias(m, query) -> (B, H, L_m, ctx) added to stream m's cross-attention logits, or None.
BiasFn = Callable[[str, jax.Array], "jax.Array | None"]


class CrossModalLayer(nnx.Module):
  """One LXMERT cross-modality layer over several streams of width F.

  `attention` picks the kernel of every attention in the layer (see `MultiHeadAttention`).
  """

  def __init__(self, names: Sequence[str], features: int, num_heads: int, mlp_dim: int, *,
               update: Sequence[str] | None = None, act: str = "gelu", dropout: float = 0.0,
               attn_dropout: float = 0.0, norm: str = "post", ln_eps: float = 1e-12,
               qk_scale: float = 1.0, attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.names = tuple(names)
    self.update = tuple(update) if update is not None else self.names
    self.cross = MultiHeadAttention(num_heads, features, dropout=attn_dropout, qk_scale=qk_scale,
                                    attention=attention, **kw)
    self.cross_norm = layer_norm(features, eps=ln_eps, **kw)
    if norm not in ("pre", "post"):
      raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
    self.norm = norm
    self.streams = nnx.Dict({m: EncoderBlock(features, num_heads, mlp_dim, norm=norm, act=act,
                                             dropout=dropout, attn_dropout=attn_dropout,
                                             ln_eps=ln_eps, attention=attention, **kw)
                             for m in self.update})
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, xs: dict[str, jax.Array], masks: dict[str, jax.Array], *,
               deterministic: bool = True, return_weights: bool = False,
               bias: BiasFn | None = None):
    """xs: name -> (B, L_m, F), or (B / r, L_m, F) for a stream shared by r examples that is
    not updated; masks: name -> (B, L_m). `bias(m, query)`, called once per updated stream m with
    its attention query (B, L_m, F), returns a (B, H, L_m, sum L_o) logits bias or None. Returns
    new xs and, with `return_weights`, per updated stream, name -> (B, H, L_m, sum L_o)."""
    crossed, weights = {}, {}
    for m in self.update:
      B = xs[m].shape[0]
      others = [o for o in self.names if o != m]
      rows = {xs[o].shape[0] for o in others}
      # Context shared by r examples: keys and values once per row (r = 1 when any is per example).
      r = B // rows.pop() if len(rows) == 1 else 1
      ctx = jnp.concatenate([xs[o] if r > 1 else _rows(xs[o], B) for o in others], axis=1)
      ctx_mask = jnp.concatenate([masks[o] for o in others], axis=1)[:, None, None, :]
      pre = self.norm == "pre"
      query = self.cross_norm(xs[m]) if pre else xs[m]
      out = self.cross(query, ctx, ctx_mask, bias=None if bias is None else bias(m, query),
                       deterministic=deterministic, return_weights=return_weights, context_repeats=r)
      if return_weights:
        out, weights[m] = out
      out = xs[m] + self.dropout(out, deterministic=deterministic)
      crossed[m] = out if pre else self.cross_norm(out)
    new = dict(xs)
    new.update({m: self.streams[m](crossed[m], masks[m], deterministic=deterministic) for m in self.update})
    return new, weights


def _rows(x: jax.Array, batch: int) -> jax.Array:
  """x (B / r, ...) repeated to (B, ...) (each row serves r consecutive examples)."""
  return x if x.shape[0] == batch else jnp.repeat(x, batch // x.shape[0], axis=0)


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(FusionBlock):
  """LXMERT-style cross-modality encoder over all modalities.

  Building a variant: override `layer_bias` to add a bias to a layer's cross-attention logits
  (set `bias_uses_weights` when it reads the previous layer's attention weights), and
  `make_layer` to give the layers parameters of their own.

  Attributes:
    update: the streams the layers rewrite (default all); the others stay their projected tokens.
    proj: name -> dense (D_m -> features) then `in_norm`, as LXMERT's feature encoders.
    missing: name -> learned (features,) token standing in for an absent modality.
    layers: `depth` CrossModalLayers.
    pool: "mean" (average of the updated streams' masked means) or "concat" (their concatenation,
      projected).
    norm: "post" (LXMERT/BERT: x = LN(x + f(x))) or "pre" (x = x + f(LN(x)), with a final
      LayerNorm per updated stream): pre-LN keeps the query's residual stream un-normalised.
    qk_scale: multiplies the cross-attention logits (1: the usual 1 / sqrt(head_dim)); larger
      starts the attention sharper.
    attention: the attention kernel of every layer (see `MultiHeadAttention`); layers whose
      weights are needed (attention maps, `bias_uses_weights`) run the reference kernel.
    attention_maps: when True, aux["cross_attention"][m][o] holds stream m's weights over
      modality o's tokens, (depth, B, H, N_m, N_o) (the missing-token slots left out). May be
      switched on for one call of a built block (as `mmjax.viz` does).
    bias_uses_weights: whether `layer_bias` reads `previous` (False here).
  """

  bias_uses_weights = False

  def __init__(self, modalities: Mapping[str, int], features: int, *, depth: int = 2,
               num_heads: int = 4, mlp_dim: int | None = None, update: Sequence[str] | None = None,
               act: str = "gelu", dropout: float = 0.0, attn_dropout: float = 0.0,
               pool: str = "mean", norm: str = "post", qk_scale: float = 1.0,
               attention: str = "auto", attention_maps: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(modalities, features, dtype=dtype, param_dtype=param_dtype)
    if pool not in ("mean", "concat"):
      raise ValueError(f"pool must be 'mean' or 'concat', got {pool!r}")
    self.pool, self.attention_maps = pool, attention_maps
    self.update = self.names if update is None else tuple(self._check_member("update", m) for m in update)
    if not self.update:
      raise ValueError("update: expected at least one modality to update")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = nnx.Dict({m: dense(d, features, ("embed", "mlp"), **kw) for m, d in self.modality_dims})
    self.in_norm = nnx.Dict({m: layer_norm(features, eps=1e-12, **kw) for m in self.names})
    self.missing = nnx.Dict({m: learned((features,), ("embed",), rngs=rngs, param_dtype=param_dtype)
                             for m in self.names})
    self.layers = nnx.List([
        self.make_layer(i, self.names, features, num_heads, mlp_dim or 4 * features,
                        update=self.update, act=act, norm=norm, qk_scale=qk_scale,
                        attention=attention, dropout=dropout, attn_dropout=attn_dropout, **kw)
        for i in range(depth)])
    self.final_norm = (nnx.Dict({m: layer_norm(features, eps=1e-6, **kw) for m in self.update})
                       if norm == "pre" else None)
    self.out = (dense(len(self.update) * features, features, ("mlp", "embed"), **kw)
                if pool == "concat" else None)

  shares_inputs = True  # a shared stream that is not updated is projected once per row

  def make_layer(self, i: int, *args, **kwargs) -> CrossModalLayer:
    """Layer i (of `depth`), built from `CrossModalLayer`'s arguments."""
    del i
    return CrossModalLayer(*args, **kwargs)

  def layer_bias(self, i: int, layer: CrossModalLayer, m: str, query: jax.Array,
                 previous: dict[str, jax.Array] | None, x: FusionInputs) -> jax.Array | None:
    """A bias (B, H, 1 + N_m, ctx) added to stream m's cross-attention logits in layer i, or None.

    query: (B, 1 + N_m, F), the stream's attention query; previous: layer i - 1's weights
    (name -> (B, H, 1 + N_m, ctx)) when `bias_uses_weights`, else None; x: the block's inputs.
    The context of stream m is the other modalities in order, each a missing slot then its
    tokens (`context_slots`). None here: a variant's hook.
    """
    del i, layer, m, query, previous, x
    return None

  def context_slots(self, m: str, x: FusionInputs) -> dict[str, tuple[int, int]]:
    """Where modality o's tokens sit in stream m's cross-attention context: o -> (start, N_o)."""
    slots, start = {}, 0
    for o in self.names:
      if o != m:
        n = x.tokens[o].shape[1]
        slots[o] = (start + 1, n)  # after o's missing slot
        start += 1 + n
    return slots

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    B = x.batch
    xs, masks = {}, {}
    for m in self.names:
      t = x.tokens[m]  # (B / r, N_m, D_m)
      if m in self.update:  # rewritten per example: (B, N_m, D_m), masked per example
        t = jnp.where(x.masks[m][..., None], _rows(t, B), jnp.zeros((), t.dtype))
      h = self.in_norm[m](self.proj[m](t))  # (B / r, N_m, F)
      miss = jnp.broadcast_to(self.missing[m][...].astype(h.dtype), (h.shape[0], 1, self.features))
      xs[m] = sharding.constrain(jnp.concatenate([miss, h], axis=1), ("batch", "length", "embed"))
      masks[m] = jnp.concatenate([~x.present[m][:, None], x.masks[m]], axis=1)  # (B, 1 + N_m)
    maps, w = [], None
    weights = self.attention_maps or self.bias_uses_weights
    for i, layer in enumerate(self.layers):
      bias = functools.partial(self._bias, i, layer, w if self.bias_uses_weights else None, x)
      xs, w = layer(xs, masks, deterministic=deterministic, return_weights=weights, bias=bias)
      maps.append(w)
    if self.final_norm is not None:
      xs.update({m: self.final_norm[m](xs[m]) for m in self.update})
    pooled = [masked_mean(xs[m], masks[m]) for m in self.update]  # M x (B, F)
    if self.pool == "mean":
      fused = jnp.mean(jnp.stack(pooled, axis=1), axis=1)
    else:
      fused = self.out(jnp.concatenate(pooled, axis=-1))
    tokens = {m: masked_token_output(_rows(xs[m][:, 1:], B), x.masks[m]) for m in self.names}
    aux = {"cross_attention": self._split_maps(maps, x)} if self.attention_maps else {}
    return FusionOutput(fused, tokens, aux)

  def _bias(self, i, layer, previous, x, m, query):
    """`layer_bias` with the layer's arguments in `layer_bias`'s order."""
    return self.layer_bias(i, layer, m, query, previous, x)

  def _split_maps(self, maps: list[dict[str, jax.Array]], x: FusionInputs) -> dict:
    """Per layer (B, H, 1 + N_m, sum_o (1 + N_o)) -> m -> o -> (depth, B, H, N_m, N_o)."""
    out = {}
    for m in self.update:
      stacked = jnp.stack([w[m] for w in maps])  # (depth, B, H, 1 + N_m, ctx)
      out[m] = {o: stacked[:, :, :, 1:, start:start + n]
                for o, (start, n) in self.context_slots(m, x).items()}
    return out
