"""Image captioning: Show and Tell (CNN embedding -> LSTM) and a Transformer decoder over image tokens.

Both take token ids `tokens` (B, L) that start with BOS and are trained with teacher forcing:
`logits[:, t]` predicts `tokens[:, t + 1]` (the last one predicts EOS). Both implement the
`mmjax.models.decoding.Decodable` protocol, so `generate` decodes them greedily or with beam
search in one compiled loop, encoding each image once and repeating it per beam.

The image encoder is `encoders={"image": spec}`, a spec {"name": registered encoder, **kwargs} or
an `nnx.Module` called as `encoder(images, deterministic=...)` that returns
`mmjax.encoders.base.EncoderOutput`; its width is read off its output on an `image_shape` input.
Configs choose the decoder by the model name: "show_and_tell" or "transformer_captioner".
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.encoders.base import EncoderOutput
from mmjax.layers import DecoderBlock, Embed, LearnedPositions, dense, layer_norm
from mmjax.layers.common import Dtype, check_rank
from mmjax.models import decoding
from mmjax.models.base import MODELS, encoder_dims, make_encoders
from mmjax.models.decoding import DecodeContext, DecodeResult, tile_beams


def _image_encoder(encoders: Mapping[str, Any], image_shape: tuple[int, ...], rngs: nnx.Rngs,
                   dtype: Dtype, param_dtype: Dtype) -> tuple[nnx.Dict, tuple[int, int]]:
  """encoders {"image": spec or module} built, and the image encoder's (token, pooled) widths."""
  if len(tuple(image_shape)) != 3:
    raise ValueError(f"image_shape: expected (H, W, C), got {image_shape!r}")
  built = make_encoders(encoders, ("image",), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  return built, encoder_dims(built["image"], jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))


def _encode(encoder: nnx.Module, images: jax.Array, deterministic: bool) -> EncoderOutput:
  out = encoder(images, deterministic=deterministic)
  if not isinstance(out, EncoderOutput):
    raise TypeError("encoder output: expected EncoderOutput(tokens, mask, pooled), "
                    f"got {type(out).__name__}")
  return out


def _check_tokens(tokens: jax.Array, mask: jax.Array | None) -> None:
  check_rank(tokens, 2, "tokens", "(B, L)")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens: expected an integer array, got {tokens.dtype}")
  if mask is not None and mask.shape != tokens.shape:
    raise ValueError(f"mask: expected shape {tokens.shape} like tokens, got {mask.shape}")


def _check_step_tokens(tokens: jax.Array) -> None:
  if getattr(tokens, "ndim", None) != 2 or tokens.shape[1] != 1:
    raise ValueError("tokens: expected shape (N, 1), one token per hypothesis, "
                     f"got {getattr(tokens, 'shape', None)}")


class _CaptionerBase(nnx.Module):
  """`generate` for captioners implementing `init_decode` / `decode_step`."""

  def generate(self, images: jax.Array, *, method: str = "greedy", beam_size: int = 4,
               max_len: int = 20, length_penalty: float = 0.0, bos_id: int, eos_id: int,
               pad_id: int = 0, return_all: bool = False) -> DecodeResult:
    """Captions `images` with greedy or beam search (see `mmjax.models.decoding`).

    Compiled once per model structure, image shape and static setting (method, beam_size,
    max_len, token ids, return_all); `length_penalty` (GNMT alpha) is a traced value. Returns
    a `DecodeResult` whose `tokens` (B, max_len) exclude BOS, keep EOS and are padded after it.
    """
    return decoding.generate(self, images, method=method, beam_size=beam_size, max_len=max_len,
                             length_penalty=length_penalty, bos_id=bos_id, eos_id=eos_id,
                             pad_id=pad_id, return_all=return_all)


@MODELS.register("show_and_tell")
class ShowAndTell(_CaptionerBase):
  """Show and Tell (Vinyals et al. 2015, arXiv 1411.4555).

  The image's pooled embedding, projected to the word-embedding width, is the LSTM's input at
  step -1; the words follow (BOS first), and each LSTM output is projected to vocabulary logits.
  During decoding the LSTM carry (c, h) is the cache.

  Attributes:
    encoders: {"image": image encoder}; its pooled vector (B, D_image) is used.
    image_proj: D_image -> features.
    embed: word embedding (vocab_size, features).
    cell: `nnx.LSTMCell` features -> hidden.
    head: hidden -> vocab_size logits.

  Args:
    vocab_size: V.
    encoders: {"image": encoder spec {'name': ..., **kwargs} or an `nnx.Module` returning
      `EncoderOutput`}.
    image_shape: (H, W, C) of input images; sizes the image projection.
    features: word-embedding width (512 in the paper).
    hidden: LSTM width (defaults to `features`).
    dropout: on word embeddings and LSTM outputs.
  """

  def __init__(self, vocab_size: int, *, encoders: Mapping[str, Any], image_shape: tuple[int, int, int],
               features: int = 512, hidden: int | None = None, dropout: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    hidden = hidden or features
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.hidden, self.dtype = vocab_size, hidden, dtype
    self.encoders, (_, pooled_dim) = _image_encoder(encoders, image_shape, rngs, dtype, param_dtype)
    self.image_proj = dense(pooled_dim, features, (None, "embed"), **kw)
    self.embed = Embed(vocab_size, features, **kw)
    self.cell = nnx.LSTMCell(features, hidden, kernel_metadata={"logical_axes": ("embed", "mlp")},
                             recurrent_kernel_metadata={"logical_axes": (None, "mlp")},
                             bias_metadata={"logical_axes": ("mlp",)}, **kw)
    self.head = dense(hidden, vocab_size, ("mlp", "vocab"), **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.carry_c: nnx.Cache | None = nnx.data(None)
    self.carry_h: nnx.Cache | None = nnx.data(None)

  def _start(self, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LSTM carry after reading the image embedding at step -1."""
    x = self.image_proj(pooled)  # (B, E)
    zero = jnp.zeros(pooled.shape[:1] + (self.hidden,), self.dtype)
    carry, _ = self.cell((zero, zero), x)
    return carry

  def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher forcing.

    Args:
      images: what the encoder takes, e.g. (B, H, W, C).
      tokens: (B, L) int input ids, BOS first.
      mask: (B, L) bool, True at real tokens; the LSTM state is carried unchanged over the rest.

    Returns:
      logits (B, L, V) and aux {"image_pooled": (B, D_image)}.
    """
    _check_tokens(tokens, mask)
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
    enc = _encode(self.encoders["image"], images, deterministic)
    carry = self._start(enc.pooled)
    x = self.dropout(self.embed(tokens), deterministic=deterministic)  # (B, L, E)

    def step(carry, inp):
      x_t, m_t = inp
      new, h = self.cell(carry, x_t)
      carry = jax.tree.map(lambda n, o: jnp.where(m_t[:, None], n, o), new, carry)
      return carry, h

    _, hs = jax.lax.scan(step, carry, (x.swapaxes(0, 1), mask.T))  # (L, B, H)
    hs = self.dropout(hs.swapaxes(0, 1), deterministic=deterministic)  # (B, L, H)
    return self.head(hs), {"image_pooled": enc.pooled}

  def init_decode(self, images: jax.Array, beams: int, max_len: int) -> None:
    """Encodes `images` once and stores the post-image LSTM carry, repeated per beam."""
    c, h = self._start(_encode(self.encoders["image"], images, True).pooled)
    self.carry_c = nnx.Cache(tile_beams(c, beams))
    self.carry_h = nnx.Cache(tile_beams(h, beams))

  def decode_step(self, tokens: jax.Array) -> jax.Array:
    """tokens (N, 1) -> next-token logits (N, V), advancing the LSTM carry."""
    _check_step_tokens(tokens)
    if self.carry_c is None:
      raise ValueError("decode_step needs init_decode(images, beams, max_len) first")
    carry = (self.carry_c[...], self.carry_h[...])
    (c, h), out = self.cell(carry, self.embed(tokens[:, 0]))
    self.carry_c[...] = c.astype(self.carry_c.dtype)
    self.carry_h[...] = h.astype(self.carry_h.dtype)
    return self.head(out)


@MODELS.register("transformer_captioner")
class TransformerCaptioner(_CaptionerBase):
  """A Transformer decoder cross-attending to image tokens.

  Token embeddings plus learned positions go through pre-LN `DecoderBlock`s (causal
  self-attention with a KV cache, cross-attention to the encoder's tokens and mask, MLP), a
  final LayerNorm, and the output projection (the transposed token embedding when tied).

  Attributes:
    encoders: {"image": image encoder}; its tokens (B, N, D_image) and mask are the context.
    embed: token embedding (vocab_size, features); also the output projection when tied.
    positions: learned positions (max_len, features).
    layers: the `DecoderBlock` stack.
    final_norm: LayerNorm before the output projection.
    head: features -> vocab_size logits, or None when tied.

  Args:
    vocab_size: V.
    encoders: {"image": encoder spec {'name': ..., **kwargs} or an `nnx.Module` returning
      `EncoderOutput`}.
    image_shape: (H, W, C) of input images; sizes the cross-attention to the image tokens.
    features, depth, num_heads, mlp_dim: decoder width, blocks, heads, MLP width (4x default).
    max_len: longest caption (input tokens in training, generated tokens in decoding).
    tie_embeddings: logits through `Embed.attend` instead of a separate head.
    act, dropout, ln_eps: as in `DecoderBlock`.
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
  """

  def __init__(self, vocab_size: int, *, encoders: Mapping[str, Any], image_shape: tuple[int, int, int],
               features: int = 256, depth: int = 2, num_heads: int = 4,
               mlp_dim: int | None = None, max_len: int = 64, tie_embeddings: bool = True,
               act: str = "gelu", dropout: float = 0.0, ln_eps: float = 1e-6,
               attention: str = "auto", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.max_len = vocab_size, max_len
    self.encoders, (token_dim, _) = _image_encoder(encoders, image_shape, rngs, dtype, param_dtype)
    self.embed = Embed(vocab_size, features, **kw)
    self.positions = LearnedPositions(max_len, features, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([
        DecoderBlock(features, num_heads, mlp_dim or 4 * features,
                     context_features=token_dim, act=act, dropout=dropout,
                     ln_eps=ln_eps, attention=attention, **kw)
        for _ in range(depth)
    ])
    self.final_norm = layer_norm(features, eps=ln_eps, **kw)
    self.head = None if tie_embeddings else dense(features, vocab_size, ("embed", "vocab"), **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.context: DecodeContext | None = nnx.data(None)
    self.context_mask: DecodeContext | None = nnx.data(None)

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)

  def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher forcing with causal self-attention (and the padding `mask` when given).

    Args:
      images: what the encoder takes, e.g. (B, H, W, C).
      tokens: (B, L) int input ids, BOS first; L <= max_len.
      mask: (B, L) bool, True at real tokens.

    Returns:
      logits (B, L, V) and aux {"image_tokens": (B, N, Dc), "image_mask": (B, N)}.
    """
    _check_tokens(tokens, mask)
    enc = _encode(self.encoders["image"], images, deterministic)
    x = self.dropout(self.positions(self.embed(tokens)), deterministic=deterministic)  # (B, L, D)
    for layer in self.layers:
      x = layer(x, enc.tokens, enc.mask, self_mask=mask, deterministic=deterministic)
    return self._logits(x), {"image_tokens": enc.tokens, "image_mask": enc.mask}

  def init_decode(self, images: jax.Array, beams: int, max_len: int) -> None:
    """Encodes `images` once, repeats tokens and mask per beam, allocates the KV caches."""
    if max_len > self.max_len:
      raise ValueError(f"max_len={max_len} exceeds the model's max_len={self.max_len} positions")
    enc = _encode(self.encoders["image"], images, True)
    self.context = DecodeContext(tile_beams(enc.tokens, beams))  # (B*K, N, Dc)
    self.context_mask = DecodeContext(tile_beams(enc.mask, beams))  # (B*K, N)
    for layer in self.layers:
      layer.init_cache(enc.tokens.shape[0] * beams, max_len)

  def decode_step(self, tokens: jax.Array) -> jax.Array:
    """tokens (N, 1) -> next-token logits (N, V), appending to the KV caches."""
    _check_step_tokens(tokens)
    if self.context is None:
      raise ValueError("decode_step needs init_decode(images, beams, max_len) first")
    pos = self.layers[0].self_attn.cache_index[...]
    x = self.positions(self.embed(tokens), offset=pos)  # (N, 1, D)
    for layer in self.layers:
      x = layer(x, self.context[...], self.context_mask[...], decode=True)
    return self._logits(x)[:, 0]


__all__ = ["ShowAndTell", "TransformerCaptioner"]
