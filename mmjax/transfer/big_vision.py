"""big_vision `.npz` checkpoints -> mmjax: ViT (big_vision's models/vit.py) and SigLIP's two towers
(models/proj/image_text/two_towers.py over vit.py and text_transformer.py).

big_vision saves a parameter tree flattened to '/'-joined keys ("Transformer/encoderblock_0/
LayerNorm_0/scale"), optionally under "params/" (which its `load_params` strips, as `read_npz`
does); a two-tower model keeps its towers under "img/" and "txt/" and its temperature and bias as
"t" and "b". Files are read with `allow_pickle=False`: a pickled or object-array `.npz` is refused.

What the rules convert:
  - attention kernels: query / key / value (D, heads, head_dim) -> (D, heads * head_dim), their
    biases (heads, head_dim) -> flat, out (heads, head_dim, D) -> (heads * head_dim, D); the heads
    must equal the module's (a mismatch is reported, not silently regrouped);
  - position tables (1, N, D) -> (N, D); big_vision adds no position to its class token (pool
    "tok"), mmjax's table covers it: that row is imported as zeros (the same sums);
  - the patch conv kernel (ph, pw, C, D) and Dense kernels (in, out) are mmjax's layout already;
  - a scanned encoder ("encoderblock" with a leading depth axis) is read layer by layer.

big_vision's ViT and text transformer compute GELU in its tanh form and LayerNorm with eps 1e-6
(flax's defaults), and the text transformer attends both ways and pools the last position; a
checkpoint carries no such settings, so the module it loads into must have them (`load_vit` and
`load_siglip` build it so from the tensors' shapes; `model_init` refuses a module without them).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.encoders.text import ClipTextEncoder, ClipTextSpec
from mmjax.encoders.vision import ViT, ViTSpec
from mmjax.layers.common import Dtype
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer import siglip
from mmjax.transfer.bert import blank_module
from mmjax.transfer.io import LazyTensor, Rule, import_weights, join_path, open_npz

PREFIXES = ("params/", "opt/target/")  # where big_vision's load_params finds the parameters
IMG, TXT = "img/", "txt/"
_SCANNED = re.compile(r"(.*)/encoderblock/(.*)")
# big_vision / flax defaults a checkpoint does not record.
BV_DEFAULTS = dict(ln_eps=1e-6, act="gelu_tanh")


def read_npz(path: str | os.PathLike) -> dict[str, LazyTensor]:
  """Key -> `LazyTensor` of a big_vision `.npz`: "params/" stripped, scanned blocks split by layer."""
  tensors = open_npz(path)
  for prefix in PREFIXES:
    if tensors and all(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items()}
      break
  out = {}
  for k, v in tensors.items():
    m = _SCANNED.fullmatch(k)
    if m is None:
      out[k] = v
      continue
    for i in range(v.shape[0]):
      out[f"{m.group(1)}/encoderblock_{i}/{m.group(2)}"] = v.row(i)
  return out


def subtree(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The tensors under `prefix`, the prefix stripped."""
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _heads_in(heads: int):
  """(D, heads, head_dim) -> (D, heads * head_dim), refusing another head count."""
  def f(a):
    if a.ndim != 3 or a.shape[1] != heads:
      raise ValueError(f"expected (D, {heads} heads, head_dim)")
    return a.reshape(a.shape[0], -1)
  return f


def _heads_bias(heads: int):
  def f(a):
    if a.ndim != 2 or a.shape[0] != heads:
      raise ValueError(f"expected ({heads} heads, head_dim)")
    return a.reshape(-1)
  return f


def _heads_out(heads: int):
  def f(a):
    if a.ndim != 3 or a.shape[0] != heads:
      raise ValueError(f"expected ({heads} heads, head_dim, D)")
    return a.reshape(-1, a.shape[-1])
  return f


def _table(a):
  """(1, N, D) position table -> (N, D)."""
  if a.ndim != 3 or a.shape[0] != 1:
    raise ValueError("expected a (1, N, D) position table")
  return a[0]


def _table_with_cls_row(a):
  """(1, N, D) -> (1 + N, D) with a zero row for the class token (big_vision gives it none)."""
  return np.concatenate([np.zeros((1, a.shape[-1]), a.dtype), _table(a)])


def _norm(ours: str, bv: str) -> list[Rule]:
  return [Rule(f"{ours}.scale", f"{bv}/scale", to_foreign=None),
          Rule(f"{ours}.bias", f"{bv}/bias", to_foreign=None)]


def _dense(ours: str, bv: str) -> list[Rule]:
  return [Rule(f"{ours}.kernel", f"{bv}/kernel", to_foreign=None),
          Rule(f"{ours}.bias", f"{bv}/bias", to_foreign=None)]


def _attention(ours: str, bv: str, heads: int) -> list[Rule]:
  """An mmjax `MultiHeadAttention` at `ours` <- flax `MultiHeadDotProductAttention` at `bv`."""
  rules = []
  for proj in ("query", "key", "value"):
    rules += [Rule(f"{ours}.{proj}.kernel", f"{bv}/{proj}/kernel", _heads_in(heads), None),
              Rule(f"{ours}.{proj}.bias", f"{bv}/{proj}/bias", _heads_bias(heads), None)]
  return rules + [Rule(f"{ours}.out.kernel", f"{bv}/out/kernel", _heads_out(heads), None),
                  Rule(f"{ours}.out.bias", f"{bv}/out/bias", to_foreign=None)]


def _encoder(ours: str, bv: str, depth: int, heads: int) -> list[Rule]:
  """An mmjax pre-LN `Encoder` at `ours` <- big_vision's `Encoder` at `bv`."""
  rules = []
  for i in range(depth):
    o, b = f"{ours}.layers.{i}", f"{bv}/encoderblock_{i}"
    rules += [*_norm(f"{o}.attn_norm", f"{b}/LayerNorm_0"),
              *_attention(f"{o}.attn", f"{b}/MultiHeadDotProductAttention_0", heads),
              *_norm(f"{o}.mlp_norm", f"{b}/LayerNorm_1"),
              *_dense(f"{o}.mlp.fc1", f"{b}/MlpBlock_0/Dense_0"),
              *_dense(f"{o}.mlp.fc2", f"{b}/MlpBlock_0/Dense_1")]
  return rules + _norm(f"{ours}.final_norm", f"{bv}/encoder_norm")


def vit_rules(spec: ViTSpec) -> list[Rule]:
  """Rules between `ViT` parameter paths and big_vision ViT keys (no "img/" prefix).

  pool "cls" / "gap" / "map" are big_vision's "tok" / "gap" / "map"; the pooler is its
  `pre_logits` (rep_size = width, tanh) and the head its `head`.
  """
  if spec.pre_norm:
    raise ValueError("big_vision's ViT has no LayerNorm before the encoder: pre_norm must be False")
  rules = [Rule("patch_embed.conv.kernel", "embedding/kernel", to_foreign=None)]
  if spec.patch_bias:
    rules.append(Rule("patch_embed.conv.bias", "embedding/bias", to_foreign=None))
  if spec.posemb == "learn":
    rules.append(Rule("pos_embed.embedding", "pos_embedding",
                      _table_with_cls_row if spec.pool == "cls" else _table, None))
  if spec.pool == "cls":
    rules.append(Rule("cls_token", "cls", to_foreign=None))
  rules += _encoder("encoder", "Transformer", spec.depth, spec.heads)
  if spec.pool == "map":
    rules += [Rule("map_head.probe", "MAPHead_0/probe", to_foreign=None),
              *_attention("map_head.attn", "MAPHead_0/MultiHeadDotProductAttention_0", spec.heads),
              *_norm("map_head.norm", "MAPHead_0/LayerNorm_0"),
              *_dense("map_head.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0"),
              *_dense("map_head.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")]
  if spec.pooler:
    rules += _dense("pooler", "pre_logits")
  if spec.num_classes:
    rules += _dense("head", "head")
  return rules


def text_rules(spec: ClipTextSpec) -> list[Rule]:
  """Rules between a `ClipTextEncoder` and big_vision text-transformer keys (no "txt/" prefix)."""
  if spec.causal or spec.pool != "last":
    raise ValueError(f"big_vision's text transformer attends both ways and pools the last position: "
                     f"the clip_text encoder needs causal=False, pool='last', got causal="
                     f"{spec.causal}, pool={spec.pool!r}")
  rules = [Rule("word_embed.embedding", "Embed_0/embedding", to_foreign=None),
           Rule("position_embed.embedding", "pos_embedding", _table, None),
           *_encoder("encoder", "Encoder_0", spec.depth, spec.heads)]
  return rules + (_dense("head", "head") if spec.out_dim else [])


def _moved(rules: list[Rule], ours: str, theirs: str) -> list[Rule]:
  return [r._replace(path=join_path(ours, r.path), name=theirs + r.name) for r in rules]


def siglip_rules(model: DualEncoder) -> list[Rule]:
  """Rules between a SigLIP-shaped `DualEncoder` and big_vision two-tower keys."""
  (vpath, image), (tpath, text) = siglip.towers(model)
  scalar = lambda a: a.reshape(())  # noqa: E731 ((1,) -> ())
  return [*_moved(vit_rules(image.spec), vpath, IMG), *_moved(text_rules(text.spec), tpath, TXT),
          Rule("log_scale", "t", scalar, None), Rule("bias", "b", scalar, None)]


def rules_for(module: nnx.Module, tensors: Mapping[str, Any]) -> tuple[list[Rule], dict[str, Any]]:
  """(rules, the tensors they read) to import a big_vision checkpoint into `module`.

  A ViT or text tower takes its tower of a two-tower checkpoint ("img/" / "txt/"); the other
  tower's tensors are then not part of the comparison.
  """
  two_towers = any(k.startswith((IMG, TXT)) for k in tensors)
  if isinstance(module, DualEncoder):
    return siglip_rules(module), dict(tensors)
  if isinstance(module, ViT):
    return vit_rules(module.spec), subtree(tensors, IMG) if two_towers else dict(tensors)
  if isinstance(module, ClipTextEncoder):
    if not two_towers:
      raise ValueError("a big_vision text tower comes from a two-tower checkpoint (keys under 'txt/')")
    return text_rules(module.spec), subtree(tensors, TXT)
  raise ValueError(f"a big_vision .npz loads into a ViT, a clip_text encoder or a SigLIP "
                   f"DualEncoder, not a {type(module).__name__}")


def _need(tensors: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
  if key not in tensors:
    raise ValueError(f"not a big_vision {what} checkpoint: no {key!r} among its keys "
                     f"{sorted(tensors)[:8]}...")
  return tuple(tensors[key].shape)


def _depth(tensors: Mapping[str, Any], encoder: str) -> int:
  blocks = {int(m.group(1)) for k in tensors if (m := re.match(rf"{encoder}/encoderblock_(\d+)/", k))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ValueError(f"{encoder}: expected encoder blocks 0..n-1, got {sorted(blocks)}")
  return len(blocks)


def vit_fields(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """`ViTSpec` fields of a big_vision ViT checkpoint (keys without "img/"), from shapes alone.

  The image size comes from a square grid of learned positions; with "sincos2d" positions pass
  `image_size` to `load_vit`.
  """
  ph, pw, c, d = _need(tensors, "embedding/kernel", "ViT")
  block = "Transformer/encoderblock_0"
  heads = _need(tensors, f"{block}/MultiHeadDotProductAttention_0/query/kernel", "ViT")[1]
  mlp_dim = _need(tensors, f"{block}/MlpBlock_0/Dense_0/kernel", "ViT")[1]
  pool = "map" if "MAPHead_0/probe" in tensors else "cls" if "cls" in tensors else "gap"
  fields = dict(width=d, depth=_depth(tensors, "Transformer"), heads=heads, mlp_dim=mlp_dim,
                patch=(ph, pw), in_channels=c, pool=pool, pre_norm=False,
                patch_bias="embedding/bias" in tensors, pooler="pre_logits/kernel" in tensors,
                num_classes=tensors["head/kernel"].shape[1] if "head/kernel" in tensors else 0,
                posemb="learn" if "pos_embedding" in tensors else "sincos2d", **BV_DEFAULTS)
  if fields["posemb"] == "learn":
    n = tensors["pos_embedding"].shape[1]
    g = math.isqrt(n)
    if g * g != n:
      raise ValueError(f"pos_embedding: {n} positions are no square grid; pass image_size")
    fields["image_size"] = (g * ph, g * pw)
  return fields


def text_fields(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """`ClipTextSpec` fields of a big_vision text transformer (keys without "txt/"), from shapes alone."""
  vocab, d = _need(tensors, "Embed_0/embedding", "text transformer")
  block = "Encoder_0/encoderblock_0"
  return dict(
      vocab_size=vocab, hidden=d, depth=_depth(tensors, "Encoder_0"),
      heads=_need(tensors, f"{block}/MultiHeadDotProductAttention_0/query/kernel", "text")[1],
      mlp_dim=_need(tensors, f"{block}/MlpBlock_0/Dense_0/kernel", "text")[1],
      max_len=_need(tensors, "pos_embedding", "text transformer")[1], eos_id=None, causal=False,
      pool="last", out_dim=tensors["head/kernel"].shape[1] if "head/kernel" in tensors else 0,
      dropout=0.0, attn_dropout=0.0, **BV_DEFAULTS)


def _placed(model: nnx.Module) -> nnx.Module:
  nnx.update(model, jax.device_put(nnx.state(model, nnx.Not(nnx.RngKey))))  # numpy -> jax arrays
  return model


def load_vit(path: str | os.PathLike, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
             rngs: nnx.Rngs | None = None, **overrides) -> ViT:
  """Builds a `ViT` from a big_vision ViT `.npz` (or the image tower of a two-tower one) and imports.

  `overrides` are `ViTSpec` fields (dropout, image_size for sincos positions, ...); shape fields
  must match the weights.
  """
  tensors = read_npz(path)
  if any(k.startswith(IMG) for k in tensors):
    tensors = subtree(tensors, IMG)
  fields = {**vit_fields(tensors), **overrides}
  model = blank_module(lambda r: ViT(None, dtype=dtype, param_dtype=param_dtype, rngs=r, **fields),
                       rngs or nnx.Rngs(0))
  import_weights(model, tensors, vit_rules(model.spec))
  return _placed(model)


def load_siglip(path: str | os.PathLike, *, max_logit_scale: float | None = None,
                dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                rngs: nnx.Rngs | None = None) -> DualEncoder:
  """Builds a SigLIP `DualEncoder` from a big_vision two-tower `.npz` and imports (strict).

  The towers are as `mmjax.transfer.siglip.load_siglip` builds them (a ViT with the MAP head, a
  bidirectional text transformer pooled at the last position with its head, no projections).
  """
  tensors = read_npz(path)
  if not any(k.startswith(TXT) for k in tensors):
    raise ValueError(f"{os.fspath(path)!r}: no 'txt/' keys; not a big_vision two-tower checkpoint "
                     "(load a ViT with load_vit)")
  vision, text = vit_fields(subtree(tensors, IMG)), text_fields(subtree(tensors, TXT))
  model = blank_module(lambda r: siglip.build_siglip(vision, text, max_logit_scale=max_logit_scale,
                                                     dtype=dtype, param_dtype=param_dtype, rngs=r),
                       rngs or nnx.Rngs(0))
  import_weights(model, tensors, siglip_rules(model))
  return _placed(model)
