"""Transformer building blocks: MLP, encoder block (pre-LN or BERT's post-LN), decoder block."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.layers.attention import MultiHeadAttention, make_attention_mask
from mmjax.layers.common import Dtype, activation, dense, layer_norm


# What a block keeps for the backward pass under each `remat` name (the rest is recomputed there):
# everything (the block is then not wrapped at all); the outputs of matmuls without batch
# dimensions (the dense layers', not attention's logits and weighted sums); or only its input.
REMAT_POLICIES = {
    "none": jax.checkpoint_policies.everything_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(remat: str) -> str:
  """Returns `remat`, or raises a ValueError naming the field when it is no `REMAT_POLICIES` key."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat: expected one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  return remat


class Mlp(nnx.Module):
  """Two-layer feed-forward block: fc1 (D -> hidden), activation, dropout, fc2 (hidden -> D)."""

  def __init__(self, features: int, hidden: int, *, act: str = "gelu", dropout: float = 0.0,
               out_features: int | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = dense(features, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, out_features or features, ("mlp", "embed"), **kw)
    self.act = activation(act)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = self.act(self.fc1(x))  # (B, L, hidden)
    h = sharding.constrain(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
    return self.fc2(self.dropout(h, deterministic=deterministic))


class EncoderBlock(nnx.Module):
  """Transformer encoder block; `attention` picks the attention kernel (see `MultiHeadAttention`).

  Attributes:
    norm: "pre" (ViT: x + f(LN(x))) or "post" (BERT: LN(x + f(x))).
    attn, attn_norm, mlp, mlp_norm: sub-layers; the same parameters in either norm order.
  """

  def __init__(self, features: int, num_heads: int, mlp_dim: int, *, norm: str = "pre",
               act: str = "gelu", dropout: float = 0.0, attn_dropout: float = 0.0,
               ln_eps: float = 1e-6, attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if norm not in ("pre", "post"):
      raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = norm
    self.attn = MultiHeadAttention(num_heads, features, dropout=attn_dropout, attention=attention, **kw)
    self.attn_norm = layer_norm(features, eps=ln_eps, **kw)
    self.mlp = Mlp(features, mlp_dim, act=act, dropout=dropout, **kw)
    self.mlp_norm = layer_norm(features, eps=ln_eps, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               bias: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x: (B, L, D); mask: (B, L) token mask or (B, 1|H, L, L) attention mask; bias: added to
    the attention logits, broadcastable to (B, H, L, L)."""
    if mask is not None and mask.ndim == 2:
      mask = make_attention_mask(mask, mask)
    drop = lambda h: self.dropout(h, deterministic=deterministic)
    if self.norm == "pre":
      x = x + drop(self.attn(self.attn_norm(x), mask=mask, bias=bias, deterministic=deterministic))
      x = x + drop(self.mlp(self.mlp_norm(x), deterministic=deterministic))
    else:
      x = self.attn_norm(x + drop(self.attn(x, mask=mask, bias=bias, deterministic=deterministic)))
      x = self.mlp_norm(x + drop(self.mlp(x, deterministic=deterministic)))
    return sharding.constrain(x, ("batch", "length", "embed"))


class DecoderBlock(nnx.Module):
  """Pre-LN decoder block: causal self-attention (KV-cacheable), cross-attention, MLP.

  `attention` picks both attentions' kernel (see `MultiHeadAttention`)."""

  def __init__(self, features: int, num_heads: int, mlp_dim: int, *,
               context_features: int | None = None, act: str = "gelu", dropout: float = 0.0,
               ln_eps: float = 1e-6, attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attn = MultiHeadAttention(num_heads, features, attention=attention, **kw)
    self.self_norm = layer_norm(features, eps=ln_eps, **kw)
    self.cross_attn = MultiHeadAttention(num_heads, features, kv_features=context_features,
                                         attention=attention, **kw)
    self.cross_norm = layer_norm(features, eps=ln_eps, **kw)
    self.mlp = Mlp(features, mlp_dim, act=act, dropout=dropout, **kw)
    self.mlp_norm = layer_norm(features, eps=ln_eps, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def init_cache(self, batch: int, max_len: int) -> None:
    self.self_attn.init_cache(batch, max_len)

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None,
               self_mask: jax.Array | None = None, *, decode: bool = False,
               deterministic: bool = True) -> jax.Array:
    """x: (B, L, D) target tokens; context: (B, N, Dc); context_mask: (B, N).

    Without `decode`, self-attention is causal over x (combined with `self_mask` (B, L) if given).
    With `decode`, x is the next token (B, 1, D) and the KV cache supplies the past.
    """
    drop = lambda h: self.dropout(h, deterministic=deterministic)
    L = x.shape[1]
    if decode:
      smask = None
    else:
      smask = make_attention_mask(self_mask, self_mask, causal=True, q_len=L, kv_len=L)
    x = x + drop(self.self_attn(self.self_norm(x), mask=smask, decode=decode,
                                deterministic=deterministic))
    cmask = None
    if context_mask is not None:
      cmask = context_mask.astype(bool)[:, None, None, :]
    x = x + drop(self.cross_attn(self.cross_norm(x), context, mask=cmask,
                                 deterministic=deterministic))
    x = x + drop(self.mlp(self.mlp_norm(x), deterministic=deterministic))
    return sharding.constrain(x, ("batch", "length", "embed"))


class Encoder(nnx.Module):
  """A stack of `EncoderBlock`s with an optional final LayerNorm (for pre-LN stacks).

  `remat` ("none", "dots" or "full", see `REMAT_POLICIES`) picks what each block keeps for the
  backward pass; outputs and gradients are the same under all three, to float32 rounding.
  `block_kw` go to every `EncoderBlock` (act, dropout, attn_dropout, attention, dtype, ...).
  """

  def __init__(self, depth: int, features: int, num_heads: int, mlp_dim: int, *,
               norm: str = "pre", final_norm: bool | None = None, ln_eps: float = 1e-6,
               remat: str = "none", rngs: nnx.Rngs, **block_kw):
    self.remat = check_remat(remat)
    self.layers = nnx.List([
        EncoderBlock(features, num_heads, mlp_dim, norm=norm, ln_eps=ln_eps, rngs=rngs, **block_kw)
        for _ in range(depth)
    ])
    final_norm = (norm == "pre") if final_norm is None else final_norm
    kw = {k: block_kw[k] for k in ("dtype", "param_dtype") if k in block_kw}
    self.final_norm = layer_norm(features, eps=ln_eps, rngs=rngs, **kw) if final_norm else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True,
               return_hidden: bool = False, bias: jax.Array | Sequence[jax.Array] | None = None):
    """x: (B, L, D); mask: (B, L); bias: attention-logit bias broadcastable to (B, H, L, L), or a
    sequence of one per layer. Returns (B, L, D) and, with `return_hidden`, all layer inputs+output."""
    amask = make_attention_mask(mask, mask) if mask is not None and mask.ndim == 2 else mask
    if bias is None or not isinstance(bias, (list, tuple)):
      bias = [bias] * len(self.layers)
    if len(bias) != len(self.layers):
      raise ValueError(f"bias: expected one per layer ({len(self.layers)}), got {len(bias)}")

    def run(layer, x, mask, b):
      return layer(x, mask, bias=b, deterministic=deterministic)

    if self.remat != "none":
      # graph_updates=False: flax's default writes every variable back after each block, which
      # fails for a model nnx.merge'd in a jit without copy=True; changed ones (dropout counts)
      # are written back either way, and blocks change no graph structure.
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat], graph_updates=False)
    hidden = [x]
    for layer, b in zip(self.layers, bias):
      x = run(layer, x, amask, b)
      hidden.append(x)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return (x, hidden) if return_hidden else x
