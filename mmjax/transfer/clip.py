"""HF `CLIPModel` safetensors <-> `mmjax.models.dual_encoder.DualEncoder` with CLIP's two towers.

The image tower is a `ViT` with CLIP's options (`pre_norm` for "pre_layrnorm", no patch-conv
bias, quick-GELU, final LayerNorm = "post_layernorm"); the text tower is a `ClipTextEncoder`
(causal, pooled at the end-of-text token). `visual_projection` / `text_projection` are the dual
encoder's bias-free projections and `logit_scale` its log scale. The name map is written out in
`clip_rules`; `load_clip` builds the model from the checkpoint's `config.json` and imports,
`save_clip` writes a folder that `transformers.CLIPModel.from_pretrained` reads back.

HF's `CLIPModel.forward` does not clip the logit scale; `load_clip` therefore builds the dual
encoder without a cap (`max_logit_scale=None`) unless told otherwise (CLIP training caps it at 100).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.text import ClipTextEncoder, ClipTextSpec
from mmjax.encoders.vision import ViT, ViTSpec
from mmjax.layers.common import Dtype
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer.bert import blank_module
from mmjax.transfer.io import (Rule, export_weights, import_weights, layer_norm_rule, linear_rule,
                               read_hf_checkpoint, write_hf_folder)

IMAGE, TEXT = "image", "text"
# Buffers older checkpoints saved that carry no learned weights.
BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu",
            "silu": "silu"}
# HF's legacy rule: with eos_token_id 2 the text is pooled at the largest id (`eos_id=None`).
_LEGACY_EOS = 2
# HF `CLIPTextConfig` / `CLIPVisionConfig` defaults (config.json leaves out default values).
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                      eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)


def clip_layer_rules(ours: str, hf: str) -> list[Rule]:
  """One pre-LN `mmjax.layers.EncoderBlock` at `ours` <-> an HF `CLIPEncoderLayer` at `hf`."""
  rules = []
  for proj, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
    rules += linear_rule(f"{ours}.attn.{proj}", f"{hf}.self_attn.{name}")
  rules += layer_norm_rule(f"{ours}.attn_norm", f"{hf}.layer_norm1")
  rules += linear_rule(f"{ours}.mlp.fc1", f"{hf}.mlp.fc1")
  rules += linear_rule(f"{ours}.mlp.fc2", f"{hf}.mlp.fc2")
  rules += layer_norm_rule(f"{ours}.mlp_norm", f"{hf}.layer_norm2")
  return rules


def vision_rules(spec: ViTSpec, ours: str = f"encoders.{IMAGE}", hf: str = "vision_model") -> list[Rule]:
  """Rules between a CLIP-shaped `ViT` at `ours` and HF `CLIPVisionModel` names under `hf`."""
  shape = dict(pool=spec.pool, posemb=spec.posemb, pre_norm=spec.pre_norm,
               patch_bias=spec.patch_bias, pooler=spec.pooler, num_classes=spec.num_classes)
  want = dict(pool="cls", posemb="learn", pre_norm=True, patch_bias=False, pooler=False, num_classes=0)
  if shape != want:
    raise ValueError(f"image tower: HF CLIP layout needs a ViT with {want}, got {shape}")
  e = f"{hf}.embeddings"
  rules = [
      Rule(f"{ours}.cls_token", f"{e}.class_embedding", lambda a: a[None, None], lambda a: a[0, 0]),
      Rule(f"{ours}.patch_embed.conv.kernel", f"{e}.patch_embedding.weight",
           lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
      Rule(f"{ours}.pos_embed.embedding", f"{e}.position_embedding.weight"),
      *layer_norm_rule(f"{ours}.pre_norm", f"{hf}.pre_layrnorm"),
  ]
  for i in range(spec.depth):
    rules += clip_layer_rules(f"{ours}.encoder.layers.{i}", f"{hf}.encoder.layers.{i}")
  return rules + layer_norm_rule(f"{ours}.encoder.final_norm", f"{hf}.post_layernorm")


# The text tower options HF's CLIPTextModel and SiglipTextModel each run (head: out_dim > 0).
TEXT_LAYOUTS = {"CLIP": dict(causal=True, pool="eos", head=False),
                "SigLIP": dict(causal=False, pool="last", head=True)}


def check_text(spec: ClipTextSpec, layout: str = "CLIP") -> None:
  """A clear error unless `spec` has the text tower shape of HF's `layout` ("CLIP": causal, pooled
  at the end token, no head; "SigLIP": bidirectional, pooled at the last position, a head)."""
  shape = dict(causal=spec.causal, pool=spec.pool, head=spec.out_dim > 0)
  if shape != TEXT_LAYOUTS[layout]:
    raise ValueError(f"text tower: HF {layout} layout needs a clip_text encoder with "
                     f"{TEXT_LAYOUTS[layout]}, got {shape}")


def text_rules(spec: ClipTextSpec, ours: str = f"encoders.{TEXT}", hf: str = "text_model") -> list[Rule]:
  """Rules between a `ClipTextEncoder` at `ours` and HF `CLIPTextModel` names under `hf`."""
  check_text(spec)
  rules = [
      Rule(f"{ours}.word_embed.embedding", f"{hf}.embeddings.token_embedding.weight"),
      Rule(f"{ours}.position_embed.embedding", f"{hf}.embeddings.position_embedding.weight"),
  ]
  for i in range(spec.depth):
    rules += clip_layer_rules(f"{ours}.encoder.layers.{i}", f"{hf}.encoder.layers.{i}")
  return rules + layer_norm_rule(f"{ours}.encoder.final_norm", f"{hf}.final_layer_norm")


def check_clip(model: DualEncoder) -> tuple[ViTSpec, ClipTextSpec]:
  """The towers' specs; a clear error unless `model` has CLIP's shape (image ViT, text CLIP)."""
  if not isinstance(model, DualEncoder) or model.names != (IMAGE, TEXT):
    raise ValueError(f"model: expected a DualEncoder with towers ({IMAGE!r}, {TEXT!r}), got "
                     f"{getattr(model, 'names', type(model).__name__)}")
  image, text = model.encoders[IMAGE], model.encoders[TEXT]
  if not isinstance(image, ViT) or not isinstance(text, ClipTextEncoder):
    raise ValueError(f"model: HF CLIP layout needs towers ViT and ClipTextEncoder, got "
                     f"{type(image).__name__} and {type(text).__name__}")
  if model.loss_type != "clip":
    raise ValueError(f"model: HF CLIP layout has no SigLIP bias, got loss_type={model.loss_type!r}")
  return image.spec, text.spec


def log_scale_rule(model: DualEncoder, name: str = "logit_scale", shape: tuple[int, ...] = ()) -> Rule:
  """The log logit scale, exported as the forward pass uses it: capped at `max_log_scale` (the
  stored value may have drifted past the cap, where its gradient is 0), so HF's logits equal ours."""
  cap = model.max_log_scale
  to_foreign = lambda a: (a if cap is None else np.minimum(a, cap).astype(a.dtype)).reshape(shape)
  return Rule("log_scale", name, lambda a: a.reshape(()), to_foreign)


def clip_rules(model: DualEncoder) -> list[Rule]:
  """Rules between a CLIP-shaped `DualEncoder`'s parameter paths and HF `CLIPModel` names."""
  vspec, tspec = check_clip(model)
  t = lambda a: a.T
  return [
      *vision_rules(vspec), *text_rules(tspec),
      Rule(f"proj.{IMAGE}.kernel", "visual_projection.weight", t, t),
      Rule(f"proj.{TEXT}.kernel", "text_projection.weight", t, t),
      log_scale_rule(model),
  ]


def import_clip(model: DualEncoder, tensors: dict[str, np.ndarray]) -> None:
  """Assigns HF CLIPModel tensors into `model` in place (strict; raises `WeightMismatchError`)."""
  import_weights(model, tensors, clip_rules(model), ignore=BUFFERS)


def export_clip(model: DualEncoder) -> dict[str, np.ndarray]:
  """`model`'s parameters as HF CLIPModel tensors."""
  return export_weights(model, clip_rules(model))


def _act(cfg: dict[str, Any], field: str) -> str:
  act = cfg["hidden_act"]
  if act not in _ACTS:
    raise ValueError(f"config.json: {field}.hidden_act {act!r} is not supported; known: {sorted(_ACTS)}")
  return _ACTS[act]


def spec_from_hf_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
  """(`ViTSpec` fields, `ClipTextSpec` fields, projection width) from an HF CLIP config dict."""
  # Older hub configs also carry *_config_dict: HF's CLIPConfig then takes it (over the defaults)
  # for every field, whatever *_config says.
  v = {**_VISION_DEFAULTS, **(cfg.get("vision_config_dict") or cfg.get("vision_config") or {})}
  t = {**_TEXT_DEFAULTS, **(cfg.get("text_config_dict") or cfg.get("text_config") or {})}
  vision = dict(
      width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], patch=v["patch_size"], image_size=v["image_size"],
      in_channels=v["num_channels"], pool="cls", posemb="learn", pre_norm=True,
      patch_bias=False, ln_eps=v["layer_norm_eps"], act=_act(v, "vision_config"), dropout=0.0,
      attn_dropout=v["attention_dropout"])
  eos = t["eos_token_id"]
  text = dict(
      vocab_size=t["vocab_size"], hidden=t["hidden_size"], depth=t["num_hidden_layers"],
      heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
      max_len=t["max_position_embeddings"], eos_id=None if eos == _LEGACY_EOS else eos,
      ln_eps=t["layer_norm_eps"], act=_act(t, "text_config"), dropout=0.0,
      attn_dropout=t["attention_dropout"])
  return vision, text, int(cfg.get("projection_dim", 512))


def hf_config(model: DualEncoder) -> dict[str, Any]:
  """An HF `CLIPConfig` dict describing `model` (every shape field written out)."""
  v, t = check_clip(model)
  for spec, field in ((v, "image"), (t, "text")):
    if spec.act not in _HF_ACTS:
      raise ValueError(f"{field} tower: act {spec.act!r} has no HF name; supported: {sorted(_HF_ACTS)}")
  if v.patch[0] != v.patch[1] or v.image_size[0] != v.image_size[1]:
    raise ValueError(f"image tower: HF CLIP needs square patches and images, got patch {v.patch}, "
                     f"image_size {v.image_size}")
  if t.eos_id == _LEGACY_EOS:  # HF reads eos_token_id 2 as "pool at the largest id"
    raise ValueError(f"text tower: eos_id {_LEGACY_EOS} cannot be written to an HF CLIP config "
                     f"(HF reads it as the legacy rule, pooling at the largest id)")
  e = model.embed_dim
  return {
      "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": e,
      "logit_scale_init_value": float(model.effective_log_scale()),
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden,
          "intermediate_size": t.mlp_dim, "num_hidden_layers": t.depth,
          "num_attention_heads": t.heads, "max_position_embeddings": t.max_len,
          "hidden_act": _HF_ACTS[t.act], "layer_norm_eps": t.ln_eps,
          "attention_dropout": t.attn_dropout, "projection_dim": e,
          "eos_token_id": _LEGACY_EOS if t.eos_id is None else t.eos_id},
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
          "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
          "num_channels": v.in_channels, "image_size": v.image_size[0], "patch_size": v.patch[0],
          "hidden_act": _HF_ACTS[v.act], "layer_norm_eps": v.ln_eps,
          "attention_dropout": v.attn_dropout, "projection_dim": e},
  }


def build_clip(vision: dict[str, Any], text: dict[str, Any], embed_dim: int, *,
               max_logit_scale: float | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> DualEncoder:
  """A randomly initialised CLIP-shaped `DualEncoder` from `ViTSpec` and `ClipTextSpec` fields."""
  h, w = _pair(vision["image_size"])
  encoders = {IMAGE: {"name": "vit", "variant": None, "param_dtype": param_dtype, **vision},
              TEXT: {"name": "clip_text", "param_dtype": param_dtype, **text}}
  examples = {IMAGE: jax.ShapeDtypeStruct((1, h, w, vision.get("in_channels", 3)), jnp.float32),
              TEXT: jax.ShapeDtypeStruct((1, text.get("max_len", ClipTextSpec.max_len)), jnp.int32)}
  return DualEncoder(encoders=encoders, input_examples=examples, embed_dim=embed_dim, loss_type="clip",
                     max_logit_scale=max_logit_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(i) for i in v)


def load_clip(path: str | os.PathLike, *, max_logit_scale: float | None = None,
              dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              rngs: nnx.Rngs | None = None) -> DualEncoder:
  """Builds a CLIP `DualEncoder` from an HF CLIP folder (config.json + model.safetensors) and imports.

  Args:
    path: the folder, or its .safetensors file (config.json must sit next to it).
    max_logit_scale: cap on exp(logit_scale); None (default) matches HF's forward, 100 CLIP training.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: dropout keys (no parameter is randomly initialised); default `nnx.Rngs(0)`.

  Returns:
    The model; call it as `model({"image": images (B, H, W, C), "text": ids (B, L)})`.
  """
  cfg, tensors = read_hf_checkpoint(path)
  if cfg.get("model_type", "clip") != "clip":
    raise ValueError(f"{os.fspath(path)}: config.json's model_type {cfg['model_type']!r} is not a CLIP model ('clip')")
  vision, text, embed_dim = spec_from_hf_config(cfg)
  model = blank_module(lambda r: build_clip(vision, text, embed_dim, max_logit_scale=max_logit_scale,
                                            dtype=dtype, param_dtype=param_dtype, rngs=r),
                       rngs or nnx.Rngs(0))
  import_clip(model, tensors)
  nnx.update(model, jax.device_put(nnx.state(model, nnx.Not(nnx.RngKey))))  # numpy -> jax arrays
  return model


def save_clip(model: DualEncoder, folder: str | os.PathLike) -> None:
  """Writes `folder`/model.safetensors and config.json in HF CLIPModel layout."""
  write_hf_folder(folder, hf_config(model), export_clip(model))
