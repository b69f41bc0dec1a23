"""Safetensors in and out of NNX modules through explicit name maps; pickle is never loaded.

A converter for one architecture is a list of `Rule`s: an mmjax parameter path ("a.b.0.kernel"),
the tensor name in the foreign (HF) layout, and the two transforms between them. `match_rules`
checks every name and shape (from shapes alone), and reports all problems at once;
`import_weights` assigns into a module after that check. `open_safetensors` / `open_npz` give
`LazyTensor`s: header-only views whose data is read one tensor at a time (`mmjax.transfer.model_init`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy")
# HF BertModel's and ViTModel's pooler (dense + tanh).
HF_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


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


def skipped_pooler(has_pooler: bool, tensors: Mapping[str, Any]) -> tuple[str, ...]:
  """HF pooler names a module without a pooler leaves unread (logged when the checkpoint has them):
  bert-base-uncased and ViT-in21k ship one that an encoder of tokens has no use for."""
  if has_pooler:
    return ()
  found = [n for n in HF_POOLER if n in tensors]
  if found:
    logging.getLogger(__name__).info("not loading the checkpoint's pooler (%s): the module has none",
                                     ", ".join(found))
  return HF_POOLER


def _checked_safetensors_path(path: str | os.PathLike) -> str:
  """The .safetensors file of `path` (a file, or a folder's model.safetensors); refuses pickles."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(f"refusing to load {path!r}: pickle-based weight files can run code; "
                     "convert it to .safetensors first")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  with open(path, "rb") as f:
    head = f.read(9)
  # A safetensors file starts with its JSON header's length and the header's "{"; only then are
  # the first bytes not taken for a pickle's or a zip archive's (the length can start with either).
  n = int.from_bytes(head[:8], "little")
  if len(head) == 9 and head[8:] == b"{" and n <= os.path.getsize(path) - 8:
    return path
  if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
    raise ValueError(f"refusing to load {path!r}: it is a pickle/zip archive, not safetensors")
  raise ValueError(f"{path!r} is not a safetensors file (no JSON header after the length)")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (or the model.safetensors in a folder); refuses pickle formats."""
  return load_file(_checked_safetensors_path(path))


class LazyTensor:
  """One tensor of a weights file: `shape` and `dtype` from its header, data read by `read()`.

  `span` = (file, byte offset) when the data lie uncompressed in C order in a file: `row(i)` then
  reads only row i (a scanned checkpoint's layer i). Otherwise (a compressed member) the first row
  read reads the whole tensor once for all its rows, freed when each row has been read.
  """

  def __init__(self, shape: tuple[int, ...], dtype: np.dtype, reader: Callable[[], np.ndarray],
               where: str = "", span: tuple[str, int] | None = None):
    self.shape, self.dtype, self._reader, self.where = tuple(shape), np.dtype(dtype), reader, where
    self.span = span
    self._rows, self._unread = None, set()  # the whole tensor while rows of it remain unread

  def _row(self, i: int) -> np.ndarray:
    """Row i of the tensor, read whole once for all rows (decompressing per row is quadratic)."""
    if self._rows is None:
      self._rows, self._unread = self.read(), set(range(self.shape[0]))
    row = np.array(self._rows[i])  # a copy: a view would keep the whole tensor alive
    self._unread.discard(i)
    if not self._unread:
      self._rows = None
    return row

  def row(self, i: int) -> LazyTensor:
    """The tensor's row `i` (shape[1:]), as a `LazyTensor`."""
    shape, where = self.shape[1:], f"{self.where}[{i}]"
    if self.span is None:
      return LazyTensor(shape, self.dtype, lambda: self._row(i), where)
    path, offset = self.span
    count = int(np.prod(shape, dtype=np.int64))
    offset += i * count * self.dtype.itemsize
    def read():
      return np.fromfile(path, dtype=self.dtype, count=count, offset=offset).reshape(shape)
    return LazyTensor(shape, self.dtype, read, where, (path, offset))

  def read(self) -> np.ndarray:
    out = self._reader()
    if out.shape != self.shape or out.dtype != self.dtype:
      raise ValueError(f"{self.where}: read {out.dtype}{out.shape}, the header said "
                       f"{self.dtype}{self.shape}")
    return out

  def __repr__(self) -> str:
    return f"LazyTensor({self.dtype}{list(self.shape)} in {self.where})"


# safetensors' dtype names (the format section of the safetensors README); F8_E4M3 is torch's
# float8_e4m3fn. Packed sub-byte types (F4, F6_*) have no numpy dtype.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "F8_E8M0": ml_dtypes.float8_e8m0fnu, "C64": np.complex64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
              "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def _unreadable(message: str) -> Callable[[], np.ndarray]:
  def read():
    raise ValueError(message)
  return read


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
  """Name -> `LazyTensor` of a .safetensors file (or a folder's model.safetensors), from its header.

  Each `read()` is a plain file read of that tensor's bytes into fresh memory, freed with the
  array: unlike a memory map of the whole file (safetensors' `safe_open`), whose touched pages stay
  in the process' resident memory while it is open, reading a checkpoint tensor by tensor then
  holds one tensor at a time.
  """
  path = _checked_safetensors_path(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
      raise ValueError(f"{path!r}: not a safetensors file (header length {n}, file size {size})")
    header = json.loads(f.read(n))
  start = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    shape = tuple(int(d) for d in info["shape"])
    if info.get("dtype") not in _ST_DTYPES:  # an error when read: the other tensors stay readable
      message = (f"{path!r}: tensor {name!r} has dtype {info.get('dtype')!r}, which mmjax cannot "
                 f"read; supported: {sorted(_ST_DTYPES)}")
      out[name] = LazyTensor(shape, "V1", _unreadable(message), f"{path}:{name}")  # opaque bytes
      continue
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    lo, hi = (int(o) for o in info["data_offsets"])
    count = int(np.prod(shape, dtype=np.int64))
    if hi - lo != count * dtype.itemsize or start + hi > size:
      raise ValueError(f"{path!r}: tensor {name!r} ({info['dtype']}{list(shape)}) has data offsets "
                       f"{[lo, hi]} that do not fit it or the file")
    read = (lambda o=start + lo, d=dtype, c=count, s=shape:
            np.fromfile(path, dtype=d, count=c, offset=o).reshape(s))
    out[name] = LazyTensor(shape, dtype, read, f"{path}:{name}", (path, start + lo))
  return out


def _stored_offset(path: str, info: zipfile.ZipInfo) -> int | None:
  """Byte offset of an uncompressed zip member's data in the archive, None when compressed."""
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header; its name and extra field lengths end it
  name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
  return info.header_offset + 30 + name_len + extra_len


def open_npz(path: str | os.PathLike) -> dict[str, LazyTensor]:
  """Key -> `LazyTensor` of an .npz archive, from each member's .npy header.

  Only numeric arrays are read (`allow_pickle=False`): a file that is not a zip archive, or a member
  holding Python objects, is refused with an error naming it before any data is read.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"refusing to load {path!r}: not an .npz (zip) archive of arrays; pickled "
                     "files can run code and are never loaded")
  npz = np.load(path, allow_pickle=False)  # members are read on access, one at a time
  out = {}
  for info in npz.zip.infolist():
    if not info.filename.endswith(".npy"):
      continue
    key = info.filename[:-len(".npy")]
    with npz.zip.open(info) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      header_len = f.tell()
    if dtype.hasobject:
      raise ValueError(f"refusing to load {path!r}: array {key!r} holds Python objects (dtype "
                       f"{dtype}), which only unpickling can read; save plain numeric arrays")
    start = _stored_offset(path, info)
    span = None if start is None or fortran else (path, start + header_len)
    out[key] = LazyTensor(shape, dtype, lambda k=key: npz[k], f"{path}:{key}", span)
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, os.fspath(path))


def open_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, LazyTensor]]:
  """(config.json, name -> `LazyTensor`) of an HF folder (model.safetensors, or the shards of a
  model.safetensors.index.json) or of a .safetensors file with config.json beside it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    folder = path
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(os.path.join(path, "model.safetensors")):
      files = [os.path.join(path, "model.safetensors")]
    elif os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index!r}: no 'weight_map' object (tensor name -> shard file)")
      files = [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    else:
      pickled = [n for n in sorted(os.listdir(path)) if n.endswith(PICKLE_SUFFIXES)]
      if pickled:
        raise ValueError(f"refusing to load {os.path.join(path, pickled[0])!r}: pickle-based weight "
                         "files can run code; convert it to .safetensors first")
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
  else:
    folder, files = os.path.dirname(path) or ".", [path]
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {folder!r}: it names the architecture")
  with open(cfg_path) as f:
    cfg = json.load(f)
  tensors, found_in = {}, {}
  for file in files:
    for name, t in open_safetensors(file).items():
      if name in found_in:  # which copy is meant is unknowable: refuse rather than pick one
        raise ValueError(f"tensor {name!r} is in two shards, {found_in[name]!r} and {file!r}")
      tensors[name], found_in[name] = t, file
  return cfg, tensors


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, name -> array) of an HF checkpoint (`open_hf_checkpoint`), every tensor read."""
  cfg, tensors = open_hf_checkpoint(path)
  return cfg, {name: t.read() for name, t in tensors.items()}


def write_hf_folder(folder: str | os.PathLike, cfg: dict[str, Any],
                    tensors: dict[str, np.ndarray]) -> None:
  """Writes `folder`/model.safetensors and config.json, the layout `transformers` reads."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def join_path(prefix: str, path: str) -> str:
  """Dotted `prefix`.`path`; an empty prefix (the module itself) adds nothing."""
  return f"{prefix}.{path}" if prefix else path


def find_modules(model: nnx.Module, cls: type) -> list[tuple[str, nnx.Module]]:
  """(dotted path, module) of every `cls` instance in `model` ("" for `model` itself), in graph order."""
  return [(".".join(str(k) for k in p), node) for p, node in nnx.iter_graph(model)
          if isinstance(node, cls)]


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      out[".".join(str(p) for p in path)] = var
  return out


def _shape_dtype(t: Any) -> tuple[tuple[int, ...], np.dtype]:
  if isinstance(t, (np.ndarray, LazyTensor)):
    return tuple(t.shape), t.dtype
  a = np.asarray(t)
  return a.shape, a.dtype


def transformed_shape(rule: Rule, shape: tuple[int, ...], dtype: Any = np.float32) -> tuple[int, ...]:
  """The shape `rule.to_mmjax` gives a tensor of `shape`, computed on a zero-stride stub (no data)."""
  stub = np.broadcast_to(np.zeros((), dtype), shape)
  return tuple(np.shape(rule.to_mmjax(stub)))


def match_rules(params: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any],
                rules: Sequence[Rule], *, strict: bool = True,
                ignore: Sequence[str] = ()) -> list[tuple[Rule, Any]]:
  """Checks `rules` between parameter shapes (path -> shape) and `tensors` (name -> array or
  `LazyTensor`) from shapes alone; returns the (rule, tensor) pairs to assign.

  With `strict`, tensors that no rule uses (except names in `ignore`) and parameters that no rule
  fills are errors. All problems are collected into one `WeightMismatchError`.
  """
  missing, misshaped, unknown_path, pairs = [], [], [], []
  for r in rules:
    if r.path not in params:
      unknown_path.append(r.path)
      continue
    if r.name not in tensors:
      missing.append(r.name)
      continue
    shape, dtype = _shape_dtype(tensors[r.name])
    want = tuple(params[r.path])
    try:
      got = transformed_shape(r, shape, dtype)
    except (ValueError, IndexError) as e:  # e.g. a reshape the tensor's shape does not allow
      misshaped.append(f"{r.name}: got {shape}, which {r.path} {want} cannot be made from ({e})")
      continue
    if got != want:
      stored = f" (stored {shape})" if got != shape else ""
      misshaped.append(f"{r.name}: got {got}{stored}, {r.path} needs {want}")
      continue
    pairs.append((r, tensors[r.name]))
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
  return pairs


def import_weights(model: nnx.Module, tensors: Mapping[str, Any], rules: Sequence[Rule], *,
                   strict: bool = True, ignore: Sequence[str] = ()) -> None:
  """Assigns `tensors` (arrays or `LazyTensor`s) into `model` in place following `rules`.

  With `strict`, foreign tensors that no rule uses (except names in `ignore`) and module
  parameters that no rule fills are errors. All mismatches are collected into one
  `WeightMismatchError`; nothing is assigned unless everything matches.
  """
  params = _flat_params(model)
  shapes = {p: tuple(v[...].shape) for p, v in params.items()}
  for r, t in match_rules(shapes, tensors, rules, strict=strict, ignore=ignore):
    value = t.read() if isinstance(t, LazyTensor) else np.asarray(t)
    var = params[r.path]
    var[...] = np.asarray(r.to_mmjax(value)).astype(var[...].dtype)


def export_weights(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """The inverse of `import_weights`: foreign-layout tensors from the module's parameters."""
  params = _flat_params(model)
  # order="C" keeps 0-d tensors (CLIP's logit_scale) 0-d, unlike np.ascontiguousarray.
  return {r.name: np.asarray(r.to_foreign(np.asarray(params[r.path][...])), order="C")
          for r in rules}
