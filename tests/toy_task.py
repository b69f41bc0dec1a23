"""A tiny deterministic task for trainer tests (also run in subprocesses by the tests).

Its data goes through the library's pipeline, sharded by the shard_index/shard_count the trainer
passes: the multi-process tests check the library's per-host split, not one of the tests'.
"""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax.data.pipeline import make_pipeline
from mmjax.layers import dense
from mmjax.train.optim import path_str
from mmjax.train.tasks import TASKS


class ToyModel(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    self.enc = dense(8, 32, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.head = dense(32, 4, ("mlp", "vocab"), rngs=rngs, dtype=dtype)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x, train):
    return self.head(self.drop(jax.nn.relu(self.enc(x)), deterministic=not train))


def _examples(n, seed):
  """n examples: x (8,) float32, y the quadrant of (x0, x1), id the example's index."""
  x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
  return [{"x": x[i], "y": y[i], "id": np.int32(i)} for i in range(n)]


TRAIN = _examples(64, 0)  # 8 global batches of 8 an epoch: runs cross epochs
TEST = _examples(24, 123)


def stack(examples):
  """One batch of `examples`."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class ToyIterator:
  """The training stream (the library's pipeline over TRAIN); raises after `fail_after` batches."""

  def __init__(self, batch_size, fail_after=None, shard_index=0, shard_count=1):
    self.it = iter(make_pipeline(TRAIN, batch_size=batch_size, seed=0, shard_index=shard_index,
                                 shard_count=shard_count))
    self.i, self.fail_after, self.started = 0, fail_after, False

  def __iter__(self):
    return self

  def __next__(self):
    if not self.started:  # where this stream starts (after a resume: the restored position)
      FIRST_BATCH.append(self.i)
      self.started = True
    if self.fail_after is not None and self.i >= self.fail_after:
      raise RuntimeError("simulated crash")
    if SLOW_S:
      time.sleep(SLOW_S)
    batch = next(self.it)
    if self.i in NAN_AT:  # one poisoned value: the loss and every gradient become NaN
      batch["x"] = batch["x"].copy()
      batch["x"][0, 0] = np.nan
    self.i += 1
    return batch

  def get_state(self):
    return {"i": self.i, "pipeline": self.it.get_state()}

  def set_state(self, s):
    self.i = s["i"]
    self.it.set_state(s["pipeline"])


FAIL_AFTER = {"n": None}
NAN_AT: set[int] = set()  # batch indices that carry a NaN
FIRST_BATCH: list[int] = []  # the index of the first batch each training stream serves
SLOW_S = float(os.environ.get("TOY_SLOW_S", "0"))  # per batch, so a subprocess can be killed mid-run


@TASKS.register("toy_for_tests")
class ToyTask:
  eval_splits = ("test",)
  best_metric = "test/accuracy"

  def __init__(self, config):
    self.config = config

  def build_model(self, rngs):
    return ToyModel(rngs, jnp.dtype(self.config.get("model", {}).get("dtype", "float32")))

  def loss_fn(self, model, batch, train):
    # Hosts interleave the examples of a global batch (each takes every shard_count-th); in id
    # order each example meets the row of the dropout mask it meets in one process.
    order = jnp.argsort(batch["id"])
    logits = model(batch["x"][order], train).astype(jnp.float32)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][order][:, None], 1))
    heavy = int(self.config.get("model", {}).get("heavy_matmuls", 0))
    if heavy:  # a slower device step (asynchronous, unlike a host callback, which runs synchronously)
      m = jnp.full((512, 512), 1 / 512) * jnp.tanh(batch["x"][0, 0])
      m = jax.lax.fori_loop(0, heavy, lambda _, a: a @ m, m)
      loss = loss + 0.0 * m.sum()
    return loss, {}

  def eval_fn(self, model, batch):
    ok = (model(batch["x"], False).argmax(-1) == batch["y"]) & batch["valid"]
    return {"correct": ok.sum(), "count": batch["valid"].sum()}

  def summarize(self, s):
    return {"accuracy": s["correct"] / s["count"]}

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    if train:
      return ToyIterator(batch_size, FAIL_AFTER["n"], shard_index, shard_count)
    return make_pipeline(TEST, batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                         pad_remainder=True, shard_index=shard_index, shard_count=shard_count)


def leaves(tree):
  """{'params/enc/kernel/value': array, ...}: every leaf of a state by its path, on the host."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {path_str(p): np.asarray(x) for p, x in flat}


def assert_states_equal(a, b):
  """Two train states (or parts of them), bit for bit, leaf by leaf."""
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_states_close(a, b):
  """Final train states of two runs: parameters to float32 precision, optimizer moments too
  (a moment near zero is a sum of terms of both signs: its last bits need an absolute bound)."""
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    atol = 1e-8 if k.startswith("opt_state/") else 0
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=atol, err_msg=k)


def toy_config(steps=12, mesh=None, groups=()):
  return ml_collections.ConfigDict({
      "task": "toy_for_tests", "seed": 0,
      "mesh": mesh or {"data": 1, "fsdp": 1, "tensor": 1},
      "data": {"batch_size": 8, "eval_batch_size": 8},
      "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 1e-4,
                "clip_norm": 1.0, "groups": list(groups)},
      "train": {"steps": steps, "log_every": 2, "eval_every": 6, "checkpoint_every": 3, "keep": 2},
  })




if __name__ == "__main__":
  # python toy_task.py WORKDIR STEPS [PROCESS_ID NUM_PROCESSES PORT]
  import sys

  workdir, steps = sys.argv[1], int(sys.argv[2])
  if len(sys.argv) > 3:
    pid, n, port = map(int, sys.argv[3:6])
    jax.distributed.initialize(f"localhost:{port}", num_processes=n, process_id=pid)
  from mmjax.train import trainer

  cfg = toy_config(steps, {"data": -1, "fsdp": 1, "tensor": 1})
  cfg.train.checkpoint_every = 1
  cfg.train.update(json.loads(os.environ.get("TOY_TRAIN", "{}")))  # e.g. {"preemption_grace_s": 30}
  finalize_sleep = float(os.environ.get("TOY_FINALIZE_SLEEP_S", "0"))
  if finalize_sleep:  # a save stays in flight (written, not yet renamed) for this long
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):
      time.sleep(finalize_sleep)
      await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
  logging.basicConfig(level=logging.INFO)
  final = trainer.train(cfg, workdir, progress=False)
  final["first_batch"] = FIRST_BATCH[0] if FIRST_BATCH else None
  print("FINAL", json.dumps({k: final[k] for k in ("step", "preempted", "resumed_from", "first_batch")}),
        flush=True)
