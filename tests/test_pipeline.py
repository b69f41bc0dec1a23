"""Grain pipeline: exact resume, per-epoch shuffles, host sharding, workers."""

import json
import sys

import cloudpickle
import numpy as np
import pytest

from mmjax.data import pipeline
# Imported first: TFDS's first import patches `import` (etils lazy imports), and a Grain
# finalizer reported through pytest's unraisable hook during that window breaks the hook.

N = 22


def tag(example, rng):
  """A preprocess that records which example it saw and one random draw."""
  return {"x": np.int64(example["x"]), "r": rng.integers(1 << 30)}


def source(n=N):
  return [{"x": i} for i in range(n)]


def run(it, n=None):
  out = []
  for batch in it:
    out.append({k: np.asarray(v).copy() for k, v in batch.items()})
    if n is not None and len(out) == n:
      break
  return out


def same(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def make(**kwargs):
  args = dict(batch_size=4, preprocess=tag, seed=3, shard_index=0, shard_count=1)
  return pipeline.make_pipeline(source(), **{**args, **kwargs})


@pytest.mark.parametrize("stop", [2, 5, 7])
def test_resume_from_saved_state_is_exact(stop):
  full = run(iter(make(num_epochs=2, drop_remainder=False)))
  it = iter(make(num_epochs=2, drop_remainder=False))
  head = run(it, stop)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
  resumed = iter(make(num_epochs=2, drop_remainder=False))
  resumed.set_state(state)
  assert same(head + run(resumed), full)


def test_epochs_are_permutations_shuffled_differently():
  batches = run(iter(make(num_epochs=2, drop_remainder=False, batch_size=11)))
  assert len(batches) == 4
  first = np.concatenate([b["x"] for b in batches[:2]])
  second = np.concatenate([b["x"] for b in batches[2:]])
  assert sorted(first) == sorted(second) == list(range(N))
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(N))
  # Augmentation draws differ between epochs for the same example, and are reproducible.
  r1 = dict(zip(first, np.concatenate([b["r"] for b in batches[:2]])))
  r2 = dict(zip(second, np.concatenate([b["r"] for b in batches[2:]])))
  assert all(r1[i] != r2[i] for i in range(N))
  assert same(batches, run(iter(make(num_epochs=2, drop_remainder=False, batch_size=11))))
  assert not same(batches, run(iter(make(num_epochs=2, drop_remainder=False, batch_size=11,
                                         seed=4))))


def test_no_shuffle_reads_in_order_and_infinite_repeat():
  batches = run(iter(make(shuffle=False, num_epochs=None)), 8)
  assert np.concatenate([b["x"] for b in batches]).tolist() == [i % N for i in range(32)]


@pytest.mark.parametrize("drop", [True, False])
def test_shards_partition_the_data(drop):
  shards = [np.concatenate([b["x"] for b in run(iter(make(
    num_epochs=1, batch_size=1, shard_index=i, shard_count=3, drop_remainder=drop)))])
    for i in range(3)]
  union = np.concatenate(shards)
  assert len(set(union.tolist())) == len(union)  # no overlap
  if drop:
    assert [len(s) for s in shards] == [N // 3] * 3
  else:
    assert sorted(union.tolist()) == list(range(N))
  # Hosts get different augmentation streams.
  r = [run(iter(make(num_epochs=1, shard_index=i, shard_count=2, shuffle=False)))[0]["r"]
       for i in range(2)]
  assert not np.array_equal(r[0], r[1])


def test_default_shards_follow_jax_processes():
  batches = run(iter(pipeline.make_pipeline(source(), batch_size=2, num_epochs=1, shuffle=False)))
  assert np.concatenate([b["x"] for b in batches]).tolist() == list(range(N))
  with pytest.raises(ValueError, match="shard_index"):
    make(shard_index=1, shard_count=None)
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    make(shard_index=3, shard_count=3)


def test_batch_shapes_padding_and_errors():
  batches = run(iter(make(num_epochs=1, drop_remainder=True)))
  assert len(batches) == N // 4
  assert batches[0]["x"].shape == (4,) and batches[0]["x"].dtype == np.int64
  padded = run(iter(make(num_epochs=1, drop_remainder=False, pad_remainder=True, shuffle=False)))
  assert len(padded) == 6 and all(b["x"].shape == (4,) for b in padded)
  assert padded[-1]["valid"].tolist() == [True, True, False, False]
  assert padded[-1]["x"].tolist() == [20, 21, 0, 0] and padded[0]["valid"].all()
  with pytest.raises(ValueError, match="pad_remainder"):
    make(pad_remainder=True)
  with pytest.raises(ValueError, match="batch_size"):
    make(batch_size=0)
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_pipeline([], batch_size=1, shard_index=0, shard_count=1)


@pytest.mark.parametrize("n,count", [(9, 2), (9, 4), (3, 4)])
def test_eval_shards_have_equal_batch_counts(n, count):
  """Every host runs the same number of (collective) eval steps; padding copies are invalid."""
  shards = [run(iter(pipeline.split_pipeline(source(n), tag, train=False, batch_size=4, seed=3,
                                             shard_index=i, shard_count=count)))
            for i in range(count)]
  assert len({len(s) for s in shards}) == 1
  valid = np.concatenate([b["x"][b["valid"]] for s in shards for b in s])
  assert sorted(valid.tolist()) == list(range(n))


def test_empty_shard_is_a_clear_error():
  for drop in (True, False):
    with pytest.raises(ValueError, match="shard 3 of shard_count=4 .* source has 2"):
      pipeline.make_pipeline(source(2), batch_size=1, shard_index=3, shard_count=4,
                             drop_remainder=drop)


def test_split_pipeline_trains_endlessly_and_evaluates_once_padded():
  """A task's splits: training is make_pipeline's endless shuffled stream, evaluation one padded
  ordered pass."""
  common = dict(batch_size=4, seed=3, shard_index=0, shard_count=1)
  train = run(iter(pipeline.split_pipeline(source(), tag, train=True, **common)), 8)
  assert same(train, run(iter(make(num_epochs=None, drop_remainder=True)), 8))  # past one epoch
  evaluated = run(iter(pipeline.split_pipeline(source(), tag, train=False, worker_count=2, **common)))
  assert np.concatenate([b["x"][b["valid"]] for b in evaluated]).tolist() == list(range(N))
  assert len(evaluated) == 6 and evaluated[-1]["valid"].tolist() == [True, True, False, False]


def test_skip_example_drops_only_that_example():
  from mmjax.data.pp.registry import BadExample, SkipExample

  def picky(example, rng):
    if example["x"] % 5 == 0:
      raise SkipExample(BadExample(f"record x={example['x']}: unlucky"))
    return tag(example, rng)

  batches = run(iter(make(preprocess=picky, num_epochs=1, shuffle=False, batch_size=3)))
  assert np.concatenate([b["x"] for b in batches]).tolist() == [
    i for i in range(N) if i % 5][: len(batches) * 3]

  def broken(example, rng):
    raise KeyError("a real bug")

  with pytest.raises(KeyError, match="a real bug"):
    run(iter(make(preprocess=broken, num_epochs=1)))


def test_one_worker_equals_in_process_and_resumes():
  want = run(iter(make(num_epochs=2, drop_remainder=False)))
  # Ship `tag` by value, so the worker does not import this module (and TFDS with it).
  cloudpickle.register_pickle_by_value(sys.modules[__name__])
  it = iter(make(num_epochs=2, drop_remainder=False, worker_count=1))
  try:
    head = run(it, 3)
    state = it.get_state()
    assert same(head + run(it), want)
    it.set_state(state)
    assert same(run(it), want[3:])
    # Batches depend on the worker count: a state resumes only under the one that saved it.
    with pytest.raises(ValueError, match="saved with worker_count=1, but this pipeline has worker_count=0"):
      iter(make(num_epochs=2, drop_remainder=False)).set_state(state)
    with pytest.raises(ValueError, match="saved with worker_count=0, but this pipeline has worker_count=1"):
      iter(make(num_epochs=2, drop_remainder=False, worker_count=1)).set_state({"next_index": 4})
  finally:
    it.close()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
