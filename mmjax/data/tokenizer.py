"""WordPiece tokenizers: trained on a data set's training text, or loaded from a pretrained folder.

A trained tokenizer is a Hugging Face `tokenizers` pipeline (BERT normaliser, lower-casing, BERT
pre-tokeniser, WordPiece model, `[CLS] text [SEP]` post-processor) wrapped as a
`transformers.PreTrainedTokenizerFast`, and saved as one `tokenizer.json`.

The vocabulary is computed here rather than by `tokenizers.trainers.WordPieceTrainer`: that
trainer breaks ties between equally frequent merges in hash-map order, which is randomised per
process, so two trainings on the same text give different vocabularies. Ours is, in id order:
the special tokens, the alphabet (an initial alphabet, by default lower-case ASCII letters,
digits and punctuation, plus every other character seen in the text), each as a word start
and as a `##` continuation, then the whole words seen at least `min_frequency` times, most
frequent first (ties alphabetical), up to `vocab_size`. A word outside the vocabulary is split
greedily into the longest known pieces (at worst single characters); a word holding a
character outside the alphabet maps to `[UNK]`.

`transformers` is imported only when a tokenizer is wrapped or loaded (it is slow to import).
"""

from __future__ import annotations

import collections
import os
import string
import tempfile
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mmjax import io_paths

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerFast

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
TOKENIZER_FILE = "tokenizer.json"


def _special_kwargs() -> dict[str, str]:
  """Special-token arguments of `PreTrainedTokenizerFast`."""
  return dict(pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP, mask_token=MASK)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
  """The `transformers` view of a `tokenizers.Tokenizer` with our special tokens."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  return PreTrainedTokenizerFast(tokenizer_object=backend, **_special_kwargs())


def _as_str(text: str | bytes) -> str:
  """`text` as `str` (TFDS Text features decode to bytes)."""
  if isinstance(text, bytes):
    return text.decode("utf-8")
  if isinstance(text, str):
    return text
  raise TypeError(f"texts must be str or bytes, got {type(text).__name__}")


def train_wordpiece(texts: Iterable[str | bytes], **kwargs) -> PreTrainedTokenizerFast:
  """`train_wordpiece_backend(texts, **kwargs)` wrapped as a `transformers` tokenizer."""
  return _wrap(train_wordpiece_backend(texts, **kwargs))


def train_wordpiece_backend(
  texts: Iterable[str | bytes],
  *,
  vocab_size: int = 4096,
  min_frequency: int = 1,
  lowercase: bool = True,
  initial_alphabet: str = string.ascii_lowercase + string.digits + string.punctuation,
) -> Tokenizer:
  """A WordPiece tokenizer whose vocabulary is built from `texts` (see the module docstring).

  Args:
    texts: the training sentences (only these; never evaluation text).
    vocab_size: upper bound on the vocabulary size; must hold the specials and the alphabet.
    min_frequency: a whole word enters the vocabulary if seen at least this many times.
    lowercase: lower-case and strip accents before splitting.
    initial_alphabet: characters in the vocabulary even if absent from `texts`, so that
      unseen words split into pieces rather than `[UNK]`.

  Returns:
    The tokenizer; a pure function of the multiset of words in `texts`.
  """
  normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  counts: collections.Counter[str] = collections.Counter()
  for text, n in collections.Counter(texts).items():  # templated data repeats sentences
    normalized = normalizer.normalize_str(_as_str(text))
    for word, _ in pre_tokenizer.pre_tokenize_str(normalized):
      counts[word] += n
  if not counts:
    raise ValueError("texts must contain at least one word")
  chars = sorted({c for word in counts for c in word} | set(initial_alphabet))
  vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
  if vocab_size < len(vocab):
    raise ValueError(f"vocab_size must be >= {len(vocab)} (specials + alphabet), got {vocab_size}")
  known = set(vocab)
  words = sorted(
    (w for w, n in counts.items() if n >= min_frequency and w not in known),
    key=lambda w: (-counts[w], w),
  )
  vocab += words[: vocab_size - len(vocab)]
  backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
  backend.add_special_tokens(list(SPECIAL_TOKENS))
  backend.normalizer = normalizer
  backend.pre_tokenizer = pre_tokenizer
  backend.post_processor = processors.TemplateProcessing(
    single=f"{CLS} $A {SEP}",
    pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
    special_tokens=[(CLS, vocab.index(CLS)), (SEP, vocab.index(SEP))],
  )
  backend.decoder = decoders.WordPiece()
  return backend


def save_tokenizer(
  tokenizer: PreTrainedTokenizerFast | Tokenizer, path: str | os.PathLike
) -> epath.Path:
  """Writes `tokenizer.json` (atomically) to `path` (a file, or a folder to hold it; local or a
  bucket URL)."""
  backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
  path = io_paths.as_path(path)
  if path.is_dir():
    path = path / TOKENIZER_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  io_paths.write_atomic(path, backend.to_str(pretty=True))
  return path


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
  """Loads a `tokenizer.json` file, or a pretrained tokenizer folder (e.g. a BERT/MiniLM one);
  local or a bucket URL."""
  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast

  path = io_paths.as_path(path)
  if path.is_file():
    if io_paths.is_url(path):
      backend = Tokenizer.from_str(path.read_bytes().decode("utf-8"))
      return PreTrainedTokenizerFast(tokenizer_object=backend, **_special_kwargs())
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **_special_kwargs())
  if not path.is_dir():
    raise FileNotFoundError(f"no tokenizer file or folder at {path}")
  if (path / "tokenizer_config.json").exists() or (path / "vocab.txt").exists():
    from transformers import AutoTokenizer  # imports torch when installed (~5 s): only here

    if io_paths.is_url(path):  # transformers reads local folders: the folder's files, copied
      with tempfile.TemporaryDirectory() as local:
        for f in path.iterdir():
          if f.is_file():
            (epath.Path(local) / f.name).write_bytes(f.read_bytes())
        tokenizer = AutoTokenizer.from_pretrained(local)
    else:
      tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
      raise TypeError(f"{path} holds a slow tokenizer ({type(tokenizer).__name__}); need a fast one")
    return tokenizer
  if (path / TOKENIZER_FILE).exists():
    return load_tokenizer(path / TOKENIZER_FILE)
  raise FileNotFoundError(f"{path} holds neither {TOKENIZER_FILE} nor a pretrained tokenizer")


# tokenizer -> the max_len values it has warned about (weak: a freed tokenizer's entry goes too,
# so a new tokenizer at a recycled address still warns).
_WARNED_TRUNCATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# HF fast tokenizers keep truncation and padding as state on the backend and set it per call, so
# concurrent calls with different max_len (pipeline threads, predict) could pad to another's.
_LOCK = threading.Lock()


def encode(
  tokenizer: PreTrainedTokenizerFast, texts: Sequence[str | bytes], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes `texts` with `[CLS]`/`[SEP]`, truncating and padding to `max_len`.

  Args:
    tokenizer: a fast tokenizer whose post-processor adds `[CLS]`/`[SEP]`.
    texts: N sentences (str or UTF-8 bytes).
    max_len: L, the padded length; a longer sentence is cut and still ends with `[SEP]`, and
      the first call that cuts sentences for a given tokenizer and `max_len` warns, naming
      how many and the longest length needed.

  Returns:
    ids: (N, L) int32 token ids, `[PAD]` after the end.
    mask: (N, L) bool, True on real tokens.
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
  texts = [_as_str(t) for t in texts]
  if not texts:
    return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), bool)
  with _LOCK:  # the call sets the shared backend's truncation and padding, then encodes
    enc = tokenizer(
      texts,
      max_length=max_len,
      padding="max_length",
      truncation=True,
      return_attention_mask=True,
      return_token_type_ids=False,
    )
  # The backend keeps what truncation cut in each Encoding's `overflowing`; reading it does not
  # re-run the shared tokenizer with other settings (that would race with pipeline threads).
  # Lengths needed: every overflow piece is padded and re-adds [CLS] and [SEP].
  cut = [max_len + sum(sum(o.attention_mask) - 2 for o in e.overflowing)
         for e in enc.encodings if e.overflowing]
  if cut and max_len not in _WARNED_TRUNCATION.setdefault(tokenizer, set()):
    _WARNED_TRUNCATION[tokenizer].add(max_len)
    warnings.warn(f"tokenizer.encode: {len(cut)} of {len(texts)} texts are longer than "
                  f"max_len={max_len} tokens and were truncated (the longest needs {max(cut)}); "
                  f"raise max_len (e.g. data.max_len) to keep them whole. Warned once per "
                  f"tokenizer and max_len.", stacklevel=2)
  return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], bool)


def boundary_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int | None, int]:
  """(start, end) special token ids that `encode` puts around every text: `[CLS]` and `[SEP]` for
  a WordPiece tokenizer, `<|startoftext|>` and `<|endoftext|>` for CLIP's; start is None for a
  tokenizer that adds only an end token (SigLIP's). Read off an encoded text, so any tokenizer's
  post-processor is followed; a tokenizer that adds no end token is a ValueError."""
  ids, mask = encode(tokenizer, ["a"], 8)
  real = [int(i) for i in ids[0][mask[0]]]
  special = set(tokenizer.all_special_ids)
  if len(real) < 2 or real[-1] not in special:
    raise ValueError(f"tokenizer {type(tokenizer).__name__}: expected a special end token after "
                     f"every text (as [SEP] or <|endoftext|>), got ids {real} for 'a'")
  return (real[0] if real[0] in special else None), real[-1]
