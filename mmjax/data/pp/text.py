"""Text pp ops: normalisation, and tokenisation with the tokenizers of `mmjax.data.tokenizer`.

A text field holds one string (str or UTF-8 bytes, as TFDS returns it) or a sequence of them
(e.g. all questions of an image); ops keep that shape: one string in, (max_len,) ids out; N strings
in, (N, max_len) ids out.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import unicodedata
from typing import Any

import numpy as np

from mmjax.data.pp.registry import Example, bad, field, record_name, register


def get_texts(example: Example, key: str) -> tuple[list[str], bool]:
  """(strings, is_scalar) from a str/bytes field or a sequence of them."""
  x = field(example, key)
  scalar = isinstance(x, (str, bytes)) or (isinstance(x, np.ndarray) and x.ndim == 0)
  if not scalar and not isinstance(x, (list, tuple, np.ndarray)):
    raise TypeError(f"{record_name(example)}: field {key!r}: expected str or bytes text or a list of "
                    f"them, got {type(x).__name__}")
  items = [x.item() if isinstance(x, np.ndarray) else x] if scalar else list(x)
  out = []
  for i, s in enumerate(items):
    if isinstance(s, (bytes, np.bytes_)):
      try:
        s = s.decode("utf-8")
      except UnicodeDecodeError as e:
        where = key if scalar else f"{key}[{i}]"
        raise bad(example, where, f"text is not valid UTF-8 ({e})") from None
    if not isinstance(s, str):
      raise TypeError(f"{record_name(example)}: field {key!r}: expected str or bytes text, "
                      f"got {type(s).__name__}")
    out.append(str(s))
  return out, scalar


def _put_texts(texts: list[str], scalar: bool) -> Any:
  """The field value for `texts`: a str, or a numpy string array."""
  return texts[0] if scalar else np.asarray(texts, dtype=str)


def normalize_text(s: str, lower: bool = True) -> str:
  """Unicode NFKC, optional lower-casing, whitespace stripped and collapsed to single spaces."""
  s = unicodedata.normalize("NFKC", s)
  if lower:
    s = s.lower()
  return " ".join(s.split())


@register("text.normalize")
@dataclasses.dataclass
class Normalize:
  """NFKC, lower-case (unless lower=False), strip and collapse whitespace."""

  lower: bool = True
  key: str = "text"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    texts, scalar = get_texts(example, self.key)
    out = [normalize_text(s, self.lower) for s in texts]
    return {**example, self.outkey or self.key: _put_texts(out, scalar)}


def _tokenizer_lib():
  """`mmjax.data.tokenizer`, imported on first use (it pulls in transformers)."""
  from mmjax.data import tokenizer
  return tokenizer


@register("text.tokenize")
class Tokenize:
  """Tokenises text to `max_len` ids (`[CLS] ... [SEP]`, truncated, then padded) and a mask.

  Uses `mmjax.data.tokenizer`, so ids match the rest of mmjax.

  Args:
    max_len: output length, special tokens included (>= 2).
    tokenizer: a `tokenizer.json` or a pretrained tokenizer folder (e.g. a BERT/MiniLM one), or
      a loaded fast tokenizer, as a task passes its own through `parse(..., tokenizer=...)`
      (without one, running the op is an error).
    key: text field; empty or whitespace-only text is a `BadExample`.
    outkey: ids field, default `{key}_ids`; int32 (max_len,), or (N, max_len) for N texts.
    mask_key: mask field, default `{key}_mask`; bool, True on real tokens, same shape.
    cache_size: how many distinct texts' ids to remember (templated questions repeat); the
      oldest are forgotten first; 0 turns the cache off.
  """

  def __init__(self, max_len: int, tokenizer: Any = None, key: str = "text", outkey: str | None = None,
               mask_key: str | None = None, cache_size: int = 256):
    if max_len < 2:
      raise ValueError(f"text.tokenize: max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
    self.max_len, self.key, self.cache_size = max_len, key, cache_size
    self.outkey = outkey or f"{key}_ids"
    self.mask_key = mask_key or f"{key}_mask"
    self.path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
    self.tokenizer = _tokenizer_lib().load_tokenizer(tokenizer) if self.path else tokenizer
    self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_len) ids and mask of `texts`, through the cache."""
    if not self.cache_size:
      return _tokenizer_lib().encode(self.tokenizer, texts, self.max_len)
    with self._lock:
      found = {t: self._cache[t] for t in texts if t in self._cache}
    missing = [t for t in dict.fromkeys(texts) if t not in found]
    if missing:
      ids, mask = _tokenizer_lib().encode(self.tokenizer, missing, self.max_len)
      found.update(zip(missing, zip(ids, mask)))
      with self._lock:
        self._cache.update((t, found[t]) for t in missing)
        while len(self._cache) > self.cache_size:
          del self._cache[next(iter(self._cache))]
    rows = [found[t] for t in texts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    if self.tokenizer is None:
      raise ValueError("text.tokenize: no tokenizer; name a tokenizer.json or folder in the pp "
                       "string, or pass one to parse(..., tokenizer=...)")
    texts, scalar = get_texts(example, self.key)
    for i, s in enumerate(texts):
      if not s.strip():
        raise bad(example, self.key if scalar else f"{self.key}[{i}]",
                  "text is empty or whitespace-only")
    ids, mask = self._encode(texts)  # (N, max_len)
    if scalar:
      ids, mask = ids[0], mask[0]
    return {**example, self.outkey: ids, self.mask_key: mask}

  def __getstate__(self) -> dict:
    """Pickles without the cache and its lock (Grain ships ops to worker processes)."""
    return {**self.__dict__, "_cache": {}, "_lock": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    what = repr(os.fspath(self.path)) if self.path else type(self.tokenizer).__name__
    return f"text.tokenize(max_len={self.max_len}, tokenizer={what}, key={self.key!r})"
