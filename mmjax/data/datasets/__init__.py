"""Embedded data sets, generated offline and deterministically, stored as TFDS array_record.

Each module defines a TFDS `GeneratorBasedBuilder` and a `load(split, data_dir=None)` that
builds the data set on first use and returns a random-access source for Grain. Modules are
imported on demand, so importing this package does not import TFDS.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import pathlib
import pkgutil
from typing import Any

from mmjax.data import tokenizer as tokenizer_lib


def names() -> list[str]:
  """The embedded data sets: this package's modules, found without importing them."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def default_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`data_dir` if given, else `$MMJAX_DATA_DIR`, else `~/.cache/mmjax/datasets`."""
  if data_dir is not None:
    return pathlib.Path(data_dir).expanduser()
  env = os.environ.get("MMJAX_DATA_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path("~/.cache/mmjax/datasets").expanduser()


def load(name: str, split: str, data_dir: str | os.PathLike | None = None, **kwargs: Any):
  """Random-access source of split `split` of embedded data set `name` (built if missing)."""
  if name not in names():
    raise KeyError(f"unknown embedded data set {name!r}; known: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").load(split, data_dir=data_dir, **kwargs)


def sized_config(config_cls: type, splits: tuple[str, ...], num_images: Any) -> Any:
  """`config_cls` (a builder config with `num_images`) for a task's `data.num_images`, one count
  per split in `splits` order, named by the counts ("n64_16"); None (default sizes) when empty."""
  if not num_images:
    return None
  if len(num_images) != len(splits):
    raise ValueError(f"data.num_images: expected {len(splits)} image counts {splits}, got {num_images!r}")
  counts = tuple((split, int(n)) for split, n in zip(splits, num_images))
  return config_cls(name="n" + "_".join(str(n) for _, n in counts), num_images=counts)


def prepare(builder: Any, text_key: str | None = None) -> Any:
  """Generates `builder`'s data if missing, and its tokenizer if `text_key` names a text field.

  The tokenizer (`mmjax.data.tokenizer.train_wordpiece_backend`) is trained on the train split's
  `text_key` texts only, and saved as `tokenizer.json` in the builder's data folder. A builder
  may keep those texts in `train_text` while generating; otherwise they are read back.
  TFDS statistics are skipped (they would need TensorFlow).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def reread():  # generated (renamed into place, complete) since `builder` was made
    if builder.is_prepared() and not builder.info.splits:
      builder.info.read_from_directory(builder.data_path)

  reread()
  path = builder.data_path / tokenizer_lib.TOKENIZER_FILE
  if builder.is_prepared() and (text_key is None or path.exists()):
    return builder
  # Another process (a second run, the other hosts of a multi-host job) may be generating the
  # same folder: one generates, the others wait for it and then read what it wrote.
  with _lock(builder.data_path.parent / f".{builder.data_path.name}.lock"):
    reread()
    if not builder.is_prepared():
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
      )
    if text_key is not None and not path.exists():
      text = getattr(builder, "train_text", None) or _read_texts(builder, "train", text_key)
      tokenizer_lib.save_tokenizer(tokenizer_lib.train_wordpiece_backend(text), path)
  return builder


@contextlib.contextmanager
def _lock(path: pathlib.Path):
  """An exclusive advisory lock on file `path` (created), held for the `with` block."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_texts(builder: Any, split: str, key: str):
  """The texts of field `key` in `split`, read back without decoding any other field."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k != key}
  source = builder.as_data_source(split, decoders=skip)
  for i in range(len(source)):
    yield from source[i][key]
