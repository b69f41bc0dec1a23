"""`config.model_init`: pretrained weights into parts of a model, each tensor placed straight onto
its sharding.

    config.model_init = {"encoders/text": "minilm", "encoders/image": "/ckpt/vit-b16-hf"}
    config.model_init = "/ckpt/siglip-base-patch16-224"  # the whole model: {"": ...}

Keys are module paths in the model, "/"-joined as in parameter paths and LoRA patterns
("encoders/text"; ml_collections refuses dots in keys, which are accepted elsewhere); "" is the
model itself, and a plain string stands for {"": it}. Values are:
  - a folder in the Hugging Face layout: config.json + model.safetensors, or a sharded
    model.safetensors.index.json (a .safetensors file with config.json beside it also works).
    config.json's model_type picks the importer: "bert" (MiniLM too) into a `BertEncoder`; "vit"
    into a `ViT`; "clip" / "siglip" into a `DualEncoder`, or one of their towers into a `ViT` /
    `ClipTextEncoder` ("clip_vision_model", "siglip_text_model", ... name a lone tower);
  - a big_vision `.npz` (`mmjax.transfer.big_vision`): a ViT into a `ViT`, SigLIP's two towers
    into a `DualEncoder`, or one tower of them into a `ViT` / `ClipTextEncoder`;
  - "minilm": all-MiniLM-L6-v2 as shipped by the `minilm` extra, into a `BertEncoder`.
A module wrapped by LoRA takes the weights into its base layers; the adapters keep their values.
Settings no tensor shows are checked too: the activation and LayerNorm eps against config.json
(against big_vision's for an .npz) and a ViT's patch grid. A module without a pooler leaves a BERT
or ViT checkpoint's pooler unread (logged), as a headless ViT leaves a classifier.

`load_model_init` takes the params of the model as they are (placed arrays, or abstract
`jax.ShapeDtypeStruct`s with a sharding) and returns them with every imported parameter replaced.
Nothing goes through `jax.jit`: each checkpoint tensor is read alone (a plain file read, see
`mmjax.transfer.io.open_safetensors`), converted on the host and handed to
`jax.make_array_from_callback`, which copies each device of this process its shard. Host memory
thus holds this process' shards plus one tensor at a time, and the weights never become constants
of a compiled program. Every name and shape is checked for every entry before any tensor is read;
problems raise one `WeightMismatchError` per entry listing all of them (unused checkpoint tensors
too).

What each host reads: every tensor in full, one at a time, whatever its devices hold; on a pod
every host reads the whole checkpoint. Reading only a host's slices would save little under the
default FSDP rules: they split the input axis of the q/k/v, fc1 and fc2 kernels, the trailing axis
of the stored torch (out, in) weights, so every stored row holds part of every host's slice (for
ViT-L/16 on 8 one-device hosts, the file pages under one host's slices are 94% of the file). The
cost is time, the file size over one host's read bandwidth (all hosts read in parallel), and host
memory for the largest tensor (twice it when converted to another dtype): seconds and tens to
hundreds of MB for the zoo's encoders, fine for checkpoints up to a few GB.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from mmjax.encoders.text import BertEncoder, ClipTextEncoder
from mmjax.encoders.vision import ViT
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer import big_vision, bert, clip, siglip, vit
from mmjax.transfer.io import (LazyTensor, Rule, WeightMismatchError, join_path,
                               match_rules, open_hf_checkpoint)
from mmjax.transfer.lora import LoRADense

MINILM = "minilm"
HF_TYPES = ("bert", "vit", "clip", "siglip", "clip_vision_model", "clip_text_model",
            "siglip_vision_model", "siglip_text_model")


# -- sources -------------------------------------------------------------------------------------
def _only(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The tensors under `prefix` (one tower of a two-tower checkpoint), names kept."""
  return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _strip_dots(rules: list[Rule]) -> list[Rule]:
  """CLIP's tower rules built with `ours=""` start with "."; relative paths have none."""
  return [r._replace(path=r.path.lstrip(".")) for r in rules]


def _check_settings(where: str, module: nnx.Module, want: Mapping[str, Any]) -> None:
  """Raises unless the module's activation and LayerNorm eps (and a ViT's patch grid) are the
  checkpoint's: shapes alone do not show them, and a mismatch changes every output."""
  bad = [f"{k}: module {getattr(module.spec, k)!r}, checkpoint {v!r}" for k, v in want.items()
         if k in ("act", "ln_eps") and getattr(module.spec, k) != v]
  if isinstance(module, ViT) and "image_size" in want:  # mmjax does not interpolate positions
    bad += filter(None, [vit.grid_problem(module.spec, want["image_size"], want["patch"])])
  if bad:
    raise ValueError(f"{where}: the {type(module).__name__} is not built like the checkpoint ("
                     + "; ".join(bad) + "); set these in its encoder spec")


def _hf_plan(where: str, module: nnx.Module, cfg: dict[str, Any],
             tensors: dict[str, LazyTensor]) -> tuple[list[Rule], dict[str, Any], tuple[str, ...]]:
  """(rules relative to `module`, the tensors they read, ignored names) for an HF checkpoint."""
  kind = cfg.get("model_type")
  if kind not in HF_TYPES:
    raise ValueError(f"{where}: config.json model_type {kind!r} is not supported; known: {HF_TYPES}")
  family = kind.split("_")[0]  # bert / vit / clip / siglip
  if family in ("bert", "vit"):
    targets = (BertEncoder,) if family == "bert" else (ViT,)
  elif kind != family:  # a lone tower: clip_vision_model, siglip_text_model, ...
    targets = (ViT,) if kind.endswith("_vision_model") else (ClipTextEncoder,)
  else:
    targets = (DualEncoder, ViT, ClipTextEncoder)
  if not isinstance(module, targets):
    raise ValueError(f"{where}: a {kind!r} checkpoint loads into a "
                     f"{' or '.join(t.__name__ for t in targets)}, not a {type(module).__name__}")
  if family == "bert":
    _check_settings(where, module, bert.spec_from_hf_config(cfg))
    rules = bert.bert_rules(module.spec.depth, module.spec.pooler)
    tensors = bert.normalize_names(tensors)
    return rules, tensors, bert.ignored(module.spec, tensors)
  if family == "vit":
    _check_settings(where, module, vit.spec_from_hf_config(cfg, tensors))
    try:
      rules = vit.vit_rules(module.spec)  # raises for options HF ViT lacks (a pre-norm, ...)
      tensors = vit.checkpoint_names(module.spec, tensors)  # and for a head with no classifier
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return rules, tensors, vit.ignored(module.spec, tensors)
  lib = clip if family == "clip" else siglip
  lone = {("vision_config" if targets == (ViT,) else "text_config"): cfg}
  vision, text = lib.spec_from_hf_config(cfg if kind == family else lone)[:2]
  if isinstance(module, DualEncoder):
    _check_settings(f"{where} (image tower)", _tower(module, ViT), vision)
    _check_settings(f"{where} (text tower)", _tower(module, ClipTextEncoder), text)
    rules = clip.clip_rules(module) if family == "clip" else siglip.siglip_rules(module)
    return rules, tensors, lib.BUFFERS
  if isinstance(module, ViT):
    _check_settings(where, module, vision)
    return (_strip_dots(lib.vision_rules(module.spec, "", "vision_model")),
            _only(tensors, "vision_model."), lib.BUFFERS)
  _check_settings(where, module, text)
  return (_strip_dots(lib.text_rules(module.spec, "", "text_model")), _only(tensors, "text_model."),
          lib.BUFFERS)


def _tower(model: nnx.Module, cls: type) -> nnx.Module:
  found = [n for _, n in nnx.iter_graph(model) if isinstance(n, cls)]
  if len(found) != 1:
    raise ValueError(f"expected one {cls.__name__} tower in the {type(model).__name__}, found {len(found)}")
  return found[0]


def plan(where: str, module: nnx.Module, source: str) -> tuple[list[Rule], dict[str, Any], tuple[str, ...]]:
  """(rules relative to `module`, tensors, ignored names) for one `model_init` entry."""
  if not isinstance(source, (str, os.PathLike)) or not str(source):
    raise TypeError(f"{where}: expected a folder, a .npz file or {MINILM!r}, got {source!r}")
  source = os.fspath(source)
  if source == MINILM:
    from mmjax.transfer import minilm  # noqa: PLC0415 (optional dependency)
    source = minilm.minilm_path()
  path = os.path.expanduser(source)
  if path.endswith(".npz"):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{where}: no file {path!r}")
    try:
      rules, tensors = big_vision.rules_for(module, big_vision.read_npz(path))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    # big_vision's settings, which its files do not record (as config.json does for HF folders).
    towers = [("", module)]
    if isinstance(module, DualEncoder):
      towers = [(" (image tower)", _tower(module, ViT)), (" (text tower)", _tower(module, ClipTextEncoder))]
    for suffix, tower in towers:
      _check_settings(where + suffix, tower, big_vision.BV_DEFAULTS)
    return rules, tensors, ()
  if not os.path.exists(path):
    raise FileNotFoundError(f"{where}: no such folder or file {path!r} (expected an HF folder, a "
                            f"big_vision .npz or {MINILM!r})")
  cfg, tensors = open_hf_checkpoint(path)
  return _hf_plan(where, module, cfg, tensors)


# -- the params tree -----------------------------------------------------------------------------
def _key(k) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None if k.name == "value" else k.name  # an nnx.Variable's value
  return str(getattr(k, "key", getattr(k, "idx", k)))


def _flat_paths(params: Any) -> tuple[list[str], list[Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [".".join(s for s in map(_key, kp) if s is not None) for kp, _ in leaves]
  return paths, [leaf for _, leaf in leaves], treedef


def _under(path: str, prefix: str) -> bool:
  return not prefix or path == prefix or path.startswith(prefix + ".")


def _place(value: np.ndarray, leaf: Any, path: str) -> jax.Array:
  """`value` as a global array with `leaf`'s dtype and sharding, each device given its slice."""
  sharding = getattr(leaf, "sharding", None)
  if sharding is None and isinstance(leaf, np.ndarray):  # a module not placed yet
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if sharding is None:
    raise ValueError(f"params: {path} has no sharding; pass placed arrays or "
                     "jax.ShapeDtypeStruct(shape, dtype, sharding=...)")
  value = np.asarray(value).astype(leaf.dtype, copy=False)
  return jax.make_array_from_callback(tuple(leaf.shape), sharding, lambda idx: value[idx])


def _normalized(model_init: Any) -> dict[str, Any]:
  if isinstance(model_init, (str, os.PathLike)):
    return {"": model_init}
  if hasattr(model_init, "to_dict"):  # an ml_collections.ConfigDict
    model_init = model_init.to_dict()
  if not isinstance(model_init, Mapping):
    raise TypeError(f"model_init: expected a source or a dict of module path -> source, got "
                    f"{type(model_init).__name__}")
  return dict(model_init)


def _stage(model_init: Mapping[str, Any], model: nnx.Module,
           shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[Rule, Any]]:
  """Every entry planned and checked against the parameter shapes: the (rule, tensor) pairs."""
  modules = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
  # LoRA: a wrapped layer's kernel and bias live under `base`; its adapters are nobody's weights.
  redirect, adapters = {}, set()
  for p, m in modules.items():
    if isinstance(m, LoRADense):
      for name in ("kernel", "bias"):
        redirect[join_path(p, name)] = join_path(p, f"base.{name}")
      adapters |= {join_path(p, "lora_a"), join_path(p, "lora_b")}
  staged, owner = [], {}
  for key, source in model_init.items():
    target = str(key).replace("/", ".")
    where = f"model_init[{key!r}] ({source})"
    if target not in modules:
      near = sorted(p for p in modules if p.count(".") <= target.count(".") + 1 and p)[:20]
      raise ValueError(f"model_init: no module at {key!r} in the model; modules include "
                       f"{[p.replace('.', '/') for p in near]}")
    rules, tensors, ignore = plan(where, modules[target], source)
    rules = [r._replace(path=redirect.get(join_path(target, r.path), join_path(target, r.path)))
             for r in rules]
    sub = {p: s for p, s in shapes.items() if _under(p, target) and p not in adapters}
    try:
      pairs = match_rules(sub, tensors, rules, ignore=ignore)
    except WeightMismatchError as e:
      raise WeightMismatchError(f"{where}: {e}") from None
    for r, _ in pairs:
      if owner.setdefault(r.path, key) != key:
        raise ValueError(f"model_init: {r.path} is filled by both {owner[r.path]!r} and {key!r}")
    staged += pairs
  return staged


def check_model_init(model_init: Any, model: nnx.Module) -> int:
  """Checks every entry of `model_init` against `model` (abstract is fine) from the checkpoints'
  headers alone, raising as `load_model_init` would; returns the number of parameters it fills."""
  if not model_init:
    return 0
  paths, leaves, _ = _flat_paths(nnx.state(model, nnx.Param))
  return len(_stage(_normalized(model_init), model, {p: tuple(v.shape) for p, v in zip(paths, leaves)}))


def load_model_init(model_init: Any, model: nnx.Module, params: Any) -> Any:
  """`params` with the parameters named by `model_init` replaced by the pretrained weights.

  Args:
    model_init: module path in `model` -> source, or a source for the whole model (see the
      module docstring); empty: no change.
    model: the model, or its abstract form (`nnx.eval_shape(ctor)`): which module sits where, and
      the specs the name maps are built from.
    params: the model's parameters, as `nnx.split(model, nnx.Param, ...)` gives them (its
      `nnx.State`, or any tree with the same paths), each leaf a placed `jax.Array` or a
      `jax.ShapeDtypeStruct` with a sharding. Hand it over without keeping a reference (e.g.
      `state.pop("params")`): each replaced array is then freed as its replacement is placed.

  Returns:
    The same tree, imported leaves replaced by arrays in the leaf's dtype and sharding; the other
    leaves are returned as they were.

  Raises:
    WeightMismatchError: an entry's tensors do not fit its module (all names and shapes listed).
    ValueError / FileNotFoundError: an unknown module path, source or architecture.
  """
  if not model_init:
    return params
  model_init = _normalized(model_init)
  paths, leaves, treedef = _flat_paths(params)
  del params  # each replaced array is freed as its replacement arrives, unless the caller holds it
  index = {p: i for i, p in enumerate(paths)}
  staged = _stage(model_init, model, {p: tuple(leaves[i].shape) for p, i in index.items()})
  last = (None, None)  # the tensor read last: SigLIP's stacked q/k/v feed three parameters
  for r, t in staged:
    if last[0] is not t:
      last = (t, t.read() if isinstance(t, LazyTensor) else np.asarray(t))
    i = index[r.path]
    leaves[i] = _place(r.to_mmjax(last[1]), leaves[i], r.path)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def apply_model_init(model: nnx.Module, model_init: Mapping[str, Any] | None) -> nnx.Module:
  """Loads `model_init` into a live `model` in place (its parameters keep their shardings)."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, load_model_init(model_init, model, params))
  return model
