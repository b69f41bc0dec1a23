"""The preprocessing-op registry and the pp-string parser (in the style of big_vision).

A pp string is a `|`-separated chain of op calls, each naming a registered op and passing literal
arguments, e.g. `image.decode|image.resize(64)|image.value_range(-1, 1)|text.tokenize(max_len=32)`.
Ops live in one namespace per modality (`image.`, `text.`, `audio.`, `mm.` for ops that touch
several modalities at once); a bare name such as `resize` resolves when exactly one namespace has
it. The field ops `keep`, `drop`, `copy` and `flatten` (nested TFDS dicts to `outer/inner` keys)
have no namespace, and so do `rename`, `cast` and `choice`. Arguments are parsed with
`ast.literal_eval`, never `eval`; what a string cannot spell (a task's tokenizer) is passed to
`parse` by name and reaches every op that takes an argument of that name and is not given it.

Every op is a factory: called with the parsed arguments it returns a function
`(example: dict, rng: np.random.Generator) -> dict` that runs in numpy on the host (inside Grain
workers) and returns a new dict, leaving its input untouched. Ops read the field named by their
`key=` argument and write the field named by `outkey=` (default: the same field).

A serving request is a record without labels: `Preprocess.partial` runs the same chain on it,
skipping the ops whose input fields it lacks (see `reads`).

Bad data (corrupt bytes, empty text, a missing or empty audio file) raises `BadExample`, a
ValueError whose message names the record (its `id`, `index` or `_index` field when present)
and the field. `parse(..., skip_bad=True)` turns those into `SkipExample`, which a pipeline can
catch to drop and count the example; a wrong pp string or a wrong field type always raises.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable

import numpy as np

from mmjax.registry import Registry

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

PP_OPS = Registry("pp op", modules=("mmjax.data.pp.audio", "mmjax.data.pp.image", "mmjax.data.pp.multimodal",
                                    "mmjax.data.pp.text"))
NAMESPACES = ("image", "text", "audio", "mm")
RECORD_ID_FIELDS = ("id", "index", "_index", "image_id", "question_id", "file_name")


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Decorator registering an op factory under `name` (e.g. "image.resize")."""
  return PP_OPS.register(name)


class BadExample(ValueError):
  """An example whose data an op cannot process; the message names the record and the field."""


class SkipExample(Exception):
  """Raised instead of `BadExample` under `parse(..., skip_bad=True)`: drop and count the example.

  Attributes:
    reason: the `BadExample` that caused the skip.
  """

  def __init__(self, reason: BadExample):
    super().__init__(str(reason))
    self.reason = reason


def record_name(example: Example) -> str:
  """How error messages name a record: by its first id-like field, else as 'record (no id)'."""
  for f in RECORD_ID_FIELDS:
    if f in example:
      v = example[f]
      if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
      if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        v = v.item()
      return f"record {f}={v!r}"
  return "record (no id)"


def bad(example: Example, field: str, message: str) -> BadExample:
  """A `BadExample` whose message names the record and field."""
  return BadExample(f"{record_name(example)}: field {field!r}: {message}")


def field(example: Example, key: str) -> Any:
  """`example[key]`, or a KeyError naming the record, the field and the fields present."""
  if key not in example:
    raise KeyError(f"{record_name(example)}: no field {key!r}; fields: {sorted(example)}")
  return example[key]


def reads(op: Op) -> tuple[str, ...]:
  """The fields `op` needs: its `reads()` when it defines one, else its `key` (and `text_keys`)."""
  if hasattr(op, "reads"):
    return tuple(op.reads())
  keys = [op.key] if isinstance(getattr(op, "key", None), str) else []
  text_keys = getattr(op, "text_keys", ())
  return tuple(keys) + ((text_keys,) if isinstance(text_keys, str) else tuple(text_keys))


class Preprocess:
  """A chain of pp ops run in order; picklable, so Grain can ship it to worker processes.

  Attributes:
    ops: the op functions.
    specs: the op strings they were parsed from.
    skip_bad: whether `BadExample` is re-raised as `SkipExample`.
  """

  def __init__(self, ops: list[Op], specs: list[str], skip_bad: bool = False):
    self.ops = ops
    self.specs = specs
    self.skip_bad = skip_bad

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return self._run(example, rng, partial=False)

  def partial(self, example: Example, rng: np.random.Generator) -> Example:
    """Runs the chain on a record that lacks some fields (a serving request has no labels).

    An op runs when every field it `reads` is present, and is skipped otherwise; `keep` keeps the
    fields present. The ops that run are the same objects as in `__call__`, so a request's fields
    come out exactly as a full record's would.
    """
    return self._run(example, rng, partial=True)

  def _run(self, example: Example, rng: np.random.Generator, partial: bool) -> Example:
    try:
      for op in self.ops:
        if partial and isinstance(op, Keep):
          example = {k: example[k] for k in op.keys if k in example}
        elif not partial or all(k in example for k in reads(op)):
          example = op(example, rng)
    except BadExample as e:
      if self.skip_bad:
        raise SkipExample(e) from e
      raise
    return example

  def __repr__(self) -> str:
    return f"Preprocess({'|'.join(self.specs)!r}, skip_bad={self.skip_bad})"


def split_ops(pp: str) -> list[str]:
  """Splits a pp string on the `|` that are outside brackets and string literals."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(pp):
    if quote:
      if ch == quote and pp[i - 1] != "\\":
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append(pp[start:i])
      start = i + 1
  parts.append(pp[start:])
  return [p.strip() for p in parts if p.strip()]


def _dotted_name(node: ast.AST, spec: str) -> str:
  """`a.b.c` from an ast Name/Attribute chain."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted_name(node.value, spec)}.{node.attr}"
  raise ValueError(f"pp op {spec!r}: expected an op name such as image.resize(64)")


def _literal(node: ast.AST, spec: str) -> Any:
  """`ast.literal_eval` of one argument, or a ValueError quoting it."""
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    raise ValueError(f"pp op {spec!r}: argument {ast.unparse(node)!r} is not a Python literal "
                     "(numbers, strings, tuples, lists, dicts, True/False/None)") from None


def resolve(name: str) -> str:
  """The registered name for `name`; a bare name resolves if exactly one namespace defines it."""
  if name in PP_OPS:
    return name
  candidates = [f"{ns}.{name}" for ns in NAMESPACES if f"{ns}.{name}" in PP_OPS]
  if len(candidates) == 1:
    return candidates[0]
  if candidates:
    raise ValueError(f"pp op {name!r} is ambiguous; qualify it as one of {candidates}")
  raise ValueError(f"unknown pp op {name!r}; known ops: {', '.join(PP_OPS.names())}")


def parse_op(spec: str, context: dict[str, Any] | None = None) -> Op:
  """Builds one op from a string like `image.resize(64, method="bicubic")`.

  `context` values go to the op's arguments of the same name that the string leaves out.
  """
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse pp op {spec!r}: {e.msg}") from None
  if isinstance(node, ast.Call):
    name = _dotted_name(node.func, spec)
    if any(kw.arg is None for kw in node.keywords):
      raise ValueError(f"pp op {spec!r}: **kwargs are not allowed")
    args = [_literal(a, spec) for a in node.args]
    kwargs = {kw.arg: _literal(kw.value, spec) for kw in node.keywords}
  else:
    name, args, kwargs = _dotted_name(node, spec), [], {}
  factory = PP_OPS.get(resolve(name))
  try:
    if context:
      signature = inspect.signature(factory)
      given = signature.bind_partial(*args, **kwargs).arguments
      kwargs.update({k: v for k, v in context.items() if k in signature.parameters and k not in given})
    return factory(*args, **kwargs)
  except TypeError as e:
    raise TypeError(f"pp op {spec!r}: {e}") from None


def parse(pp: str, *, skip_bad: bool = False, **context: Any) -> Preprocess:
  """Composes a pp string into one `(example, rng) -> example` function.

  Args:
    pp: `|`-separated op calls; the empty string is the identity.
    skip_bad: re-raise `BadExample` as `SkipExample` so a pipeline can drop and count it.
    **context: objects a pp string cannot spell, e.g. `tokenizer=` a task's tokenizer: each op
      whose factory takes an argument of that name, and whose call leaves it out, receives it.
  Returns:
    A picklable `Preprocess`.
  """
  specs = split_ops(pp)
  return Preprocess([parse_op(s, context) for s in specs], specs, skip_bad)


@register("keep")
class Keep:
  """Keeps only the named fields (missing ones are an error)."""

  def __init__(self, *keys: str):
    self.keys = keys

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return {k: field(example, k) for k in self.keys}


@register("drop")
class Drop:
  """Removes the named fields (missing ones are ignored)."""

  def __init__(self, *keys: str):
    self.keys = keys

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return {k: v for k, v in example.items() if k not in self.keys}


@register("copy")
class Copy:
  """Copies field `key` to `outkey`."""

  def __init__(self, key: str, outkey: str):
    self.key, self.outkey = key, outkey

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return {**example, self.outkey: field(example, self.key)}


@register("flatten")
class Flatten:
  """Flattens nested dicts (as TFDS returns them) into `outer{sep}inner` keys."""

  def __init__(self, sep: str = "/"):
    self.sep = sep

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    out = {}
    for k, v in example.items():
      if isinstance(v, dict):
        for ik, iv in self(v, rng).items():
          out[f"{k}{self.sep}{ik}"] = iv
      else:
        out[k] = v
    return out


@register("rename")
class Rename:
  """Renames fields, `rename(old='new', ...)` (missing ones are an error)."""

  def __init__(self, **names: str):
    self.names = names

  def reads(self) -> tuple[str, ...]:
    return tuple(self.names)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    out = {k: v for k, v in example.items() if k not in self.names}
    out.update({new: field(example, old) for old, new in self.names.items()})
    return out


@register("cast")
class Cast:
  """Casts the named fields to numpy arrays of `dtype` (e.g. `cast('int32', 'label')`)."""

  def __init__(self, dtype: str, *keys: str):
    self.dtype, self.keys = np.dtype(dtype), keys

  def reads(self) -> tuple[str, ...]:
    return self.keys

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return {**example, **{k: np.asarray(field(example, k), self.dtype) for k in self.keys}}


@register("choice")
class Choice:
  """Replaces a sequence field by one of its elements drawn uniformly (e.g. one of five captions)."""

  def __init__(self, key: str, outkey: str | None = None):
    self.key, self.outkey = key, outkey

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = field(example, self.key)
    if isinstance(x, (str, bytes)) or np.ndim(x) == 0 or not len(x):
      raise bad(example, self.key, f"choice needs a non-empty sequence, got {type(x).__name__}")
    return {**example, self.outkey or self.key: x[int(rng.integers(len(x)))]}
