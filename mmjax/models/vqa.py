"""Visual question answering: vision encoder + text encoder + any fusion block + answer head.

The LXMERT recipe of the seed article is `fusion="cross_attention"`; Santoro et al.'s relation
network is `fusion="relation"`. Several questions may share one image (`question_ids` of shape
(B, Q, L)): the image is encoded once and its tokens reach the fusion block as inputs shared by
the Q questions (about 3x faster with 20 questions per image than encoding the image per
question); cross-attention also projects them once per image instead of per question.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.encoders import EncoderOutput
from mmjax.fusion import build_fusion, modality_dropout
from mmjax.layers.common import Dtype, activation, dense, layer_norm
from mmjax.models.base import MODELS, encoder_dims, make_encoders

MODALITIES = ("image", "text")


class AnswerHead(nnx.Module):
  """LXMERT's answer classifier: pooled (.., D) -> dense -> GELU -> LayerNorm -> dense -> logits (.., A).

  GELU rather than ReLU: while a model still sits at the answer prior, Adam drives the ReLU
  head's biases negative until (measured on a colour-question task) all but one unit is dead and
  the model never leaves the prior.
  """

  def __init__(self, features: int, hidden: int, num_answers: int, *, act: str = "gelu",
               dropout: float = 0.0, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = dense(features, hidden, ("embed", "mlp"), **kw)
    self.norm = layer_norm(hidden, eps=1e-12, **kw)
    self.fc2 = dense(hidden, num_answers, ("mlp", "vocab"), **kw)
    self.act = activation(act)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = self.norm(self.act(self.fc1(x)))
    return self.fc2(self.dropout(h, deterministic=deterministic))


@MODELS.register("vqa")
class VQAModel(nnx.Module):
  """Answers questions about images.

  Attributes:
    encoders: {"image": image encoder (any registered vision encoder, e.g. "small_cnn", "vit",
      "resnet"), "text": question encoder (e.g. "bert", "rnn_text", "minilm")}.
    fusion: any registered fusion block over modalities {"image", "text"}.
    head: answer classifier on the fused pooled vector.

  Args:
    encoders: {"image": spec, "text": spec}, each {'name': ..., **kwargs} (or a built module).
    fusion: fusion family name (see `mmjax.fusion.FUSIONS.names()`).
    fusion_kwargs: extra constructor arguments of the fusion block.
    features: fused width.
    num_answers: answer vocabulary size.
    image_shape: (H, W, C) of input images; question_len: L. Used to size the fusion block.
    head_hidden: hidden width of the answer MLP.
    head_dropout: dropout inside the answer MLP.
    modality_dropout: probability of dropping a whole modality per example in training.
    question_tokens: "all" passes every question token to the fusion block; "pooled" passes the
      text encoder's pooled vector as a single token, so per-question fusion work does not grow
      with the question length (about 20x less for 20-token questions).
    dtype: compute dtype (a name such as "bfloat16" or a dtype); parameters stay float32.

  Subclasses may override `encode_questions` to change how the question stream is encoded
  (e.g. each distinct question once), as long as every row gets its own output.
  """

  def __init__(self, *, encoders: Mapping[str, Any], fusion: str, features: int, num_answers: int,
               image_shape: tuple[int, int, int], question_len: int,
               fusion_kwargs: Mapping[str, Any] | None = None, head_hidden: int = 256,
               head_dropout: float = 0.0, modality_dropout: float = 0.0,
               question_tokens: str = "all", dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if question_tokens not in ("all", "pooled"):
      raise ValueError(f"question_tokens: expected 'all' or 'pooled', got {question_tokens!r}")
    dtype = jnp.dtype(dtype)
    self.question_tokens = question_tokens
    self.encoders = make_encoders(encoders, MODALITIES, rngs=rngs, dtype=dtype)
    self.image_shape, self.question_len = tuple(image_shape), int(question_len)
    image = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
    question = (jax.ShapeDtypeStruct((1, self.question_len), jnp.int32),
                jax.ShapeDtypeStruct((1, self.question_len), jnp.bool_))  # ids, mask
    dv, _ = encoder_dims(self.encoders["image"], image)
    dt, _ = encoder_dims(self.encoders["text"], question)
    self.fusion = build_fusion(fusion, modalities={"image": dv, "text": dt}, features=features,
                               rngs=rngs, dtype=dtype, **dict(fusion_kwargs or {}))
    self.head = AnswerHead(features, head_hidden, num_answers, dropout=head_dropout, dtype=dtype, rngs=rngs)
    self.modality_dropout = float(modality_dropout)
    self.rngs = rngs.fork() if self.modality_dropout else None

  def __call__(self, images: jax.Array, question_ids: jax.Array, question_mask: jax.Array | None = None,
               presence: Mapping[str, jax.Array] | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, dict[str, Any]]:
    """images (B, H, W, C); question_ids (B, L) or (B, Q, L) -> logits (B, [Q,] A), aux.

    `presence` maps "image"/"text" to (B,) bools (per image); absent modalities do not affect
    the logits. aux holds the fusion block's aux (attention maps etc.) and encoder outputs.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f"images: expected shape (B, {', '.join(map(str, self.image_shape))}), got {images.shape}")
    if not jnp.issubdtype(question_ids.dtype, jnp.integer) or question_ids.ndim not in (2, 3):
      raise ValueError(f"question_ids: expected integer (B, L) or (B, Q, L), got {question_ids.dtype} {question_ids.shape}")
    single = question_ids.ndim == 2
    q_ids = question_ids[:, None] if single else question_ids  # (B, Q, L)
    B, Q, L = q_ids.shape
    if B != images.shape[0]:
      raise ValueError(f"question_ids: batch size {B} differs from images' {images.shape[0]}")
    if question_mask is None:
      q_mask = q_ids != 0
    else:
      q_mask = (question_mask[:, None] if single else question_mask).astype(bool)
      if q_mask.shape != q_ids.shape:
        raise ValueError(f"question_mask: expected shape {q_ids.shape}, got {question_mask.shape}")
    if presence is not None:
      unknown = sorted(set(presence) - set(MODALITIES))
      if unknown:
        raise ValueError(f"presence: keys {unknown} unknown; expected some of {list(MODALITIES)}")
      for k, v in presence.items():
        if jnp.shape(v) != (B,):
          raise ValueError(f"presence[{k!r}]: expected shape (B,) = ({B},), one per image, got {jnp.shape(v)}")
    if presence is not None and "image" in presence:  # absent images never reach arithmetic
      keep = jnp.asarray(presence["image"]).astype(bool).reshape(-1, 1, 1, 1)
      images = jnp.where(keep, images, jnp.zeros((), images.dtype))
    img: EncoderOutput = self.encoders["image"](images, deterministic=deterministic)
    txt = self.encode_questions(q_ids.reshape(B * Q, L), q_mask.reshape(B * Q, L), deterministic)
    rep = lambda x: jnp.repeat(x, Q, axis=0)  # per image -> per question
    pres = None
    if presence is not None:
      pres = {k: rep(jnp.asarray(v).astype(bool)) for k, v in presence.items()}
    if self.modality_dropout and not deterministic:
      # Every modality takes part (one left out of `presence` is present), so either may drop.
      base = {**{m: jnp.ones((B * Q,), bool) for m in MODALITIES}, **(pres or {})}
      pres = modality_dropout(base, self.modality_dropout, self.rngs.dropout())
    if self.question_tokens == "pooled":
      txt_tokens, txt_mask = txt.pooled[:, None], jnp.ones((B * Q, 1), bool)
    else:
      txt_tokens, txt_mask = txt.tokens, txt.mask
    fused = self.fusion({"image": (img.tokens, img.mask), "text": (txt_tokens, txt_mask)},  # shared
                        pres, deterministic=deterministic)
    logits = self.head(fused.pooled, deterministic=deterministic)  # (B*Q, A)
    logits = logits.reshape(B, -1) if single else logits.reshape(B, Q, -1)
    return logits, {"fusion": fused.aux, "image_pooled": img.pooled, "text_pooled": txt.pooled}

  def encode_questions(self, ids: jax.Array, mask: jax.Array, deterministic: bool) -> EncoderOutput:
    """ids, mask (N, L) -> the text encoder's output for every row."""
    return self.encoders["text"](ids, mask, deterministic=deterministic)
