"""HF `BertModel` safetensors <-> `mmjax.encoders.text.BertEncoder`.

The name map is written out in `bert_rules`; `load_bert` builds the model from the checkpoint's
`config.json` and imports, `save_bert` writes a folder that `transformers.BertModel.from_pretrained`
reads back. Checkpoints with a task head (`BertForPreTraining`, ...) store the encoder under a
"bert." prefix; the prefix is stripped and the head's tensors are left out.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.text import BertEncoder, BertSpec
from mmjax.layers.common import Dtype
from mmjax.transfer.io import (Rule, encoder_layer_rules, export_weights, import_weights,
                               layer_norm_rule, linear_rule, read_hf_checkpoint, skipped_pooler,
                               write_hf_folder)

PREFIX = "bert."
# Buffers HF sometimes saves that carry no learned weights.
BUFFERS = ("embeddings.position_ids",)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
         "silu": "silu", "swish": "silu", "tanh": "tanh", "quick_gelu": "quick_gelu"}
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu",
            "tanh": "tanh", "quick_gelu": "quick_gelu"}


def bert_rules(depth: int, pooler: bool = True) -> list[Rule]:
  """Rules between `BertEncoder` parameter paths and HF `BertModel` tensor names (no prefix)."""
  rules = [
      Rule("word_embed.embedding", "embeddings.word_embeddings.weight"),
      Rule("position_embed.embedding", "embeddings.position_embeddings.weight"),
      Rule("type_embed.embedding", "embeddings.token_type_embeddings.weight"),
      *layer_norm_rule("embed_norm", "embeddings.LayerNorm"),
  ]
  for i in range(depth):
    ours, hf = f"encoder.layers.{i}", f"encoder.layer.{i}"
    rules += encoder_layer_rules(ours, hf, qkv=f"{hf}.attention.self",
                                 attn_norm=f"{hf}.attention.output.LayerNorm",
                                 mlp_norm=f"{hf}.output.LayerNorm")
  if pooler:
    rules += linear_rule("pooler", "pooler.dense")
  return rules


def normalize_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF BertModel names: strips the "bert." prefix (dropping head tensors), renames gamma/beta."""
  if any(k.startswith(PREFIX) for k in tensors):
    tensors = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
  out = {}
  for k, v in tensors.items():
    if k.endswith("LayerNorm.gamma"):
      k = k[: -len("gamma")] + "weight"
    elif k.endswith("LayerNorm.beta"):
      k = k[: -len("beta")] + "bias"
    out[k] = v
  return out


def spec_from_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
  """`BertSpec` fields from an HF BERT `config.json` dict."""
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"config.json: position_embedding_type {cfg['position_embedding_type']!r} "
                     "is not supported (only 'absolute')")
  act = cfg.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported; known: {sorted(_ACTS)}")
  return dict(
      vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
      heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
      max_len=cfg.get("max_position_embeddings", 512), type_vocab=cfg.get("type_vocab_size", 2),
      pad_id=cfg.get("pad_token_id") or 0, ln_eps=cfg.get("layer_norm_eps", 1e-12),
      act=_ACTS[act], dropout=cfg.get("hidden_dropout_prob", 0.1),
      attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1))


def hf_config(spec: BertSpec) -> dict[str, Any]:
  """An HF `BertConfig` dict describing `spec`."""
  return {
      "architectures": ["BertModel"], "model_type": "bert", "vocab_size": spec.vocab_size,
      "hidden_size": spec.hidden, "num_hidden_layers": spec.depth,
      "num_attention_heads": spec.heads, "intermediate_size": spec.mlp_dim,
      "hidden_act": _HF_ACTS[spec.act], "hidden_dropout_prob": spec.dropout,
      "attention_probs_dropout_prob": spec.attn_dropout, "max_position_embeddings": spec.max_len,
      "type_vocab_size": spec.type_vocab, "initializer_range": 0.02,
      "layer_norm_eps": spec.ln_eps, "pad_token_id": spec.pad_id,
      "position_embedding_type": "absolute",
  }


def ignored(spec: BertSpec, tensors: dict[str, Any]) -> tuple[str, ...]:
  """Checkpoint names `spec`'s encoder leaves unread: buffers, and a pooler it does not have."""
  return BUFFERS + skipped_pooler(spec.pooler, tensors)


def import_bert(model: BertEncoder, tensors: dict[str, np.ndarray]) -> None:
  """Assigns HF BertModel tensors into `model` in place (strict; raises `WeightMismatchError`); a
  `model` without a pooler leaves the checkpoint's."""
  tensors = normalize_names(tensors)
  import_weights(model, tensors, bert_rules(model.spec.depth, model.spec.pooler),
                 ignore=ignored(model.spec, tensors))


def export_bert(model: BertEncoder) -> dict[str, np.ndarray]:
  """`model`'s parameters as HF BertModel tensors (no prefix)."""
  return export_weights(model, bert_rules(model.spec.depth, model.spec.pooler))


def blank_module(ctor: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """`ctor(rngs)` without running its initialisers: zero parameters, fresh RNG streams.

  For modules whose parameters are about to be overwritten by imported weights: generating
  random values for 100M parameters only to discard them costs seconds. RNG keys (dropout) are
  split from `rngs.dropout()`; other non-parameter state starts at zero.
  """
  abstract = nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))
  graphdef, params, keys, rest = nnx.split(abstract, nnx.Param, nnx.RngKey, ...)
  zeros = lambda s: np.zeros(s.shape, s.dtype)
  leaves, tree = jax.tree.flatten(keys)
  keys = jax.tree.unflatten(tree, list(jax.random.split(rngs.dropout(), len(leaves))))
  return nnx.merge(graphdef, jax.tree.map(zeros, params), keys, jax.tree.map(zeros, rest))


def load_bert(path: str | os.PathLike, *, pool: str | None = None, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None,
              **overrides) -> BertEncoder:
  """Builds a `BertEncoder` from an HF BERT folder (config.json + model.safetensors) and imports.

  Args:
    path: the folder, or its .safetensors file (config.json must sit next to it).
    pool: pooling, as in `BertEncoder`.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: dropout keys (no parameter is randomly initialised); default `nnx.Rngs(0)`.
    **overrides: `BertSpec` fields to change (dropout, ...); shape fields must match the weights.
  """
  cfg, tensors = read_hf_checkpoint(path)
  tensors = normalize_names(tensors)
  fields = {**spec_from_hf_config(cfg), "pooler": "pooler.dense.weight" in tensors, **overrides}
  model = blank_module(lambda r: BertEncoder("bert-base", pool=pool, dtype=dtype,
                                              param_dtype=param_dtype, rngs=r, **fields),
                       rngs or nnx.Rngs(0))
  import_bert(model, tensors)
  nnx.update(model, jax.device_put(nnx.state(model, nnx.Not(nnx.RngKey))))  # numpy -> jax arrays
  return model


def save_bert(model: BertEncoder, folder: str | os.PathLike) -> None:
  """Writes `folder`/model.safetensors and config.json in HF BertModel layout."""
  write_hf_folder(folder, hf_config(model.spec), export_bert(model))
