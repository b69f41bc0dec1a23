"""HF `SiglipModel` safetensors <-> `mmjax.models.dual_encoder.DualEncoder` with SigLIP's two towers.

The image tower is a `ViT` with pool="map" (SigLIP's attention-pooling head; no class token,
positions over the patches only, GELU-tanh); the text tower is a `ClipTextEncoder` with
causal=False, pool="last" and out_dim (the text "head", a dense with bias). Neither tower is
followed by a projection (`DualEncoder(projection=False)`); `logit_scale` / `logit_bias` are the
dual encoder's `log_scale` / `bias`. HF's head attention is a `torch.nn.MultiheadAttention`, whose
query, key and value weights are stacked in `in_proj_weight` (3D, D): each mmjax projection takes
its third. The name map is written out in `siglip_rules`; `load_siglip` builds the model from the
checkpoint's `config.json` and imports, `save_siglip` writes a folder that
`transformers.SiglipModel.from_pretrained` reads back.

HF's `SiglipModel.forward` does not cap the logit scale; `load_siglip` therefore builds the dual
encoder without a cap (`max_logit_scale=None`) unless told otherwise.
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
from mmjax.transfer import clip
from mmjax.transfer.clip import _ACTS, _HF_ACTS, clip_layer_rules, log_scale_rule
from mmjax.transfer.io import (Rule, _flat_params, export_weights, find_modules, import_weights,
                               join_path, layer_norm_rule, linear_rule, read_hf_checkpoint,
                               write_hf_folder)

IMAGE, TEXT = "image", "text"
# Buffers older checkpoints saved that carry no learned weights.
BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# HF `SiglipTextConfig` / `SiglipVisionConfig` defaults (config.json leaves out default values).
_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
                      projection_size=None)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
                        vision_use_head=True)
_QKV = ("query", "key", "value")


def check_vision(spec: ViTSpec) -> None:
  """A clear error unless `spec` has SigLIP's image tower shape."""
  shape = dict(pool=spec.pool, posemb=spec.posemb, pre_norm=spec.pre_norm,
               patch_bias=spec.patch_bias, pooler=spec.pooler, num_classes=spec.num_classes)
  want = dict(pool="map", posemb="learn", pre_norm=False, patch_bias=True, pooler=False, num_classes=0)
  if shape != want:
    raise ValueError(f"image tower: HF SigLIP layout needs a ViT with {want}, got {shape}")


def check_text(spec: ClipTextSpec) -> None:
  """A clear error unless `spec` has SigLIP's text tower shape."""
  clip.check_text(spec, "SigLIP")


def vision_rules(spec: ViTSpec, ours: str = "", hf: str = "vision_model") -> list[Rule]:
  """Rules between a SigLIP-shaped `ViT` at `ours` and HF `SiglipVisionModel` names under `hf`.

  The head's query / key / value rules read thirds of the stacked `in_proj_weight` / `in_proj_bias`
  and have no `to_foreign` (`export_siglip` stacks them back).
  """
  check_vision(spec)
  p = lambda s: join_path(ours, s)  # noqa: E731
  e, h, m, d = f"{hf}.embeddings", f"{hf}.head", p("map_head"), spec.width
  rules = [
      Rule(p("patch_embed.conv.kernel"), f"{e}.patch_embedding.weight",
           lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
      Rule(p("patch_embed.conv.bias"), f"{e}.patch_embedding.bias"),
      Rule(p("pos_embed.embedding"), f"{e}.position_embedding.weight"),
  ]
  for i in range(spec.depth):
    rules += clip_layer_rules(p(f"encoder.layers.{i}"), f"{hf}.encoder.layers.{i}")
  rules += layer_norm_rule(p("encoder.final_norm"), f"{hf}.post_layernorm")
  rules.append(Rule(f"{m}.probe", f"{h}.probe"))
  for k, proj in enumerate(_QKV):
    rows = slice(k * d, (k + 1) * d)
    rules += [Rule(f"{m}.attn.{proj}.kernel", f"{h}.attention.in_proj_weight",
                   lambda a, r=rows: a[r].T, None),
              Rule(f"{m}.attn.{proj}.bias", f"{h}.attention.in_proj_bias", lambda a, r=rows: a[r], None)]
  rules += linear_rule(f"{m}.attn.out", f"{h}.attention.out_proj")
  rules += layer_norm_rule(f"{m}.norm", f"{h}.layernorm")
  rules += linear_rule(f"{m}.mlp.fc1", f"{h}.mlp.fc1")
  return rules + linear_rule(f"{m}.mlp.fc2", f"{h}.mlp.fc2")


def text_rules(spec: ClipTextSpec, ours: str = "", hf: str = "text_model") -> list[Rule]:
  """Rules between a SigLIP-shaped `ClipTextEncoder` at `ours` and HF `SiglipTextModel` names."""
  check_text(spec)
  p = lambda s: join_path(ours, s)  # noqa: E731
  rules = [
      Rule(p("word_embed.embedding"), f"{hf}.embeddings.token_embedding.weight"),
      Rule(p("position_embed.embedding"), f"{hf}.embeddings.position_embedding.weight"),
  ]
  for i in range(spec.depth):
    rules += clip_layer_rules(p(f"encoder.layers.{i}"), f"{hf}.encoder.layers.{i}")
  rules += layer_norm_rule(p("encoder.final_norm"), f"{hf}.final_layer_norm")
  return rules + linear_rule(p("head"), f"{hf}.head")


def towers(model: DualEncoder) -> tuple[tuple[str, ViT], tuple[str, ClipTextEncoder]]:
  """((path, image tower), (path, text tower)) of a SigLIP-shaped dual encoder; a clear error else."""
  if not isinstance(model, DualEncoder) or tuple(model.names) != (IMAGE, TEXT):
    raise ValueError(f"model: expected a DualEncoder with towers ({IMAGE!r}, {TEXT!r}), got "
                     f"{getattr(model, 'names', type(model).__name__)}")
  if model.loss_type != "siglip":
    raise ValueError(f"model: HF SigLIP layout needs loss_type='siglip', got {model.loss_type!r}")
  if getattr(model, "proj", None) is not None:
    raise ValueError("model: HF SigLIP has no projections after the towers; build the DualEncoder "
                     "with projection=False")
  image, text = find_modules(model, ViT), find_modules(model, ClipTextEncoder)
  if len(image) != 1 or len(text) != 1:
    raise ValueError(f"model: HF SigLIP layout needs one ViT and one ClipTextEncoder tower, got "
                     f"{len(image)} ViT and {len(text)} ClipTextEncoder")
  return image[0], text[0]


def siglip_rules(model: DualEncoder) -> list[Rule]:
  """Rules between a SigLIP-shaped `DualEncoder`'s parameter paths and HF `SiglipModel` names."""
  (vpath, image), (tpath, text) = towers(model)
  scalar = dict(to_mmjax=lambda a: a.reshape(()), to_foreign=lambda a: a.reshape(1))
  return [*vision_rules(image.spec, vpath), *text_rules(text.spec, tpath),
          log_scale_rule(model, shape=(1,)), Rule("bias", "logit_bias", **scalar)]


def import_siglip(model: DualEncoder, tensors: dict[str, np.ndarray]) -> None:
  """Assigns HF SiglipModel tensors into `model` in place (strict; raises `WeightMismatchError`)."""
  import_weights(model, tensors, siglip_rules(model), ignore=BUFFERS)


def export_siglip(model: DualEncoder) -> dict[str, np.ndarray]:
  """`model`'s parameters as HF SiglipModel tensors."""
  rules = siglip_rules(model)
  out = export_weights(model, [r for r in rules if r.to_foreign is not None])
  params = _flat_params(model)
  stacked = {}  # HF name -> [query, key, value] in torch layout
  for r in rules:
    if r.to_foreign is None:
      value = np.asarray(params[r.path][...])
      stacked.setdefault(r.name, []).append(value.T if r.path.endswith(".kernel") else value)
  for name, parts in stacked.items():
    out[name] = np.concatenate(parts, axis=0)
  return out


def _act(cfg: dict[str, Any], field: str) -> str:
  act = cfg["hidden_act"]
  if act not in _ACTS:
    raise ValueError(f"config.json: {field}.hidden_act {act!r} is not supported; known: {sorted(_ACTS)}")
  return _ACTS[act]


def spec_from_hf_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(`ViTSpec` fields, `ClipTextSpec` fields) from an HF SigLIP config dict."""
  v = {**_VISION_DEFAULTS, **cfg.get("vision_config", {})}
  t = {**_TEXT_DEFAULTS, **cfg.get("text_config", {})}
  if not v["vision_use_head"]:
    raise ValueError("config.json: vision_config.vision_use_head=false is not supported (the image "
                     "embedding is the attention-pooling head's output)")
  vision = dict(
      width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], patch=v["patch_size"], image_size=v["image_size"],
      in_channels=v["num_channels"], pool="map", posemb="learn", pre_norm=False, patch_bias=True,
      ln_eps=v["layer_norm_eps"], act=_act(v, "vision_config"), dropout=0.0,
      attn_dropout=v["attention_dropout"])
  text = dict(
      vocab_size=t["vocab_size"], hidden=t["hidden_size"], depth=t["num_hidden_layers"],
      heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
      max_len=t["max_position_embeddings"], eos_id=None, ln_eps=t["layer_norm_eps"],
      act=_act(t, "text_config"), dropout=0.0, attn_dropout=t["attention_dropout"], causal=False,
      pool="last", out_dim=t["projection_size"] or t["hidden_size"])
  return vision, text


def hf_config(model: DualEncoder) -> dict[str, Any]:
  """An HF `SiglipConfig` dict describing `model` (every shape field written out)."""
  (_, image), (_, text) = towers(model)
  v, t = image.spec, text.spec
  for spec, field in ((v, "image"), (t, "text")):
    if spec.act not in _HF_ACTS:
      raise ValueError(f"{field} tower: act {spec.act!r} has no HF name; supported: {sorted(_HF_ACTS)}")
  if v.patch[0] != v.patch[1] or v.image_size[0] != v.image_size[1]:
    raise ValueError(f"image tower: HF SigLIP needs square patches and images, got patch {v.patch}, "
                     f"image_size {v.image_size}")
  act = lambda a: "gelu_pytorch_tanh" if a == "gelu_tanh" else _HF_ACTS[a]  # noqa: E731 (SigLIP's name)
  return {
      "architectures": ["SiglipModel"], "model_type": "siglip",
      "text_config": {
          "model_type": "siglip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden,
          "intermediate_size": t.mlp_dim, "num_hidden_layers": t.depth,
          "num_attention_heads": t.heads, "max_position_embeddings": t.max_len,
          "hidden_act": act(t.act), "layer_norm_eps": t.ln_eps, "attention_dropout": t.attn_dropout,
          "projection_size": t.out_dim},
      "vision_config": {
          "model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
          "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
          "num_channels": v.in_channels, "image_size": v.image_size[0], "patch_size": v.patch[0],
          "hidden_act": act(v.act), "layer_norm_eps": v.ln_eps, "attention_dropout": v.attn_dropout,
          "vision_use_head": True},
  }


def build_siglip(vision: dict[str, Any], text: dict[str, Any], *,
                 max_logit_scale: float | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> DualEncoder:
  """A randomly initialised SigLIP-shaped `DualEncoder` from `ViTSpec` and `ClipTextSpec` fields."""
  image_size = vision.get("image_size", ViTSpec.image_size)
  h, w = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
  encoders = {IMAGE: {"name": "vit", "variant": None, "param_dtype": param_dtype, **vision},
              TEXT: {"name": "clip_text", "param_dtype": param_dtype, **text}}
  examples = {IMAGE: jax.ShapeDtypeStruct((1, h, w, vision.get("in_channels", 3)), jnp.float32),
              TEXT: jax.ShapeDtypeStruct((1, text.get("max_len", ClipTextSpec.max_len)), jnp.int32)}
  return DualEncoder(encoders=encoders, input_examples=examples, embed_dim=int(text["out_dim"]),
                     projection=False, loss_type="siglip", max_logit_scale=max_logit_scale,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def load_siglip(path: str | os.PathLike, *, max_logit_scale: float | None = None,
                dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                rngs: nnx.Rngs | None = None) -> DualEncoder:
  """Builds a SigLIP `DualEncoder` from an HF SigLIP folder (config.json + model.safetensors) and imports.

  Args:
    path: the folder, or its .safetensors file (config.json must sit next to it).
    max_logit_scale: cap on exp(logit_scale); None (default) matches HF's forward.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: dropout keys (no parameter is randomly initialised); default `nnx.Rngs(0)`.

  Returns:
    The model; call it as `model({"image": images (B, H, W, C), "text": ids (B, L)})`, with texts
    padded to the full `max_len` as SigLIP was trained (it pools the last position).
  """
  cfg, tensors = read_hf_checkpoint(path)
  if cfg.get("model_type", "siglip") != "siglip":
    raise ValueError(f"{os.fspath(path)}: config.json's model_type {cfg['model_type']!r} is not a SigLIP model ('siglip')")
  vision, text = spec_from_hf_config(cfg)
  model = blank_module(lambda r: build_siglip(vision, text, max_logit_scale=max_logit_scale,
                                              dtype=dtype, param_dtype=param_dtype, rngs=r),
                       rngs or nnx.Rngs(0))
  import_siglip(model, tensors)
  nnx.update(model, jax.device_put(nnx.state(model, nnx.Not(nnx.RngKey))))  # numpy -> jax arrays
  return model


def save_siglip(model: DualEncoder, folder: str | os.PathLike) -> None:
  """Writes `folder`/model.safetensors and config.json in HF SiglipModel layout."""
  write_hf_folder(folder, hf_config(model), export_siglip(model))
