"""Grain input pipelines: shuffle, shard per host, repeat, preprocess, batch, prefetch.

  source -> seed -> shuffle (per epoch) -> [pad to equal shards] -> shard -> repeat
         -> random_map(preprocess) -> to_iter_dataset -> batch -> [pad batch] -> [mp_prefetch]

The shuffle is global and reshuffled every epoch; each host then takes every
`shard_count`-th element of that permutation, so hosts see disjoint data that is mixed
afresh across hosts every epoch (all hosts must use the same source and seed). With
`pad_remainder` every shard yields the same number of examples (and so of batches), padding
short shards with copies flagged `valid=False`. `preprocess` runs with a
`numpy.random.Generator` seeded from (seed, host, element index), so each example's
augmentation is reproducible and independent of worker count; how examples are grouped into
batches is not (each worker batches its own share). The iterator is checkpointable:
`it.get_state()` / `it.set_state(state)` resume exactly under the same `worker_count` (also
under `mp_prefetch`), and Grain's `grain.checkpoint.CheckpointSave`/`CheckpointRestore` save it
with Orbax.

Tasks parse `preprocess` from their config's pp strings (`config.input.pp_train` and
`config.input.pp_eval`, `mmjax.data.pp.parse`) and build each split with `split_pipeline`;
`ConfigInput` does both for a task with a `source(split)`.
A preprocess raising `mmjax.data.pp.SkipExample` drops that example (logged); any other error
propagates. Batches are dicts of numpy arrays; with `worker_count > 0` the leaves are Grain
`SharedMemoryArray`s (numpy subclasses).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import grain
import jax
import numpy as np
from absl import flags, logging

from mmjax.data import pp

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
class _FlagPadding:
  """Pairs a record with whether it is a padding copy: (record, is_padding)."""

  size: int  # real records per epoch
  length: int  # records per epoch with the padding copies at the end

  def __call__(self, index: int, record: Any) -> tuple[Any, bool]:
    return record, index % self.length >= self.size


@dataclasses.dataclass(frozen=True)
class _OnRecord:
  """Applies `fn` to the record of a (record, is_padding) pair; None (dropped) stays None."""

  fn: Preprocess

  def __call__(self, pair: tuple[dict, bool], rng: np.random.Generator) -> tuple[dict, bool] | None:
    out = self.fn(pair[0], rng)
    return None if out is None else (out, pair[1])


@dataclasses.dataclass(frozen=True)
class _PadBatch:
  """Pads a (batch, is_padding) pair's leading axis to `batch_size` with zeros and adds `valid`
  (B,) bool: False for the zeros and the padding copies."""

  batch_size: int

  def __call__(self, pair: tuple[dict, np.ndarray]) -> dict:
    batch, padding = pair
    pad = self.batch_size - len(padding)

    def fill(x):
      x = np.asarray(x)
      return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    return {**jax.tree.map(fill, batch), "valid": fill(~np.asarray(padding))}


class _WorkerCountIterDataset(grain.IterDataset):
  """`parent` whose iterators refuse a state saved under another `worker_count`."""

  def __init__(self, parent: grain.IterDataset, worker_count: int):
    super().__init__(parent)
    self._worker_count = worker_count

  def __iter__(self) -> grain.DatasetIterator:
    return _WorkerCountIterator(self._parent.__iter__(), self._worker_count)


class _WorkerCountIterator(grain.DatasetIterator):
  """Passes `parent` through; `set_state` checks the worker count the state was saved with."""

  def __init__(self, parent: grain.DatasetIterator, worker_count: int):
    super().__init__(parent)
    self._worker_count = worker_count

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    # mp_prefetch saves one state per worker; batches depend on the worker count, so a state
    # saved under another one cannot resume this stream.
    saved = len(state.get("iterators_in_use_states", ())) if isinstance(state, dict) else 0
    if saved != self._worker_count:
      raise ValueError(f"pipeline state was saved with worker_count={saved}, but this pipeline has "
                       f"worker_count={self._worker_count}; batches depend on it, so resume with "
                       f"worker_count={saved} (config data.worker_count)")
    self._parent.set_state(state)


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
      equally long; with `pad_remainder` every shard yields ceil(len(source) / shard_count)
      examples per epoch, the missing ones copies of records marked `valid=False`; otherwise
      shards may differ by one example. A shard left with no records is an error.
    drop_remainder: drop a last batch smaller than `batch_size` (batches may span epochs).
    pad_remainder: instead, zero-pad the last batch to `batch_size`; every batch then has a
      `valid` (B,) bool field. Requires `drop_remainder=False`.
    worker_count: preprocessing processes (`mp_prefetch`); 0 preprocesses in this process.
      Examples and their augmentation do not depend on it, but with more than one worker each
      batches its own share (every `worker_count`-th example), so batch contents and order do;
      a saved state resumes only under the same `worker_count` (else `set_state` raises).
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
  n = len(source)
  if n == 0:
    raise ValueError("source is empty")
  index, count = _default_shards(shard_index, shard_count)
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  if pad_remainder:
    # Equal shards, so that every host runs the same number of (collective) steps: the slots
    # past the end repeat records, flagged as padding.
    length = -(-n // count) * count
    ds = ds.repeat(count)[:length].map_with_index(_FlagPadding(n, length))
  if count > 1:
    if drop_remainder:
      ds = ds[: len(ds) - len(ds) % count]
    ds = ds[index::count]
  if len(ds) == 0:
    why = " and drop_remainder keeps a multiple of shard_count" if drop_remainder else ""
    raise ValueError(f"shard {index} of shard_count={count} gets no records: the source has {n}"
                     f"{why}; use fewer shards or more records")
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if preprocess is not None:
    map_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    fn = _SkippingMap(preprocess)
    ds = ds.random_map(_OnRecord(fn) if pad_remainder else fn, seed=map_seed)
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size)
  it = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)
  if pad_remainder:
    it = it.map(_PadBatch(batch_size))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    )
  return _WorkerCountIterDataset(it, worker_count)


def split_pipeline(
  source: Any,
  preprocess: Preprocess,
  *,
  train: bool,
  batch_size: int,
  seed: int,
  shard_index: int,
  shard_count: int,
  worker_count: int = 0,
) -> grain.IterDataset:
  """A task's pipeline over one split, as `mmjax.train.tasks.Task.dataset` gives it.

  Training shuffles, repeats forever and drops the last partial batch, preprocessing in
  `worker_count` processes; evaluation reads each record once in order and zero-pads the last
  batch (with a `valid` (B,) field), in this process, giving every shard the same number of
  batches (padding copies are `valid=False`).
  """
  mode = (dict(shuffle=True, num_epochs=None, drop_remainder=True, worker_count=worker_count) if train
          else dict(shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True))
  return make_pipeline(source, batch_size=batch_size, preprocess=preprocess, seed=seed,
                       shard_index=shard_index, shard_count=shard_count, **mode)


class ConfigInput:
  """A task's `preprocess` and `dataset` from its config: the records of `self.source(split)`
  through `config.input.pp_train` / `pp_eval`, the text ops tokenising with `self.tokenizer`
  (none: ops keep their own), over `split_pipeline` with `data.worker_count` workers."""

  tokenizer = None

  def preprocess(self, pp_string: str) -> Preprocess:
    """The parsed pp string (the Predictor runs the config's `pp_eval` through this too)."""
    context = {} if self.tokenizer is None else {"tokenizer": self.tokenizer}
    return pp.parse(pp_string, **context)

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    i = self.config.input
    return split_pipeline(
        self.source(split), self.preprocess(i.pp_train if train else i.pp_eval), train=train,
        batch_size=batch_size, seed=int(self.config.seed), shard_index=shard_index,
        shard_count=shard_count, worker_count=self.config.data.worker_count)
