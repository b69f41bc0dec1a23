"""HF `ViTModel` / `ViTForImageClassification` safetensors <-> `mmjax.encoders.vision.ViT`.

The name map is written out in `vit_rules`; `load_vit` builds the model from the checkpoint's
`config.json` and imports, `save_vit` writes a folder that `transformers` reads back. A
`ViTForImageClassification` checkpoint stores the encoder under a "vit." prefix and its head as
"classifier"; a `ViTModel` checkpoint may carry the pooler (dense + tanh). HF's patch conv
(out, in, kh, kw) becomes the NHWC kernel (kh, kw, in, out), and the (1, 1 + N, D) position table
becomes `pos_embed.embedding` (1 + N, D).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.vision import ViT, ViTSpec
from mmjax.layers.common import Dtype
from mmjax.transfer.io import (Rule, encoder_layer_rules, export_weights, import_weights,
                               layer_norm_rule, linear_rule, read_hf_checkpoint, skipped_pooler,
                               write_hf_folder)

PREFIX = "vit."
# Tensors HF may save that mmjax's ViT has no use for (masked-image-modeling token).
IGNORED = ("embeddings.mask_token",)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu"}
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu",
            "quick_gelu": "quick_gelu"}


def hf_layout_problems(spec: ViTSpec) -> list[str]:
  """The `spec` fields HF's ViTModel / ViTForImageClassification cannot express, each with what
  HF ViT needs instead; empty when the ViT has that layout.

  HF ViT is fixed where mmjax's ViT is configurable: a class token with a learned position table,
  no LayerNorm before the encoder, a patch projection with a bias, a pooler only without a head.
  Its other settings (sizes, `ln_eps`, dropouts) have config.json fields; every `EncoderBlock`
  has q/k/v and feed-forward biases and the encoder its final LayerNorm, as in HF ViT.
  """
  problems = []
  if spec.pool != "cls":
    problems.append(f"pool={spec.pool!r} (HF ViT pools the class token: needs 'cls')")
  if spec.posemb != "learn":
    problems.append(f"posemb={spec.posemb!r} (HF ViT has a learned position table: needs 'learn')")
  if spec.pre_norm:
    problems.append("pre_norm=True (HF ViT has no LayerNorm before the encoder: needs False)")
  if not spec.patch_bias:
    problems.append("patch_bias=False (HF ViT's patch projection has a bias: needs True)")
  if spec.act not in _HF_ACTS:
    problems.append(f"act={spec.act!r} (HF ViT's hidden_act has no such function: needs one of "
                    f"{sorted(_HF_ACTS)})")
  if spec.num_classes and spec.pooler:
    problems.append(f"pooler=True with num_classes={spec.num_classes} (HF "
                    "ViTForImageClassification has no pooler: needs pooler=False with a head)")
  return problems


def check_hf_layout(spec: ViTSpec) -> None:
  """Raises a ValueError naming every field of `spec` that HF ViT's layout cannot express."""
  problems = hf_layout_problems(spec)
  if not problems:
    return
  hints = []
  if spec.pre_norm or not spec.patch_bias:
    hints.append(" A CLIP-style tower (pre_norm, no patch bias) is written with its text tower as a "
                 "CLIPModel (mmjax.transfer.clip).")
  if spec.pool == "map":
    hints.append(" A SigLIP-style tower (pool='map') is written with its text tower as a "
                 "SiglipModel (mmjax.transfer.siglip).")
  raise ValueError("this ViT has no HF ViT layout: " + "; ".join(problems) + "." + "".join(hints))


def vit_rules(spec: ViTSpec) -> list[Rule]:
  """Rules between `ViT` parameter paths and HF tensor names.

  Without a head the names are `ViTModel`'s (optionally with "pooler.dense"); with a head they
  are `ViTForImageClassification`'s: "vit."-prefixed encoder plus "classifier". A spec HF ViT
  cannot express raises (`check_hf_layout`) rather than mapping a different model's tensors.
  """
  check_hf_layout(spec)
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
  check_hf_layout(spec)
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


def grid_problem(spec: ViTSpec, image_size: Any, patch: Any) -> str | None:
  """What differs when `spec` lays its patches on another grid than a checkpoint built for
  `image_size` / `patch` (config.json's, ints or pairs); None when the grids agree. As many
  positions on another grid fit every shape, and would give each learned position another place."""
  image_size, patch = (tuple(np.broadcast_to(v, 2).tolist()) for v in (image_size, patch))
  grid = (image_size[0] // patch[0], image_size[1] // patch[1])
  if tuple(spec.grid) == grid:
    return None
  return (f"patch grid: module {spec.grid} (image_size {spec.image_size}, patch {spec.patch}), "
          f"checkpoint {grid} (image_size {image_size}, patch_size {patch})")


def backbone_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A `ViTForImageClassification` checkpoint's encoder tensors under `ViTModel` names."""
  if not any(k.startswith(PREFIX) for k in tensors):
    return tensors
  return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}


def checkpoint_names(spec: ViTSpec, tensors: dict[str, Any]) -> dict[str, Any]:
  """`tensors` under the names `vit_rules(spec)` reads: a headless ViT takes the encoder of a
  classification checkpoint (its classifier left out); a ViT with a head needs the classifier."""
  if not spec.num_classes:
    return backbone_names(tensors)
  if "classifier.weight" not in tensors:
    raise ValueError(f"the checkpoint has no classifier (a ViTModel, no 'classifier.weight') but "
                     f"the ViT has a head (num_classes={spec.num_classes}): build the ViT with "
                     "num_classes=0 to load its encoder")
  return tensors


def ignored(spec: ViTSpec, tensors: dict[str, Any]) -> tuple[str, ...]:
  """Checkpoint names `spec`'s ViT leaves unread: the mask token, and a pooler it does not have."""
  return IGNORED + tuple(PREFIX + n for n in IGNORED) + skipped_pooler(spec.pooler, tensors)


def import_vit(model: ViT, tensors: dict[str, np.ndarray]) -> None:
  """Assigns HF ViT tensors into `model` in place (strict; raises `WeightMismatchError`).

  A headless `model` takes the encoder of a classification checkpoint and leaves its classifier;
  one without a pooler leaves the checkpoint's pooler.
  """
  tensors = checkpoint_names(model.spec, tensors)
  import_weights(model, tensors, vit_rules(model.spec), ignore=ignored(model.spec, tensors))


def export_vit(model: ViT) -> dict[str, np.ndarray]:
  """`model`'s parameters as HF tensors: ViTModel names, or with a head the classifier's."""
  return export_weights(model, vit_rules(model.spec))


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
  cfg, tensors = read_hf_checkpoint(path)
  want = spec_from_hf_config(cfg, tensors)
  model = ViT(None, dtype=dtype, param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0), **{**want, **overrides})
  if problem := grid_problem(model.spec, want["image_size"], want["patch"]):
    raise ValueError(f"{os.fspath(path)!r}: {problem}; mmjax does not interpolate position tables")
  import_vit(model, tensors)
  return model


def save_vit(model: ViT, folder: str | os.PathLike) -> None:
  """Writes `folder`/model.safetensors and config.json in HF ViT layout."""
  write_hf_folder(folder, hf_config(model.spec), export_vit(model))
