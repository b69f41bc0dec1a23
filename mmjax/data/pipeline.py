"""Grain input pipelines: shuffle, shard per host, repeat, preprocess, batch, prefetch.

  source -> seed -> shuffle (per epoch) -> shard -> repeat -> random_map(preprocess)
         -> to_iter_dataset -> batch -> [mp_prefetch]

The shuffle is global and reshuffled every epoch; each host then takes every
`shard_count`-th element of that permutation, so hosts see disjoint data that is mixed
afresh across hosts every epoch (all hosts must use the same source and seed). `preprocess`
runs with a `numpy.random.Generator` seeded from (seed, host, element index), so augmentation
is reproducible and independent of worker count. The iterator is checkpointable:
`it.get_state()` / `it.set_state(state)` resume exactly (also under `mp_prefetch`), and Grain's
`grain.checkpoint.CheckpointSave`/`CheckpointRestore` save it with Orbax.

A preprocess raising `mmjax.data.pp.SkipExample` drops that example (logged); any other error
propagates. Batches are dicts of numpy arrays; with `worker_count > 0` the leaves are Grain
`SharedMemoryArray`s (numpy subclasses).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, NamedTuple

import grain
import jax
import numpy as np
from absl import flags, logging

from mmjax.data import scenes
from mmjax.data import tokenizer as tokenizer_lib

Preprocess = Callable[[dict, np.random.Generator], dict]


def _ensure_absl_flags_parsed() -> None:
  """Grain's multiprocessing reads absl flags; outside an absl app, use their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class _SkippingMap:
  """Applies `fn`; an example it refuses with `SkipExample` becomes None (dropped)."""

  fn: Preprocess

  def __call__(self, example: dict, rng: np.random.Generator) -> dict | None:
    try:
      return self.fn(example, rng)
    except Exception as e:  # pylint: disable=broad-except
      # SkipExample's module is loaded by whoever raised it; not importing it here keeps the
      # pipeline free of the pp ops' imports.
      registry = sys.modules.get("mmjax.data.pp.registry")
      if registry is None or not isinstance(e, registry.SkipExample):
        raise
      logging.warning("pipeline: dropping an example: %s", e)
      return None


@dataclasses.dataclass(frozen=True)
class _PadBatch:
  """Pads a batch's leading axis to `batch_size` with zeros and adds `valid` (B,) bool."""

  batch_size: int

  def __call__(self, batch: dict) -> dict:
    n = len(jax.tree.leaves(batch)[0])
    pad = self.batch_size - n

    def fill(x):
      x = np.asarray(x)
      return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    return {**jax.tree.map(fill, batch), "valid": np.arange(self.batch_size) < n}


def _default_shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count), defaulting to this JAX process among all of them."""
  if (shard_index is None) != (shard_count is None):
    raise ValueError("give both shard_index and shard_count, or neither (then one shard per "
                     f"JAX process); got shard_index={shard_index}, shard_count={shard_count}")
  if shard_index is None:
    return jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  return shard_index, shard_count


def make_pipeline(
  source: Any,
  *,
  batch_size: int,
  preprocess: Preprocess | None = None,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  drop_remainder: bool = True,
  pad_remainder: bool = False,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  read_threads: int = 2,
  read_buffer_size: int = 64,
) -> grain.IterDataset:
  """A Grain `IterDataset` of batches from a random-access `source`.

  Args:
    source: a random-access source (`len`, `__getitem__`), e.g. a TFDS data source.
    batch_size: examples per batch on this host.
    preprocess: `(example, rng) -> example`, run per example with a seeded generator.
    seed: seed of the shuffle and of the preprocess generators.
    shuffle: shuffle globally, differently every epoch.
    num_epochs: passes over the data; None repeats forever.
    shard_index: this host's shard; default `jax.process_index()`.
    shard_count: number of shards; default `jax.process_count()`. With `drop_remainder`,
      each epoch first drops `len(source) % shard_count` examples so that all shards are
      equally long; otherwise shards may differ by one example.
    drop_remainder: drop a last batch smaller than `batch_size` (batches may span epochs).
    pad_remainder: instead, zero-pad the last batch to `batch_size`; every batch then has a
      `valid` (B,) bool field. Requires `drop_remainder=False`.
    worker_count: preprocessing processes (`mp_prefetch`); 0 preprocesses in this process.
      The output does not depend on it.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads reading and preprocessing examples in each process.
    read_buffer_size: examples read ahead in each process.

  Returns:
    An `IterDataset`; `iter()` gives a checkpointable iterator of dicts of arrays.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  if pad_remainder and drop_remainder:
    raise ValueError("pad_remainder=True needs drop_remainder=False")
  if len(source) == 0:
    raise ValueError("source is empty")
  index, count = _default_shards(shard_index, shard_count)
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  if count > 1:
    if drop_remainder:
      ds = ds[: len(ds) - len(ds) % count]
    ds = ds[index::count]
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if preprocess is not None:
    map_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    ds = ds.random_map(_SkippingMap(preprocess), seed=map_seed)
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size)
  it = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)
  if pad_remainder:
    it = it.map(_PadBatch(batch_size))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    )
  return it


class SortOfClevrPreprocess:
  """Sort-of-CLEVR record -> VQA example with all 20 questions of the image.

  Output: image (75, 75, 3) float32 in `value_range`; question_ids (20, L) int32 and
  question_mask (20, L) bool (`[CLS] ... [SEP]`, padded to L = `max_len`); answer, kind,
  subtype, color (20,) int32 (indices into `sort_of_clevr.ANSWERS`, `KINDS`, `SUBTYPES` and
  `scenes.COLORS`: the colour each question names).
  Tokenized questions are cached (the data set has few distinct sentences).

  Attributes:
    tokenizer: the tokenizer of the questions.
    max_len: L.
    value_range: (low, high) that pixel values 0 and 255 map to.
  """

  def __init__(self, tokenizer, max_len: int = 32, value_range: tuple[float, float] = (0.0, 1.0)):
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {max_len}")
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.value_range = (float(value_range[0]), float(value_range[1]))
    self._cache: dict[bytes | str, tuple[np.ndarray, np.ndarray]] = {}

  def _encode(self, questions) -> tuple[np.ndarray, np.ndarray]:
    """(Q, L) ids and mask of `questions`, through the cache."""
    missing = [q for q in dict.fromkeys(questions) if q not in self._cache]
    if missing:
      ids, mask = tokenizer_lib.encode(self.tokenizer, missing, self.max_len)
      self._cache.update(zip(missing, zip(ids, mask)))
    rows = [self._cache[q] for q in questions]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    del rng  # Deterministic.
    image = example["image"]
    if isinstance(image, bytes):
      image = scenes.decode_png(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"field 'image' must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    low, high = self.value_range
    ids, mask = self._encode(list(example["questions"]))
    return {
      "image": (image.astype(np.float32) * ((high - low) / 255.0) + low),
      "question_ids": ids,
      "question_mask": mask,
      "answer": np.asarray(example["answers"], np.int32),
      "kind": np.asarray(example["kinds"], np.int32),
      "subtype": np.asarray(example["subtypes"], np.int32),
      "color": np.asarray(example["question_colors"], np.int32),
    }

  def __getstate__(self) -> dict:
    """Pickles without the cache."""
    return {**self.__dict__, "_cache": {}}


class VqaData(NamedTuple):
  """A VQA input pipeline with what a model needs to read it.

  Attributes:
    dataset: the Grain `IterDataset` of batches.
    tokenizer: the question tokenizer.
    answers: the answer vocabulary (index -> string).
  """

  dataset: grain.IterDataset
  tokenizer: Any
  answers: tuple[str, ...]


def sort_of_clevr_pipeline(
  split: str,
  batch_size: int,
  *,
  data_dir: str | None = None,
  config: Any = None,
  max_len: int = 32,
  value_range: tuple[float, float] = (0.0, 1.0),
  seed: int = 0,
  training: bool | None = None,
  tokenizer: Any = None,
  **kwargs: Any,
) -> VqaData:
  """Sort-of-CLEVR batches for VQA (the data set is built on first use).

  Batches: image (B, 75, 75, 3) float32, question_ids (B, 20, L) int32, question_mask
  (B, 20, L) bool, answer / kind / subtype / color (B, 20) int32. With the default L = 32 no
  question of any split is truncated (train/test need 17 tokens, paraphrase 32).

  Args:
    split: 'train', 'test' or 'paraphrase'.
    batch_size: images per batch on this host (each has 20 questions).
    data_dir: data folder (default `$MMJAX_DATA_DIR` or `~/.cache/mmjax/datasets`).
    config: a `SortOfClevrConfig` (e.g. fewer images), default the full data set.
    max_len: L, question length in tokens.
    value_range: pixel range.
    seed: shuffle and preprocess seed.
    training: default `split == 'train'`. Training shuffles, repeats forever and drops the
      last partial batch; evaluation reads each image once in order and zero-pads the last
      batch (with a `valid` (B,) field).
    tokenizer: the question tokenizer (e.g. a pretrained text encoder's); default the data
      set's own WordPiece, trained on the train questions.
    **kwargs: overrides of `make_pipeline` arguments (worker_count, shard_index, ...).

  Returns:
    `VqaData(dataset, tokenizer, answers)`.
  """
  from mmjax.data.datasets import sort_of_clevr  # pylint: disable=g-import-not-at-top

  source = sort_of_clevr.load(split, data_dir, config=config)
  if tokenizer is None:
    tokenizer = sort_of_clevr.load_tokenizer(data_dir, config=config)
  training = split == "train" if training is None else training
  mode = (dict(shuffle=True, num_epochs=None, drop_remainder=True) if training else
          dict(shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True))
  dataset = make_pipeline(
    source,
    batch_size=batch_size,
    preprocess=SortOfClevrPreprocess(tokenizer, max_len, value_range),
    seed=seed,
    **{**mode, **kwargs},
  )
  return VqaData(dataset, tokenizer, sort_of_clevr.ANSWERS)
