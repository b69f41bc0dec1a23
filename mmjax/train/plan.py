"""Plan a run without training: parameters, optimizer state and activation memory per device, and
the compiled FLOPs of one train step, for a config and its mesh.

  python -m mmjax.train.plan --config configs/vqa_sort_of_clevr.py:size=small [--config.mesh.data=8]
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from mmjax.train.trainer import Setup


def _bytes_per_device(tree: Any) -> int:
  """Bytes of the largest per-device shard summed over leaves of an abstract sharded tree."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def plan(config) -> dict[str, Any]:
  """Compiles (but does not run) one train step and reports its memory and FLOPs."""
  setup = Setup(config)
  bs = int(config.data.batch_size)
  local = next(iter(setup.task.dataset("train", train=True, batch_size=bs, shard_index=0, shard_count=1)))
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=setup.batch_sharding(v))
           for k, v in local.items()}
  step = setup.make_train_step()
  with setup.context():
    compiled = step.lower(setup.abstract_state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  st = setup.abstract_state
  out = {
      "devices": int(setup.mesh.size),
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "parameters": setup.num_params,
      "param_bytes_per_device": _bytes_per_device(st["params"]),
      "opt_state_bytes_per_device": _bytes_per_device(st["opt_state"]),
      "flops_per_step": float(cost.get("flops", float("nan"))) if cost else float("nan"),
      "global_batch": {k: list(v.shape) for k, v in batch.items()},
  }
  if mem is not None:
    out["temp_bytes_per_device"] = int(getattr(mem, "temp_size_in_bytes", 0))
    out["argument_bytes_per_device"] = int(getattr(mem, "argument_size_in_bytes", 0))
  return out


def main(argv):
  del argv
  import mmjax.tasks  # noqa: F401  (registers the tasks)
  from absl import flags
  print(json.dumps(plan(flags.FLAGS.config), indent=2))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':args'.")
  app.run(main)
