"""HF `ViTModel` / `ViTForImageClassification` safetensors <-> `mmjax.encoders.vision.ViT`.

The name map is written out in `vit_rules`; `load_vit` builds the model from the checkpoint's
`config.json` and imports, `save_vit` writes a folder that `transformers` reads back. A
`ViTForImageClassification` checkpoint stores the encoder under a "vit." prefix and its head as
"classifier"; a `ViTModel` checkpoint may carry the pooler (dense + tanh). HF's patch conv
(out, in, kh, kw) becomes the NHWC kernel (kh, kw, in, out), and the (1, 1 + N, D) position table
becomes `pos_embed.embedding` (1 + N, D).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.vision import ViT, ViTSpec
from mmjax.layers.common import Dtype
from mmjax.transfer.io import (PICKLE_SUFFIXES, Rule, encoder_layer_rules, export_weights, import_weights,
                               layer_norm_rule, linear_rule, read_safetensors, write_safetensors)

PREFIX = "vit."
# Tensors HF may save that mmjax's ViT has no use for (masked-image-modeling token).
IGNORED = ("embeddings.mask_token",)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu"}
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu",
            "quick_gelu": "quick_gelu"}


def vit_rules(spec: ViTSpec) -> list[Rule]:
  """Rules between `ViT` parameter paths and HF tensor names.

  Without a head the names are `ViTModel`'s (optionally with "pooler.dense"); with a head they
  are `ViTForImageClassification`'s: "vit."-prefixed encoder plus "classifier".
  """
  if spec.pool != "cls" or spec.posemb != "learn":
    raise ValueError(f"HF ViT layout needs pool='cls' and posemb='learn', got pool={spec.pool!r}, "
                     f"posemb={spec.posemb!r}")
  if spec.num_classes and spec.pooler:
    raise ValueError("HF ViTForImageClassification has no pooler: a ViT with both a head and a "
                     "pooler has no HF layout")
  p = PREFIX if spec.num_classes else ""
  rules = [
      Rule("cls_token", f"{p}embeddings.cls_token"),
      Rule("pos_embed.embedding", f"{p}embeddings.position_embeddings",
           lambda a: a[0], lambda a: a[None]),
      Rule("patch_embed.conv.kernel", f"{p}embeddings.patch_embeddings.projection.weight",
           lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
      Rule("patch_embed.conv.bias", f"{p}embeddings.patch_embeddings.projection.bias"),
  ]
  for i in range(spec.depth):
    ours, hf = f"encoder.layers.{i}", f"{p}encoder.layer.{i}"
    rules += encoder_layer_rules(ours, hf, qkv=f"{hf}.attention.attention",
                                 attn_norm=f"{hf}.layernorm_before", mlp_norm=f"{hf}.layernorm_after")
  rules += layer_norm_rule("encoder.final_norm", f"{p}layernorm")
  if spec.pooler:
    rules += linear_rule("pooler", "pooler.dense")
  if spec.num_classes:
    rules += linear_rule("head", "classifier")
  return rules


def spec_from_hf_config(cfg: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """`ViTSpec` fields from an HF ViT `config.json` dict; head and pooler come from the tensors."""
  act = cfg.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported; known: {sorted(_ACTS)}")
  if not cfg.get("qkv_bias", True):
    raise ValueError("config.json: qkv_bias=false is not supported (mmjax attention has biases)")
  d = cfg.get("hidden_size", 768)
  pooler = "pooler.dense.weight" in tensors
  if pooler and (cfg.get("pooler_output_size") or d) != d:
    raise ValueError(f"config.json: pooler_output_size {cfg['pooler_output_size']} != hidden_size "
                     f"{d} is not supported")
  if pooler and cfg.get("pooler_act", "tanh") != "tanh":
    raise ValueError(f"config.json: pooler_act {cfg['pooler_act']!r} is not supported (only tanh)")
  head = "classifier.weight"
  return dict(
      width=d, depth=cfg.get("num_hidden_layers", 12), heads=cfg.get("num_attention_heads", 12),
      mlp_dim=cfg.get("intermediate_size", 3072), patch=cfg.get("patch_size", 16),
      image_size=cfg.get("image_size", 224), in_channels=cfg.get("num_channels", 3),
      num_classes=int(tensors[head].shape[0]) if head in tensors else 0, pool="cls",
      posemb="learn", pooler=pooler, ln_eps=cfg.get("layer_norm_eps", 1e-12), act=_ACTS[act],
      dropout=cfg.get("hidden_dropout_prob", 0.0),
      attn_dropout=cfg.get("attention_probs_dropout_prob", 0.0))


def hf_config(spec: ViTSpec) -> dict[str, Any]:
  """An HF `ViTConfig` dict describing `spec` (architecture by head)."""
  if spec.act not in _HF_ACTS:
    raise ValueError(f"act {spec.act!r} has no HF name; supported: {sorted(_HF_ACTS)}")
  cfg = {
      "architectures": ["ViTForImageClassification" if spec.num_classes else "ViTModel"],
      "model_type": "vit", "hidden_size": spec.width, "num_hidden_layers": spec.depth,
      "num_attention_heads": spec.heads, "intermediate_size": spec.mlp_dim,
      "hidden_act": _HF_ACTS[spec.act], "hidden_dropout_prob": spec.dropout,
      "attention_probs_dropout_prob": spec.attn_dropout, "initializer_range": 0.02,
      "layer_norm_eps": spec.ln_eps, "image_size": list(spec.image_size),
      "patch_size": list(spec.patch), "num_channels": spec.in_channels, "qkv_bias": True,
      "pooler_output_size": spec.width, "pooler_act": "tanh",
  }
  if spec.num_classes:
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(spec.num_classes)}
    cfg["label2id"] = {f"LABEL_{i}": i for i in range(spec.num_classes)}
  return cfg


def backbone_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A `ViTForImageClassification` checkpoint's encoder tensors under `ViTModel` names."""
  if not any(k.startswith(PREFIX) for k in tensors):
    return tensors
  return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}


def import_vit(model: ViT, tensors: dict[str, np.ndarray]) -> None:
  """Assigns HF ViT tensors into `model` in place (strict; raises `WeightMismatchError`).

  A headless `model` takes the encoder of a classification checkpoint and leaves its classifier.
  """
  if not model.spec.num_classes:
    tensors = backbone_names(tensors)
  ignore = IGNORED + tuple(PREFIX + n for n in IGNORED)
  import_weights(model, tensors, vit_rules(model.spec), ignore=ignore)


def export_vit(model: ViT) -> dict[str, np.ndarray]:
  """`model`'s parameters as HF tensors: ViTModel names, or with a head the classifier's."""
  return export_weights(model, vit_rules(model.spec))


def _read_checkpoint(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(folder, tensors) from a folder or a .safetensors file; sharded folders are merged."""
  if not os.path.isdir(path):
    return os.path.dirname(path) or ".", read_safetensors(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index) and not os.path.exists(os.path.join(path, "model.safetensors")):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_safetensors(os.path.join(path, shard)))
    return path, tensors
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    pickled = [n for n in sorted(os.listdir(path)) if n.endswith(PICKLE_SUFFIXES)]
    if pickled:
      raise ValueError(f"refusing to load {os.path.join(path, pickled[0])!r}: pickle-based weight "
                       "files can run code; convert it to .safetensors first")
  return path, read_safetensors(path)


def load_vit(path: str | os.PathLike, *, dtype: Dtype = jnp.float32,
             param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None,
             **overrides) -> ViT:
  """Builds a `ViT` from an HF ViT folder (config.json + model.safetensors) and imports.

  Args:
    path: the folder, or its .safetensors file (config.json must sit next to it).
    dtype, param_dtype: compute and parameter dtypes.
    rngs: dropout keys (parameters are overwritten); default `nnx.Rngs(0)`.
    **overrides: `ViTSpec` fields to change (dropout, ...); shape fields must match the weights,
      except `num_classes=0`, which loads only the encoder of a classification checkpoint.
  """
  folder, tensors = _read_checkpoint(os.fspath(path))
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {folder!r}")
  with open(cfg_path) as f:
    cfg = json.load(f)
  fields = {**spec_from_hf_config(cfg, tensors), **overrides}
  model = ViT(None, dtype=dtype, param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0), **fields)
  import_vit(model, tensors)
  return model


def save_vit(model: ViT, folder: str | os.PathLike) -> None:
  """Writes `folder`/model.safetensors and config.json in HF ViT layout."""
  folder = os.fspath(folder)
  cfg = hf_config(model.spec)
  tensors = export_vit(model)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
