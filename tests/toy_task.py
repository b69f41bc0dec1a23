"""A tiny deterministic task for trainer tests (also run in subprocesses by the tests)."""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax.layers import dense
from mmjax.train.tasks import TASKS


class ToyModel(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    self.enc = dense(8, 32, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.head = dense(32, 4, ("mlp", "vocab"), rngs=rngs, dtype=dtype)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x, train):
    return self.head(self.drop(jax.nn.relu(self.enc(x)), deterministic=not train))


class ToyIterator:
  """A deterministic, checkpointable stream of batches; raises after `fail_after` batches."""

  def __init__(self, batch_size, fail_after=None, shard_index=0, shard_count=1):
    self.i, self.bs, self.fail_after = 0, batch_size, fail_after
    self.shard_index, self.shard_count = shard_index, shard_count

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_after is not None and self.i >= self.fail_after:
      raise RuntimeError("simulated crash")
    if SLOW_S:
      time.sleep(SLOW_S)
    rng = np.random.default_rng(self.i)
    x = rng.normal(size=(self.bs * self.shard_count, 8)).astype(np.float32)
    if self.i in NAN_AT:  # one poisoned value: the loss and every gradient become NaN
      x[0, 0] = np.nan
    self.i += 1
    x = x[self.shard_index * self.bs:(self.shard_index + 1) * self.bs]  # this host's rows
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


FAIL_AFTER = {"n": None}
NAN_AT: set[int] = set()  # batch indices that carry a NaN
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
    logits = model(batch["x"], train).astype(jnp.float32)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))
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
    rng = np.random.default_rng(123)
    x = rng.normal(size=(24, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
    g = batch_size * shard_count  # global eval batch; this host takes its slice of each
    return [{"x": x[i + shard_index * batch_size:i + (shard_index + 1) * batch_size],
             "y": y[i + shard_index * batch_size:i + (shard_index + 1) * batch_size]}
            for i in range(0, 24, g)]


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
  print("FINAL", json.dumps({k: final[k] for k in ("step", "preempted")}), flush=True)
