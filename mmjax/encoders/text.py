"""Text encoders: a BERT-compatible Transformer, CLIP's causal text Transformer, and an
embedding + (bi)LSTM/GRU encoder.

`BertEncoder`'s parameters map one to one onto HF `BertModel` (see `mmjax.transfer.bert`), so
pretrained BERT / MiniLM checkpoints load into it (the "minilm" encoder is registered in
`mmjax.transfer.minilm`, beside its loader); `ClipTextEncoder` does the same for HF
`CLIPTextModel`; `RnnTextEncoder` is the Show-and-Tell-era recurrent encoder. All return the
`EncoderOutput` contract: tokens (B, L, D), mask (B, L), pooled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding
from mmjax.encoders.base import ENCODERS, EncoderOutput, masked_mean
from mmjax.layers.attention import MultiHeadAttention, make_attention_mask
from mmjax.layers.common import Dtype, dense, layer_norm, part
from mmjax.layers.embeddings import Embed, LearnedPositions, ModalityEmbed
from mmjax.layers.transformer import Encoder


@dataclasses.dataclass(frozen=True)
class BertSpec:
  """Hyper-parameters of a BERT-style encoder (the fields of HF `BertConfig` that shape it).

  Attributes:
    vocab_size: word-piece vocabulary size.
    hidden: model width D.
    depth: number of post-LN encoder blocks.
    heads: attention heads.
    mlp_dim: feed-forward width.
    max_len: learned position table size (longest input).
    type_vocab: number of token types (segments).
    pad_id: id of the padding token; the default mask is `ids != pad_id`.
    ln_eps: LayerNorm epsilon.
    act: feed-forward activation name (see `mmjax.layers.activation`).
    dropout: dropout after embeddings and each sub-layer.
    attn_dropout: dropout on attention weights.
    pooler: whether the model has BERT's pooler (dense + tanh on the CLS token).
  """

  vocab_size: int = 30522
  hidden: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  max_len: int = 512
  type_vocab: int = 2
  pad_id: int = 0
  ln_eps: float = 1e-12
  act: str = "gelu"
  dropout: float = 0.1
  attn_dropout: float = 0.1
  pooler: bool = True


BERT_VARIANTS: dict[str, dict] = {
    "bert-base": dict(hidden=768, depth=12, heads=12, mlp_dim=3072),
    "bert-small": dict(hidden=512, depth=4, heads=8, mlp_dim=2048),
    "minilm-l6-h384": dict(hidden=384, depth=6, heads=12, mlp_dim=1536),
    "tiny": dict(vocab_size=1000, hidden=32, depth=2, heads=4, mlp_dim=64, max_len=128),
}

POOLS = ("cls", "mean", "pooler")


def decode_variant(variant: str, **overrides) -> BertSpec:
  """`BertSpec` of a named variant ("bert-base", "bert-small", "minilm-l6-h384", "tiny") + overrides."""
  if variant not in BERT_VARIANTS:
    raise ValueError(f"variant: unknown BERT variant {variant!r}; known: {sorted(BERT_VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(BertSpec)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise TypeError(f"unknown BERT field(s) {bad}; known: {sorted(fields)}")
  return BertSpec(**{**BERT_VARIANTS[variant], **overrides})


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_ids(ids: jax.Array, upper: int, field: str, max_len: int | None = None) -> None:
  """Raises TypeError/ValueError naming `field` for non-integer, non-(B, L) or out-of-range ids."""
  if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{field}: expected an integer array of shape (B, L), got "
                    f"{getattr(ids, 'dtype', type(ids).__name__)}")
  if ids.ndim != 2:
    raise ValueError(f"{field}: expected shape (B, L), got {ids.shape}")
  if max_len is not None and ids.shape[1] > max_len:
    raise ValueError(f"{field}: length {ids.shape[1]} exceeds the {max_len} positions the model has")
  if _is_concrete(ids) and ids.size:
    lo, hi = int(np.min(ids)), int(np.max(ids))
    if lo < 0 or hi >= upper:
      raise ValueError(f"{field}: values must lie in [0, {upper}), got min {lo}, max {hi}")


def _token_mask(ids: jax.Array, mask: jax.Array | None, pad_id: int) -> jax.Array:
  """Bool (B, L) mask: the given one (checked against ids' shape) or ids != pad_id."""
  if mask is None:
    return ids != pad_id
  if getattr(mask, "shape", None) != ids.shape:
    raise ValueError(f"mask: expected shape {ids.shape} like ids, got {getattr(mask, 'shape', None)}")
  return jnp.asarray(mask).astype(bool)


@ENCODERS.register("bert")
class BertEncoder(nnx.Module):
  """BERT-style post-LN Transformer text encoder whose parameters map 1:1 onto HF `BertModel`.

  Attributes:
    spec: the `BertSpec` hyper-parameters.
    pool: "pooler" (dense + tanh on CLS), "cls" (raw CLS token) or "mean" (masked mean).
    word_embed, position_embed, type_embed, embed_norm: BERT's embedding block.
    encoder: `mmjax.layers.Encoder` of post-LN blocks (no final norm).
    pooler: dense (D -> D) applied to the CLS token, or None.

  Args:
    variant: a name in `BERT_VARIANTS`.
    pool: pooling; default "pooler" when the model has a pooler, else "mean".
    dtype: compute dtype; param_dtype: parameter dtype.
    remat: what each encoder block keeps for the backward pass: "none", "dots" or "full" (see
      `mmjax.layers.REMAT_POLICIES`): less memory, the same outputs and gradients.
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
    rngs: parameter and dropout keys.
    **overrides: any `BertSpec` field (vocab_size, depth, pooler, dropout, ...).
  """

  def __init__(self, variant: str = "bert-base", *, pool: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, remat: str = "none",
               attention: str = "auto", rngs: nnx.Rngs, **overrides):
    spec = decode_variant(variant, **overrides)
    pool = pool or ("pooler" if spec.pooler else "mean")
    if pool not in POOLS:
      raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    if pool == "pooler" and not spec.pooler:
      raise ValueError("pool='pooler' needs pooler=True")
    self.spec, self.pool, self.dtype = spec, pool, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = spec.hidden
    self.word_embed = Embed(spec.vocab_size, d, **kw)
    self.position_embed = LearnedPositions(spec.max_len, d, param_dtype=param_dtype, rngs=rngs)
    self.type_embed = ModalityEmbed(spec.type_vocab, d, param_dtype=param_dtype, rngs=rngs)
    self.embed_norm = layer_norm(d, eps=spec.ln_eps, **kw)
    self.embed_dropout = nnx.Dropout(spec.dropout, rngs=rngs)
    self.encoder = Encoder(spec.depth, d, spec.heads, spec.mlp_dim, norm="post", final_norm=False,
                           ln_eps=spec.ln_eps, act=spec.act, dropout=spec.dropout,
                           attn_dropout=spec.attn_dropout, remat=remat, attention=attention, **kw)
    self.pooler = dense(d, d, ("embed", None), **kw) if spec.pooler else None

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None,
               type_ids: jax.Array | None = None, *, deterministic: bool = True,
               return_hidden: bool = False):
    """Encodes token ids.

    Args:
      ids: (B, L) integer word-piece ids, L <= spec.max_len.
      mask: (B, L) bool/int, True for real tokens; default `ids != spec.pad_id`.
      type_ids: (B, L) segment ids in [0, spec.type_vocab); default all 0.
      deterministic: disables dropout when True.
      return_hidden: also return the embedding output and every layer's output (depth + 1).

    Returns:
      `EncoderOutput`, and with `return_hidden` a tuple of (B, L, D) hidden states too.
    """
    spec = self.spec
    _check_ids(ids, spec.vocab_size, "ids", spec.max_len)
    mask = _token_mask(ids, mask, spec.pad_id)
    if type_ids is not None:
      if getattr(type_ids, "shape", None) != ids.shape:
        raise ValueError(f"type_ids: expected shape {ids.shape} like ids, got "
                         f"{getattr(type_ids, 'shape', None)}")
      _check_ids(type_ids, spec.type_vocab, "type_ids")
    x = self.word_embed(ids)  # (B, L, D)
    x = self.type_embed(x, 0 if type_ids is None else type_ids)
    x = self.position_embed(x)
    x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    # Key padding only (as HF does): padded queries still attend to the real tokens.
    amask = mask[:, None, None, :]  # (B, 1, 1, L)
    x, hidden = self.encoder(x, amask, deterministic=deterministic, return_hidden=True)
    if self.pool == "pooler":
      pooled = jnp.tanh(self.pooler(x[:, 0]))
    elif self.pool == "cls":
      pooled = x[:, 0]
    else:
      pooled = masked_mean(x, mask).astype(x.dtype)
    out = EncoderOutput(tokens=x, mask=mask, pooled=pooled)
    return (out, tuple(hidden)) if return_hidden else out


@dataclasses.dataclass(frozen=True)
class ClipTextSpec:
  """Hyper-parameters of CLIP's text Transformer (the fields of HF `CLIPTextConfig` that shape it).

  Attributes:
    vocab_size: BPE vocabulary size.
    hidden: model width D.
    depth: number of pre-LN causal encoder blocks.
    heads: attention heads.
    mlp_dim: feed-forward width.
    max_len: learned position table size (longest input; 77 in OpenAI CLIP).
    eos_id: end-of-text id; the pooled vector is the token at its first occurrence. None pools
      at the largest id of each row instead (HF's rule for old configs with eos_token_id 2, where
      end-of-text is the largest id of the vocabulary).
    ln_eps: LayerNorm epsilon.
    act: feed-forward activation name (CLIP: "quick_gelu").
    dropout: dropout after embeddings and each sub-layer.
    attn_dropout: dropout on attention weights.
    causal: causal self-attention (CLIP); False attends both ways (SigLIP).
    pool: "eos" (the end-of-text token, CLIP) or "last" (the last position, SigLIP: its texts
      are padded to the full length).
    out_dim: width of a dense layer with bias on the pooled vector (SigLIP's text "head"); 0 = none.
  """

  vocab_size: int = 49408
  hidden: int = 512
  depth: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 77
  eos_id: int | None = 49407
  ln_eps: float = 1e-5
  act: str = "quick_gelu"
  dropout: float = 0.0
  attn_dropout: float = 0.0
  causal: bool = True
  pool: str = "eos"
  out_dim: int = 0


@ENCODERS.register("clip_text")
class ClipTextEncoder(nnx.Module):
  """CLIP's text tower: token + learned positions, causal pre-LN blocks, final LN, EOS pooling.

  Parameters map 1:1 onto HF `CLIPTextModel` (see `mmjax.transfer.clip`); with causal=False,
  pool="last" and out_dim, onto HF `SiglipTextModel` (see `mmjax.transfer.siglip`).

  Attributes:
    spec: the `ClipTextSpec` hyper-parameters.
    word_embed, position_embed: token and position tables.
    encoder: `mmjax.layers.Encoder` of pre-LN blocks with the final LayerNorm.
    head: dense (D -> out_dim) on the pooled vector, or None.

  Args:
    dtype: compute dtype; param_dtype: parameter dtype.
    remat: "none", "dots" or "full", as in `BertEncoder`.
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
    rngs: parameter and dropout keys.
    **fields: any `ClipTextSpec` field.
  """

  def __init__(self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", attention: str = "auto", rngs: nnx.Rngs, **fields):
    known = {f.name for f in dataclasses.fields(ClipTextSpec)}
    bad = sorted(set(fields) - known)
    if bad:
      raise TypeError(f"unknown CLIP text field(s) {bad}; known: {sorted(known)}")
    spec = ClipTextSpec(**fields)
    # pool="last" never reads eos_id (a CLIP config's default one may exceed a small vocabulary).
    if spec.pool == "eos" and spec.eos_id is not None and not 0 <= spec.eos_id < spec.vocab_size:
      raise ValueError(f"eos_id: expected an id in [0, {spec.vocab_size}) or None, got {spec.eos_id}")
    if spec.pool not in ("eos", "last"):
      raise ValueError(f"pool: expected 'eos' or 'last', got {spec.pool!r}")
    if spec.out_dim < 0:
      raise ValueError(f"out_dim: expected a non-negative int, got {spec.out_dim!r}")
    self.spec, self.dtype = spec, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.word_embed = Embed(spec.vocab_size, spec.hidden, **kw)
    self.position_embed = LearnedPositions(spec.max_len, spec.hidden, param_dtype=param_dtype,
                                           rngs=rngs)
    self.embed_dropout = nnx.Dropout(spec.dropout, rngs=rngs)
    self.encoder = Encoder(spec.depth, spec.hidden, spec.heads, spec.mlp_dim, norm="pre",
                           final_norm=True, ln_eps=spec.ln_eps, act=spec.act, dropout=spec.dropout,
                           attn_dropout=spec.attn_dropout, remat=remat, attention=attention, **kw)
    self.head = dense(spec.hidden, spec.out_dim, ("embed", None), **kw) if spec.out_dim else None

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True, return_hidden: bool = False):
    """Encodes token ids.

    Args:
      ids: (B, L) integer ids, L <= spec.max_len, each row holding an end-of-text token (pool="eos").
      mask: (B, L) bool/int, True for real tokens (keys outside it are not attended); default
        all True. Attention is causal, so right padding never changes the real tokens.
      deterministic: disables dropout when True.
      return_hidden: also return the embedding output and every block's output (depth + 1
        arrays (B, L, D), before the final LayerNorm, as HF).

    Returns:
      `EncoderOutput` with tokens after the final LayerNorm and pooled the end-of-text (or last)
      token, through `head` when there is one, and with `return_hidden` a tuple of hidden states too.
    """
    spec = self.spec
    _check_ids(ids, spec.vocab_size, "ids", spec.max_len)
    mask = jnp.ones(ids.shape, bool) if mask is None else _token_mask(ids, mask, 0)
    x = self.position_embed(self.word_embed(ids))  # (B, L, D)
    x = self.embed_dropout(x, deterministic=deterministic)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    amask = mask[:, None, None, :]  # (B, 1, 1, L)
    if spec.causal:
      amask = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))[None, None] & amask  # (B, 1, L, L)
    x, hidden = self.encoder(x, amask, deterministic=deterministic, return_hidden=True)
    if spec.pool == "last":
      pooled = x[:, -1]  # (B, D)
    else:
      eos = jnp.argmax(ids if spec.eos_id is None else ids == spec.eos_id, axis=-1)  # (B,)
      pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # (B, D)
    if self.head is not None:
      pooled = self.head(pooled)  # (B, out_dim)
    out = EncoderOutput(tokens=x, mask=mask, pooled=pooled)
    return (out, tuple(hidden)) if return_hidden else out


@ENCODERS.register("rnn_text")
class RnnTextEncoder(nnx.Module):
  """Token embedding + stacked (bi)LSTM/GRU, honouring right padding through sequence lengths.

  Attributes:
    embed: token embedding (vocab_size, features).
    layers: `nnx.RNN` or `nnx.Bidirectional` per layer.
    out_features: D = hidden * (2 if bidirectional else 1).
    pool: "last" (final state of each direction at the last real token), "mean", "max" or
      "attention".
    probe, attend: the attention pool's learned query (1, 1, D) and its multi-head attention
      (pool="attention" only, else None).

  Args:
    vocab_size: vocabulary size.
    features: embedding width.
    hidden: state width per direction.
    cell: "lstm" or "gru".
    bidirectional: run a backward RNN too and concatenate.
    num_layers: stacked recurrent layers.
    pool: "last", "mean" (masked mean over tokens) or "max" (masked max over tokens per feature,
      InferSent's BiLSTM-max: a word that drives some features to extremes, such as the one colour
      word in a templated question, is not diluted by the sentence's length as it is in the mean)
      or "attention" (a learned query attends over the tokens with `pool_heads` heads, SigLIP's
      MAP pooling without its MLP; it starts as a linear map of the mean, and each head can learn
      to take one word whatever the sentence around it).
    pool_heads: heads of the attention pool; D must divide by it.
    attention: attention kernel of the attention pool: auto | xla | cudnn | reference, see `MultiHeadAttention`.
    pad_id: padding id; the default mask is `ids != pad_id`.
    dropout: dropout on embeddings and between layers.
    embed_skip: add a linear map of each token's embedding to the RNN's output for that token
      (a residual around the RNN), so every token also carries a context-free part: the same
      word gives the same vector in every sentence (with pool="mean", the pooled vector is then
      partly a bag of words).
  """

  def __init__(self, vocab_size: int, features: int = 128, hidden: int = 128, *,
               cell: str = "lstm", bidirectional: bool = True, num_layers: int = 1,
               pool: str = "last", pool_heads: int = 4, pad_id: int = 0, dropout: float = 0.0,
               embed_skip: bool = False, attention: str = "auto",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if cell not in ("lstm", "gru"):
      raise ValueError(f"cell: expected 'lstm' or 'gru', got {cell!r}")
    if pool not in ("last", "mean", "max", "attention"):
      raise ValueError(f"pool: expected 'last', 'mean', 'max' or 'attention', got {pool!r}")
    if num_layers < 1:
      raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
    self.vocab_size, self.cell, self.hidden, self.pool, self.pad_id = vocab_size, cell, hidden, pool, pad_id
    self.bidirectional, self.dtype = bidirectional, dtype
    self.out_features = hidden * (2 if bidirectional else 1)
    # N(0, 1) embeddings (PyTorch's nn.Embedding default), not BERT's N(0, 0.02): no LayerNorm
    # follows here, and with 0.02 the pooled LSTM outputs start at ~0.007 (0.18 with N(0, 1)),
    # far below the first Adam steps of the biases downstream.
    self.embed = Embed(vocab_size, features, init_std=1.0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    cell_cls = nnx.LSTMCell if cell == "lstm" else nnx.GRUCell
    meta = dict(kernel_metadata={"logical_axes": ("embed", "mlp")},
                recurrent_kernel_metadata={"logical_axes": (None, "mlp")},
                bias_metadata={"logical_axes": ("mlp",)})

    def rnn(in_features):
      c = cell_cls(in_features, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **meta)
      return nnx.RNN(c, rngs=False)

    layers = []
    for i in range(num_layers):
      d_in = features if i == 0 else self.out_features
      layers.append(nnx.Bidirectional(rnn(d_in), rnn(d_in), rngs=False) if bidirectional else rnn(d_in))
    self.layers = nnx.List(layers)
    self.skip = (dense(features, self.out_features, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs) if embed_skip else None)
    d = self.out_features
    if pool == "attention" and d % pool_heads:
      raise ValueError(f"pool_heads: {pool_heads} does not divide the output width {d}")
    # A zero probe: every head starts with uniform weights (value and out maps of the masked mean).
    self.probe = (nnx.Param(part(nnx.initializers.zeros_init(), (None, None, "embed"))(
        rngs.params(), (1, 1, d), param_dtype)) if pool == "attention" else None)
    self.attend = (MultiHeadAttention(pool_heads, d, attention=attention, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
                   if pool == "attention" else None)

  def _zero_carry(self, batch: int):
    h = jnp.zeros((batch, self.hidden), jnp.float32)
    return (h, h) if self.cell == "lstm" else h

  def _last_h(self, carry) -> jax.Array:
    return carry[1] if self.cell == "lstm" else carry  # LSTM carry is (c, h)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> EncoderOutput:
    """ids: (B, L) ints; mask: (B, L), True on a prefix of each row (right padding only)."""
    _check_ids(ids, self.vocab_size, "ids")
    mask = _token_mask(ids, mask, self.pad_id)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # (B,)
    if _is_concrete(mask):
      prefix = np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]
      if not np.array_equal(np.asarray(mask), prefix):
        raise ValueError("mask: RnnTextEncoder needs right-padded rows (all real tokens first)")
    x = embedded = self.dropout(self.embed(ids), deterministic=deterministic)  # (B, L, F)
    carry = self._zero_carry(ids.shape[0])
    for i, layer in enumerate(self.layers):
      if i:
        x = self.dropout(x, deterministic=deterministic)
      init = (carry, carry) if self.bidirectional else carry
      final, x = layer(x, initial_carry=init, seq_lengths=lengths, return_carry=True)
    if self.skip is not None:
      x = x + self.skip(embedded)
    tokens = (x * mask[..., None]).astype(self.dtype)  # (B, L, D), zero at padding
    if self.pool == "mean":
      pooled = masked_mean(tokens, mask)
    elif self.pool == "attention":
      probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (ids.shape[0], 1, tokens.shape[-1]))
      pooled = self.attend(probe, tokens, make_attention_mask(None, mask, q_len=1))[:, 0]
    elif self.pool == "max":
      pooled = jnp.max(jnp.where(mask[..., None], tokens, -jnp.inf), axis=1)
    else:
      parts = [self._last_h(c) for c in final] if self.bidirectional else [self._last_h(final)]
      pooled = jnp.concatenate(parts, axis=-1)
    pooled = jnp.where((lengths > 0)[:, None], pooled, 0.0)  # (B, D), 0 for empty rows
    return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled.astype(self.dtype))

