"""The trainer's own train step around a model and loss that a benchmark gives in code.

`make_setup(model, loss, ...)` returns a `mmjax.train.trainer.Setup` whose task is `CodeTask`:
the benchmarks then time what training runs (the trainer's sharded init and its compiled step:
value and gradient, global norm, the non-finite guard, AdamW from `mmjax.train.optim`), not a
step of their own. The optimizer is AdamW at a constant learning rate without clipping, as the
PyTorch side of `throughput.py` has it; the library decays matrices and kernels only (torch
decays every parameter: the same FLOPs to a few elementwise ops). Batches come from the script.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
from flax import nnx

from mmjax import sharding
from mmjax.train.tasks import TASKS
from mmjax.train.trainer import Setup

ModelFn = Callable[[nnx.Rngs], nnx.Module]
LossFn = Callable[[nnx.Module, dict[str, jax.Array], bool], jax.Array]


@TASKS.register("bench_code")
class CodeTask:
  """A task whose model and loss are `config.code.model` (rngs -> module) and `config.code.loss`
  ((model, batch, deterministic) -> scalar); it has no data and no evaluation."""

  eval_splits: tuple[str, ...] = ()
  best_metric = "loss"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.config.code.model(rngs)

  def loss_fn(self, model, batch, train):
    del train  # the script chooses: with dropout 0 both modes compute the same loss
    return self.config.code.loss(model, batch, self.config.code.deterministic), {}


def make_setup(model: ModelFn, loss: LossFn, *, lr: float, weight_decay: float,
               deterministic: bool = True, devices: Sequence[jax.Device] | None = None) -> Setup:
  """A one-device `Setup` (the first of `devices`, default `jax.devices()`) training `model`."""
  c = ml_collections.ConfigDict()
  c.task = "bench_code"
  c.seed = 0
  c.code = ml_collections.ConfigDict({"model": model, "loss": loss, "deterministic": deterministic})
  c.optim = ml_collections.ConfigDict({"lr": lr, "warmup_steps": 0, "schedule": "constant",
                                       "weight_decay": weight_decay, "clip_norm": 0.0,
                                       "grad_accum": 1, "groups": []})
  c.train = ml_collections.ConfigDict({"steps": 1})  # the schedule is constant: no length
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  devices = list(jax.devices() if devices is None else devices)[:1]
  return Setup(c, mesh=sharding.make_mesh(dict(c.mesh), devices))


def compile_step(setup: Setup, state: dict[str, Any], batch: dict[str, Any],
                 compiler_options: dict[str, Any] | None = None):
  """The trainer's train step compiled for `state` and `batch` (arrays or ShapeDtypeStructs)."""
  with setup.context():
    return setup.make_train_step().lower(state, batch).compile(compiler_options)


def flops(compiled_or_lowered) -> float:
  """FLOPs from XLA's cost analysis of a compiled or lowered computation (nan if unknown)."""
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", float("nan"))) if cost else float("nan")
