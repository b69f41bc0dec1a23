"""Text pp ops: normalisation, and tokenisation with the tokenizers of `mmjax.data.tokenizer`.

A text field holds one string (str or UTF-8 bytes, as TFDS returns it) or a sequence of them
(e.g. all questions of an image); ops keep that shape: one string in, (max_len,) ids out; N strings
in, (N, max_len) ids out.
"""

from __future__ import annotations

import dataclasses
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
    tokenizer: a `tokenizer.json` or a pretrained tokenizer folder (e.g. a BERT/MiniLM one).
    key: text field; empty or whitespace-only text is a `BadExample`.
    outkey: ids field, default `{key}_ids`; int32 (max_len,), or (N, max_len) for N texts.
    mask_key: mask field, default `{key}_mask`; bool, True on real tokens, same shape.
  """

  def __init__(self, max_len: int, tokenizer: str, key: str = "text", outkey: str | None = None,
               mask_key: str | None = None):
    if max_len < 2:
      raise ValueError(f"text.tokenize: max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
    self.max_len, self.path, self.key = max_len, tokenizer, key
    self.outkey = outkey or f"{key}_ids"
    self.mask_key = mask_key or f"{key}_mask"
    self.tokenizer = _tokenizer_lib().load_tokenizer(tokenizer)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    texts, scalar = get_texts(example, self.key)
    for i, s in enumerate(texts):
      if not s.strip():
        raise bad(example, self.key if scalar else f"{self.key}[{i}]",
                  "text is empty or whitespace-only")
    ids, mask = _tokenizer_lib().encode(self.tokenizer, texts, self.max_len)  # (N, max_len)
    if scalar:
      ids, mask = ids[0], mask[0]
    return {**example, self.outkey: ids, self.mask_key: mask}

  def __repr__(self) -> str:
    return f"text.tokenize(max_len={self.max_len}, tokenizer={self.path!r}, key={self.key!r})"
