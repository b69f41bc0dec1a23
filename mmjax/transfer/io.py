"""Safetensors in and out of NNX modules through explicit name maps; pickle is never loaded.

A converter for one architecture is a list of `Rule`s: an mmjax parameter path ("a.b.0.kernel"),
the tensor name in the foreign (HF) layout, and the two transforms between them. `import_weights`
checks every name and shape before assigning anything, and reports all problems at once.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy")


class WeightMismatchError(ValueError):
  """Raised when foreign tensors do not match a module: lists missing, unexpected, mis-shaped."""


class Rule(NamedTuple):
  """One parameter: mmjax path, foreign name, foreign->mmjax and mmjax->foreign transforms."""

  path: str
  name: str
  to_mmjax: Callable[[np.ndarray], np.ndarray] = lambda a: a
  to_foreign: Callable[[np.ndarray], np.ndarray] = lambda a: a


def linear_rule(path: str, name: str) -> list[Rule]:
  """torch Linear (out, in) weight + bias <-> nnx.Linear kernel (in, out) + bias."""
  return [Rule(f"{path}.kernel", f"{name}.weight", lambda a: a.T, lambda a: a.T),
          Rule(f"{path}.bias", f"{name}.bias")]


def layer_norm_rule(path: str, name: str) -> list[Rule]:
  return [Rule(f"{path}.scale", f"{name}.weight"), Rule(f"{path}.bias", f"{name}.bias")]


def encoder_layer_rules(ours: str, hf: str, *, qkv: str, attn_norm: str, mlp_norm: str) -> list[Rule]:
  """One `mmjax.layers.EncoderBlock` at `ours` <-> an HF BERT-style layer at `hf`.

  HF BERT and ViT share the attention output / intermediate / output dense names and differ in
  where q/k/v live (`qkv`) and in their LayerNorm names (full names, given by the caller).
  """
  rules = []
  for proj in ("query", "key", "value"):
    rules += linear_rule(f"{ours}.attn.{proj}", f"{qkv}.{proj}")
  rules += linear_rule(f"{ours}.attn.out", f"{hf}.attention.output.dense")
  rules += layer_norm_rule(f"{ours}.attn_norm", attn_norm)
  rules += linear_rule(f"{ours}.mlp.fc1", f"{hf}.intermediate.dense")
  rules += linear_rule(f"{ours}.mlp.fc2", f"{hf}.output.dense")
  rules += layer_norm_rule(f"{ours}.mlp_norm", mlp_norm)
  return rules


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (or the model.safetensors in a folder); refuses pickle formats."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(f"refusing to load {path!r}: pickle-based weight files can run code; "
                     "convert it to .safetensors first")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  with open(path, "rb") as f:
    head = f.read(2)
  if head[:1] == b"\x80" or head == b"PK":
    raise ValueError(f"refusing to load {path!r}: it is a pickle/zip archive, not safetensors")
  return load_file(path)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, os.fspath(path))


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      out[".".join(str(p) for p in path)] = var
  return out


def import_weights(model: nnx.Module, tensors: dict[str, np.ndarray], rules: Sequence[Rule], *,
                   strict: bool = True, ignore: Sequence[str] = ()) -> None:
  """Assigns `tensors` into `model` in place following `rules`.

  With `strict`, foreign tensors that no rule uses (except names in `ignore`) and module
  parameters that no rule fills are errors. All mismatches are collected into one
  `WeightMismatchError`; nothing is assigned unless everything matches.
  """
  params = _flat_params(model)
  missing, misshaped, unknown_path = [], [], []
  staged = []
  for r in rules:
    if r.path not in params:
      unknown_path.append(r.path)
      continue
    if r.name not in tensors:
      missing.append(r.name)
      continue
    value = np.asarray(r.to_mmjax(np.asarray(tensors[r.name])))
    want = tuple(params[r.path][...].shape)
    if value.shape != want:
      misshaped.append(f"{r.name}: got {value.shape}, {r.path} needs {want}")
      continue
    staged.append((params[r.path], value))
  used = {r.name for r in rules}
  unexpected = sorted(k for k in tensors if k not in used and k not in ignore) if strict else []
  unfilled = sorted(set(params) - {r.path for r in rules}) if strict else []
  problems = []
  for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                       ("mis-shaped tensors", misshaped), ("rules naming no parameter", unknown_path),
                       ("parameters no tensor fills", unfilled)):
    if items:
      problems.append(f"{title} ({len(items)}): " + ", ".join(items))
  if problems:
    raise WeightMismatchError("weights do not match the model:\n  " + "\n  ".join(problems))
  for var, value in staged:
    var[...] = value.astype(var[...].dtype)


def export_weights(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """The inverse of `import_weights`: foreign-layout tensors from the module's parameters."""
  params = _flat_params(model)
  # order="C" keeps 0-d tensors (CLIP's logit_scale) 0-d, unlike np.ascontiguousarray.
  return {r.name: np.asarray(r.to_foreign(np.asarray(params[r.path][...])), order="C")
          for r in rules}
