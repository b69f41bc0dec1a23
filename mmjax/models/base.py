"""What every task model shares: the `MODELS` registry, encoders built from specs, and
`build_model`, the one way a task turns `config.model` into a model.

The `config.model` schema, the same for every task (docs/configs.md):

  name      a registered model ("vqa", "dual_encoder", "classifier", "show_and_tell",
            "transformer_captioner") or "package.module:key" for one of your own;
  encoders  modality -> encoder spec {"name": registered encoder, **its kwargs}, keyed by the
            batch's input names ("image", "text", "audio");
  the rest  the model constructor's own arguments (fusion, fusion_kwargs, features, dtype, ...),
            passed as they are.

A model stores its encoders as `self.encoders` (an `nnx.Dict`), so parameter paths read
`encoders/<modality>/...` in every model (what optimizer groups, LoRA patterns and weight
importers match). Encoders are built, fused and (in a dual encoder) ordered in `MODALITY_ORDER`,
not in the dict's order: `ml_collections.ConfigDict` sorts its keys, and a model must not change
with where its dict came from.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from mmjax.encoders import ENCODERS, EncoderOutput
from mmjax.layers.common import Dtype
from mmjax.registry import Registry

MODELS = Registry("model", modules=("mmjax.models.captioner", "mmjax.models.classifier",
                                   "mmjax.models.dual_encoder", "mmjax.models.vqa"))

# Known modalities first in this order, any other name after them alphabetically.
MODALITY_ORDER = ("image", "video", "audio", "text")


def modality_order(names) -> tuple[str, ...]:
  """`names` in `MODALITY_ORDER`, unknown names after the known ones, alphabetically."""
  known = {m: i for i, m in enumerate(MODALITY_ORDER)}
  return tuple(sorted(names, key=lambda m: (known.get(m, len(known)), m)))


def build_encoder(spec: Mapping[str, Any], *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                  param_dtype: Dtype = jnp.float32) -> nnx.Module:
  """Builds an encoder from {'name': registered name, **constructor kwargs}.

  A registered encoder takes `rngs` and `dtype`, and gets the model's `param_dtype` where it takes
  one (a `param_dtype` in the spec wins); one that takes none is built in float32 only."""
  spec = dict(spec)
  if "name" not in spec:
    raise ValueError(f"encoder spec {spec}: needs a 'name' (one of {ENCODERS.names()})")
  name = spec.pop("name")
  builder = ENCODERS.get(name)
  params = inspect.signature(builder.__init__ if isinstance(builder, type) else builder).parameters
  if "param_dtype" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
    spec = {"param_dtype": param_dtype, **spec}
  elif jnp.dtype(param_dtype) != jnp.float32 and "param_dtype" not in spec:
    raise ValueError(f"encoder {name!r} takes no param_dtype: it cannot be built in the model's "
                     f"param_dtype {jnp.dtype(param_dtype).name}")
  return builder(rngs=rngs, dtype=dtype, **spec)


def make_encoder(spec: Mapping[str, Any] | nnx.Module, *, rngs: nnx.Rngs, dtype: Dtype,
                 param_dtype: Dtype = jnp.float32) -> nnx.Module:
  """An encoder module given as is, or built from a spec {'name': ..., **kwargs}."""
  if isinstance(spec, nnx.Module):
    return spec
  if not isinstance(spec, Mapping):
    raise TypeError(f"encoder spec: expected a dict {{'name': ..., **kwargs}} or an nnx.Module, "
                    f"got {type(spec).__name__}")
  return build_encoder(spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def make_encoders(encoders: Any, names: tuple[str, ...] | None, *, rngs: nnx.Rngs,
                  dtype: Dtype, param_dtype: Dtype = jnp.float32) -> nnx.Dict:
  """`encoders` (modality -> spec or module) built in `MODALITY_ORDER`, as an `nnx.Dict`, with the
  model's compute and parameter dtypes.

  `names`: the modalities the model needs exactly, or None for any non-empty set."""
  if not isinstance(encoders, Mapping) or not encoders:
    got = list(encoders) if isinstance(encoders, Mapping) else type(encoders).__name__
    raise ValueError(f"encoders: expected a non-empty dict of modality -> encoder spec, got {got}")
  if names is not None and set(encoders) != set(names):
    raise ValueError(f"encoders: expected one encoder spec per modality {list(names)}, got {list(encoders)}")
  return nnx.Dict({m: make_encoder(encoders[m], rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                   for m in modality_order(encoders)})


def encode(encoder: nnx.Module, args: Any, *, deterministic: bool = True) -> EncoderOutput:
  """Calls `encoder` on `args`: an array, a tuple of positional arguments, or a dict of keywords."""
  if isinstance(args, Mapping):
    out = encoder(**args, deterministic=deterministic)
  elif isinstance(args, (tuple, list)):
    out = encoder(*args, deterministic=deterministic)
  else:
    out = encoder(args, deterministic=deterministic)
  if not isinstance(out, EncoderOutput):
    raise TypeError(f"encoder output: expected EncoderOutput(tokens, mask, pooled), got {type(out).__name__}")
  return out


def encoder_dims(encoder: nnx.Module, example: Any) -> tuple[int, int]:
  """(token width, pooled width) of `encoder`, by abstract evaluation on `example` (no FLOPs).

  `example` is what `encode` takes, with `jax.ShapeDtypeStruct`s (or arrays) as leaves.
  """
  out = nnx.eval_shape(lambda m, a: encode(m, a), encoder, example)
  return int(out.tokens.shape[-1]), int(out.pooled.shape[-1])


def check_examples(examples: Any, names: tuple[str, ...], field: str = "input_examples") -> None:
  """Raises ValueError unless `examples` is a dict with exactly the keys `names`."""
  if not isinstance(examples, Mapping) or set(examples) != set(names):
    got = list(examples) if isinstance(examples, Mapping) else type(examples).__name__
    raise ValueError(f"{field}: expected a dict with one example input per name {list(names)}, got {got}")


def _arguments(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
  """The named arguments of `cls(...)`, following `**kwargs` up the MRO to the parents'
  constructors, and whether it also takes keywords no signature names."""
  out: dict[str, inspect.Parameter] = {}
  for klass in cls.__mro__:
    if "__init__" not in vars(klass):
      continue
    params = inspect.signature(vars(klass)["__init__"]).parameters
    for p in list(params.values())[1:]:  # past self
      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
        out.setdefault(p.name, p)
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
      return out, False
  return out, True


def build_model(model: Mapping[str, Any], *, rngs: nnx.Rngs, base: type | tuple[type, ...] | None = None,
                fill: Mapping[str, Any] | None = None, **data) -> nnx.Module:
  """`MODELS[model.name](**model, **data, rngs=rngs)`: how every task builds its model.

  Args:
    model: `config.model` (see the module docstring); every key but "name" goes to the
      constructor unchanged: a key the constructor lacks is a TypeError naming `model.<key>`,
      a key left out takes the constructor's default.
    rngs: parameter and dropout keys.
    base: the model class (or classes) the task needs; a model of another kind is a TypeError.
    fill: data-derived encoder arguments, the one place a task fills in config values: an
      encoder spec's key named here whose value is 0 takes the value given, e.g.
      {"vocab_size": the task tokenizer's} for a text encoder's `vocab_size: 0`.
    **data: the constructor arguments the task's data gives (num_answers, vocab_size,
      image_shape, question_len, input_examples); the config may not set them.
  """
  model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
  if "name" not in model:
    raise ValueError(f"model.name: missing; expected a registered model (one of {MODELS.names()}) "
                     "or 'package.module:key'")
  name = model.pop("name")
  cls = MODELS.get(name)
  if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
    wanted = " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
    raise TypeError(f"model.name: {name!r} builds {getattr(cls, '__name__', cls)}; this task needs a "
                    f"{wanted}")
  clash = sorted(set(model) & set(data))
  if clash:
    raise ValueError(f"model.{clash[0]}: set by the task from its data; remove it from the config")
  if "encoders" in model and isinstance(model["encoders"], Mapping):
    model["encoders"] = {m: _fill(spec, fill or {}) for m, spec in model["encoders"].items()}
  if isinstance(cls, type):
    accepted, any_keyword = _arguments(cls)
    unknown = sorted(set(model) - set(accepted))
    if unknown and not any_keyword:
      raise TypeError(f"model.{unknown[0]}: {cls.__name__} has no argument {unknown[0]!r}; its "
                      f"arguments are {sorted(set(accepted) - {'rngs'})}")
    missing = sorted(k for k, p in accepted.items()
                     if p.default is p.empty and k not in model and k not in data and k != "rngs")
    if missing:
      raise TypeError(f"model.{missing[0]}: {cls.__name__} needs it; add it to config.model")
  return cls(**model, **data, rngs=rngs)


def _fill(spec: Any, fill: Mapping[str, Any]) -> Any:
  """`spec` with each key of `fill` whose value is 0 replaced by fill's value."""
  if not isinstance(spec, Mapping):
    return spec
  return {k: fill[k] if k in fill and isinstance(v, int) and not isinstance(v, bool) and v == 0 else v
          for k, v in spec.items()}
