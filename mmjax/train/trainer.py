"""The training loop: sharded init, jitted steps, evaluation, logging, Orbax checkpoints, resume.

Compiled entry points are pure functions of the train state, a dict pytree:
  {"params": nnx.State, "model_state": nnx.State (e.g. BatchNorm stats), "opt_state": ..., "step": int}
Dropout keys are re-derived each step from (seed, step), so a resumed run is exact without saving
RNG state.

Faults (see also `mmjax.train.checkpoint`):
- Non-finite loss or gradients: the jitted step never applies such an update (parameters, model
  and optimizer state stay as they were; the step counter advances past the batch). Config
  `train.nonfinite` chooses what follows: "skip" counts the step (`train/nonfinite_steps` in the
  metrics) and goes on; "stop" (the default) raises FloatingPointError before the next save, so
  the latest checkpoint stays the last good one. Either way the step and batch index are logged.
- SIGTERM (preemption): a checkpoint is written at the next step boundary and `train` returns
  normally, on every process at the same step when the signal reached only some; if that takes
  longer than `train.preemption_grace_s` seconds, the process exits with status 1 and the next
  start resumes from the last complete checkpoint. The host runs at most one step ahead of the
  device: asynchronous dispatch would otherwise queue a whole logging window of steps, which a
  SIGTERM (and `train.max_minutes`) had to wait for.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import io_paths, sharding
from mmjax.train import distributed, optim
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.tasks import TASKS
from mmjax.transfer.lora import apply_lora
from mmjax.transfer.model_init import check_model_init, load_model_init

log = logging.getLogger("mmjax.train")

NONFINITE_POLICIES = ("skip", "stop")


# ---------------------------------------------------------------------------------------------
# Setup: mesh, task, abstract state and its shardings.
# ---------------------------------------------------------------------------------------------
class Setup:
  """Everything derived from a config before any array exists: mesh, task, shardings, step fns."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
               workdir: io_paths.PathLike | None = None):
    """`mesh`: the devices to shard over (default: `config.mesh` over `jax.devices()`), e.g. the
    TPU devices of a topology that `mmjax.train.plan` compiles for without running. `workdir`:
    the run's folder, handed to a task that keeps what its data decides there (`make_task`)."""
    self.config = config
    self.mesh = sharding.make_mesh(dict(config.mesh)) if mesh is None else mesh
    self.rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], (list, tuple)) else r[1])
                       for r in config.get("rules", sharding.DEFAULT_RULES))
    self.task = make_task(config, workdir)
    seed = int(config.seed)
    lora = config.get("lora")

    def ctor():
      model = self.task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
      if lora:  # {pattern, rank, alpha}: adapters on the matching Dense layers
        apply_lora(model, lora["pattern"], rank=int(lora["rank"]), alpha=lora.get("alpha"),
                   rngs=nnx.Rngs(params=seed + 2))
      return model

    self._ctor = ctor
    abstract_model = nnx.eval_shape(ctor)
    self.abstract_model = abstract_model
    # Pretrained weights (config.model_init): every name and shape checked now, from the files'
    # headers, before anything compiles.
    self.model_init = config.get("model_init") or None
    check_model_init(self.model_init, abstract_model)
    self.graphdef, abs_params, abs_rng, abs_mstate = nnx.split(abstract_model, nnx.Param, nnx.RngState, ...)
    self.total_steps = int(config.train.steps)
    self.nonfinite = config.train.get("nonfinite", "stop")
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f"train.nonfinite: expected one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
    self.tx = optim.make_optimizer(config.optim, abs_params, self.total_steps)
    self.frozen = optim.frozen_mask(config.optim, abs_params)  # leaves the step does not differentiate
    self.num_params = optim.count_params(abs_params)
    replicated = NamedSharding(self.mesh, P())
    param_sh = sharding.param_shardings(abs_params, self.mesh, self.rules)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    # Optimizer state shaped like the parameters (Adam's moments) takes their shardings; the rest
    # (counts) is replicated. optax finds those leaves by structure: XLA propagation cannot, as
    # zero-initialised moments do not depend on the parameters.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # a frozen parameter's (empty) state
    opt_sh = optax.tree_utils.tree_map_params(
        self.tx, lambda x, s: x if masked(x) else s, abs_opt, param_sh,
        transform_non_params=lambda _: replicated, is_leaf=masked)
    self.state_shardings = {
        "params": param_sh,
        "model_state": jax.tree.map(lambda _: replicated, abs_mstate),
        "opt_state": opt_sh,
        "step": replicated,
    }
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        {"params": abs_params, "model_state": abs_mstate, "opt_state": abs_opt,
         "step": jax.ShapeDtypeStruct((), jnp.int32)},
        self.state_shardings)
    self.rng_state = abs_rng  # abstract; concrete keys are made inside each step

  # -- arrays ----------------------------------------------------------------------------------
  def init_state(self) -> dict[str, Any]:
    """Initialises parameters and optimizer state directly in their shardings."""
    tx, ctor = self.tx, self._ctor

    def init():
      model = ctor()
      _, params, _, mstate = nnx.split(model, nnx.Param, nnx.RngState, ...)
      return {"params": params, "model_state": mstate, "opt_state": tx.init(params),
              "step": jnp.zeros((), jnp.int32)}

    with self.context():
      state = jax.jit(init, out_shardings=self.state_shardings)()
    if self.model_init:  # outside jit: each tensor placed on its sharding, never a compile-time constant
      state["params"] = load_model_init(self.model_init, self.abstract_model, state.pop("params"))
    return state

  def context(self):
    return _Both(jax.set_mesh(self.mesh), sharding.axis_rules(self.rules, self.mesh))

  def batch_sharding(self, x: np.ndarray) -> NamedSharding:
    names = ("batch",) + (None,) * (np.ndim(x) - 1)
    return NamedSharding(self.mesh, sharding.logical_to_spec(names, self.rules, self.mesh))

  def batch_shards(self) -> int:
    """How many shards the mesh splits the batch axis into: global batch sizes divide by it."""
    axes = self.batch_sharding(np.zeros(1)).spec[0] or ()
    return int(np.prod([self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles per-host numpy batches into global arrays sharded over the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(v), np.asarray(v))
            for k, v in local.items()}

  def model(self, state: dict[str, Any], step: jax.Array | int = 0) -> nnx.Module:
    """A live model from the state, its dropout keys derived from (seed, step)."""
    rng_state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                             else jax.random.key(0), self.rng_state)
    model = nnx.merge(self.graphdef, state["params"], rng_state, state["model_state"], copy=True)
    key = jax.random.fold_in(jax.random.key(int(self.config.seed) + 1), step)
    nnx.reseed(model, dropout=key)
    return model

  # -- compiled steps --------------------------------------------------------------------------
  def make_train_step(self):
    task, tx = self.task, self.tx
    frozen = self.frozen

    def train_step(state, batch):
      def loss_fn(params):
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        model = self.model({**state, "params": params}, state["step"])
        loss, metrics = task.loss_fn(model, batch, True)
        _, _, _, mstate = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return loss, (metrics, mstate)

      (loss, (metrics, mstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/Inf gradient makes the norm so
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32)}
      new = {"params": keep(params, state["params"]), "model_state": keep(mstate, state["model_state"]),
             "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
      return new, metrics

    return jax.jit(train_step, in_shardings=(self.state_shardings, None),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def make_eval_step(self):
    task = self.task

    def eval_step(state, batch):
      return task.eval_fn(self.model(state), batch)

    # Replicated outputs: every process can read per-example rows (see `evaluate`).
    return jax.jit(eval_step, in_shardings=(self.state_shardings, None),
                   out_shardings=NamedSharding(self.mesh, P()))


def make_task(config: ml_collections.ConfigDict, workdir: io_paths.PathLike | None = None):
  """`TASKS[config.task](config)`, given `workdir=` when its constructor takes one."""
  cls = TASKS.get(config.task)
  if workdir is not None and "workdir" in inspect.signature(cls).parameters:
    return cls(config, workdir=workdir)
  return cls(config)


class _Both:
  """Enters two context managers as one."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def __enter__(self):
    self.a.__enter__()
    self.b.__enter__()

  def __exit__(self, *exc):
    self.b.__exit__(*exc)
    self.a.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------
def evaluate(setup: Setup, state: dict[str, Any], eval_step, split: str) -> dict[str, float]:
  """Runs `split` once; padding rows are masked with `valid`.

  Each host's batches are padded to a size the batch's mesh axes divide, so any eval_batch_size
  works. The eval step is collective: with several processes all run it equally often, a host
  whose shard is done (shards can differ, e.g. by examples a preprocess skips) feeding fully
  masked batches until every host is. Scalar outputs of `eval_fn` are summed over batches; array
  outputs (per-example rows with a leading batch axis, e.g. decoded tokens or embeddings) are
  concatenated, padding included.
  """
  cfg = setup.config
  count, index = jax.process_count(), jax.process_index()
  local_bs = int(cfg.data.eval_batch_size) // count
  multiple = math.lcm(setup.batch_shards(), count) // count  # of the local batch size
  size = -(-local_bs // multiple) * multiple
  sums: dict[str, Any] = {}
  data = iter(setup.task.dataset(split, train=False, batch_size=local_bs, shard_index=index,
                                 shard_count=count))
  has_batch, template = [True], None
  more = distributed.StopVote(lambda: has_batch[0], lambda: False)  # its "any process" flag
  while True:
    batch = next(data, None)
    has_batch[0] = batch is not None
    if not more.result(more.cast())[0]:  # no host has a batch left
      break
    if batch is None:  # another host's shard goes on: a real batch's shapes, all rows masked
      template = _other_shards_batch(setup, split, local_bs, size) if template is None else template
      batch = {**template, "valid": np.zeros(size, bool)}
    else:
      batch = template = _pad(batch, size)
    with setup.context():
      out = jax.device_get(eval_step(state, setup.global_batch(batch)))
    for k, v in out.items():
      if np.ndim(v):
        sums.setdefault(k, []).append(np.asarray(v))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  sums = {k: np.concatenate(v) if isinstance(v, list) else v for k, v in sums.items()}
  return {f"{split}/{k}": v for k, v in setup.task.summarize(sums).items()}


def _other_shards_batch(setup: Setup, split: str, local_bs: int, size: int) -> dict[str, np.ndarray]:
  """The first batch of another host's shard of `split`, padded to `size`: the shapes of the
  masked batches of a host whose own shard has none."""
  count = jax.process_count()
  for i in range(count):
    if i != jax.process_index():
      data = setup.task.dataset(split, train=False, batch_size=local_bs, shard_index=i, shard_count=count)
      batch = next(iter(data), None)
      if batch is not None:
        return _pad(batch, size)
  raise RuntimeError(f"evaluation of {split!r}: no shard has a batch, though another host reported one")


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short batch to `size` by repeating its last example; `valid` marks real ones."""
  n = len(next(iter(batch.values())))
  if "valid" not in batch:
    batch = {**batch, "valid": np.ones(n, bool)}
  if n == size:
    return batch
  pad = {k: np.concatenate([v, np.repeat(v[-1:], size - n, 0)]) for k, v in batch.items()}
  pad["valid"][n:] = False
  return pad


# ---------------------------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------------------------
_TENSORBOARDX_URLS = ("gs://", "s3://")  # it takes other URLs for local paths


class MetricWriter:
  """Metrics to metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow).

  `resumed_from`: the step a run restarts from. Rows a previous process logged after it (steps
  that are now run again) are dropped from metrics.jsonl and purged from TensorBoard, so that a
  resumed run's curves hold each step once. A bucket cannot append: there metrics.jsonl is
  rewritten whole at each write (one row per logged step keeps it small).
  """

  def __init__(self, workdir: io_paths.PathLike, enabled: bool = True, resumed_from: int | None = None):
    self.enabled = enabled
    workdir = io_paths.as_path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    self._rows: list[dict] | None = None  # in a bucket: every row, to rewrite the object whole
    if enabled:
      from tensorboardX import SummaryWriter
      bucket = io_paths.is_url(workdir)
      rows = read_metrics(workdir) if resumed_from is not None or bucket else []
      kept = [r for r in rows if resumed_from is None or r["step"] <= resumed_from]
      if len(kept) < len(rows):
        io_paths.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      if bucket:
        self._rows = kept
      purge = None if resumed_from is None else resumed_from + 1
      tb_dir = os.fspath(workdir / "tb")
      if bucket and not tb_dir.startswith(_TENSORBOARDX_URLS):
        log.warning("no TensorBoard events for %s: tensorboardX writes local paths and %s URLs "
                    "only; the metrics are in %s", workdir, ", ".join(_TENSORBOARDX_URLS), self.path)
      else:
        self.tb = SummaryWriter(tb_dir, purge_step=purge)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    if self._rows is not None:
      self._rows.append(row)
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self._rows))
    else:
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if self.tb is None:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: io_paths.PathLike) -> list[dict[str, float]]:
  path = io_paths.as_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: io_paths.PathLike) -> str | None:
  """Training curves (loss and every eval metric) as curves.png in the workdir."""
  rows = read_metrics(workdir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = sorted({k for r in rows for k in r if k not in ("step", "time")})
  train_keys = [k for k in keys if k.startswith("train/")]
  eval_keys = [k for k in keys if not k.startswith("train/") and k != "epoch"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, group, title in ((axes[0], train_keys, "training"), (axes[1], eval_keys, "evaluation")):
    for k in group:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      if pts:
        ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    if group:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = io_paths.as_path(workdir) / "curves.png"
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
class _Preempted:
  """Set by SIGTERM: the loop saves a checkpoint at the next step boundary and exits cleanly.

  A watchdog ends the process (status 1) if that has not happened `grace_s` seconds after the
  signal, so a preempted job never outlives its grace period in the middle of a write it cannot
  finish; the partial save is then discarded on the next start. With several processes the loop
  stops where all agree (`distributed.StopVote`); a process that got no signal itself is told by
  `stop` and keeps the same watchdog.
  """

  def __init__(self, grace_s: float):
    self.flag = False
    self.grace_s = float(grace_s)
    self._old = None
    self._timer: threading.Timer | None = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    self.stop("SIGTERM")

  def stop(self, why: str):
    """Sets the flag and starts the watchdog (once)."""
    if self.flag:
      return
    self.flag = True
    log.warning("%s: saving a checkpoint at the next step boundary (grace %.0f s)", why, self.grace_s)
    self._timer = threading.Timer(self.grace_s, self._expired)
    self._timer.daemon = True
    self._timer.start()

  def _expired(self):
    log.error("SIGTERM: no checkpoint written within train.preemption_grace_s=%.0f s; exiting; "
              "the next start resumes from the last complete checkpoint", self.grace_s)
    logging.shutdown()
    os._exit(1)

  def __exit__(self, *exc):
    if self._timer is not None:
      self._timer.cancel()
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _nonfinite_steps(pending: list[tuple[int, dict]]) -> list[int]:
  """Steps among `pending` whose loss or gradients were not finite (one small host transfer)."""
  flags = jax.device_get([m["nonfinite"] for _, m in pending])
  return [s for (s, _), bad in zip(pending, flags) if bad]


def _stopped(step: int, last_good: int | None) -> FloatingPointError:
  return FloatingPointError(
      f"non-finite loss or gradients at step {step} (batch index {step - 1} of the training stream); "
      f"stopped by train.nonfinite='stop' without saving; the last good checkpoint is step {last_good}")


def _window_average(host: list[dict]) -> dict[str, float]:
  """Per-key mean over the steps of a logging window, leaving out skipped (non-finite) steps."""
  good = [m for m in host if not m["nonfinite"]]
  avg = {f"train/{k}": float(np.mean([m[k] for m in good])) for k in host[0] if k != "nonfinite"} if good else {}
  avg["train/nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host))
  return avg


def _every(tcfg: ml_collections.ConfigDict, key: str) -> int:
  """`train.<key>`, a period in steps; a ValueError naming it unless a positive whole number."""
  v = tcfg.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
    raise ValueError(f"train.{key}={v!r}: expected a positive whole number of steps (the last step "
                     "always logs, evaluates and saves: a value >= train.steps does it there only)")
  return int(v)


def train(config: ml_collections.ConfigDict, workdir: io_paths.PathLike, *,
          progress: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir` (a local path or a bucket URL such as `gs://bucket/run`),
  resuming from its latest complete, readable checkpoint.

  Returns the final metrics, with "step", "num_params", "nonfinite_steps" (skipped in this run),
  "resumed_from" (the step of the checkpoint this run restored, None when it started afresh)
  and "preempted" (True when SIGTERM ended the run early). On a workdir whose run is complete
  nothing is trained and the final metrics are those logged at its last step.
  """
  from tqdm.auto import tqdm

  workdir = io_paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  tcfg = config.train
  log_every, eval_every, ckpt_every = (_every(tcfg, k) for k in ("log_every", "eval_every", "checkpoint_every"))
  setup = Setup(config, workdir=workdir)
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  ckpt = Checkpointer(workdir / "checkpoints", keep=int(tcfg.get("keep", 3)),
                      best_metric=setup.task.best_metric, cleanup=True)
  bs = int(config.data.batch_size)
  if bs % jax.process_count():
    raise ValueError(f"data.batch_size={bs} must divide by the number of processes {jax.process_count()}")
  if bs % setup.batch_shards():
    raise ValueError(f"data.batch_size={bs} must divide by {setup.batch_shards()}, the number of shards "
                     f"of the batch axis on the mesh {dict(setup.mesh.shape)}")
  train_iter = iter(setup.task.dataset("train", train=True, batch_size=bs // jax.process_count(),
                                       shard_index=jax.process_index(),
                                       shard_count=jax.process_count()))
  restored = ckpt.restore_latest(setup.abstract_state)
  if restored is not None:
    start, state, data_state = restored
    if data_state is not None and hasattr(train_iter, "set_state"):
      train_iter.set_state(data_state)
    log.info("resumed from step %d", start)
  else:
    state = setup.init_state()
    start = 0
  writer = MetricWriter(workdir, enabled=is_main, resumed_from=start if restored is not None else None)
  train_step, eval_step = setup.make_train_step(), setup.make_eval_step()
  total = setup.total_steps
  max_minutes = tcfg.get("max_minutes")  # wall-clock budget from here, compiles included
  deadline = time.perf_counter() + 60 * float(max_minutes) if max_minutes else None
  final: dict[str, Any] = {}
  pending: list[tuple[int, dict]] = []  # (step, on-device metrics) since the last log row
  skipped = 0
  t0, n0 = time.perf_counter(), start
  bar = tqdm(total=total, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
             desc=config.get("name", config.task))
  try:
    with _Preempted(float(tcfg.get("preemption_grace_s", 60.0))) as preempt:
      past_deadline = lambda: bool(deadline) and time.perf_counter() > deadline
      stop = distributed.StopVote(lambda: preempt.flag, past_deadline)
      step, preempted = start, False
      while step < total:
        vote = stop.cast()  # every process stops at the same step, saving the same checkpoint
        with setup.context():
          state, metrics = train_step(state, setup.global_batch(next(train_iter)))
        if pending:  # at most two steps in flight, so SIGTERM, max_minutes and the bar see the device's step
          jax.block_until_ready(pending[-1][1])
        step += 1
        preempted, out_of_time = stop.result(vote)  # read once; a later signal is handled at the next step
        if out_of_time:
          total = step  # train.max_minutes reached: this step's log, eval and save follow
        if preempted:
          preempt.stop("SIGTERM on another process")  # no-op where the signal came
        pending.append((step, metrics))
        bar.update(1)
        save = step % ckpt_every == 0 or step == total or preempted
        if save and setup.nonfinite == "stop":
          bad = _nonfinite_steps(pending)
          if bad:  # before saving: the latest checkpoint stays the last good one
            raise _stopped(bad[0], ckpt.latest_step())
        if step % log_every == 0 or step == total:
          host = jax.device_get([m for _, m in pending])
          for (s, _), m in zip(pending, host):
            if m["nonfinite"]:
              log.warning("non-finite loss or gradients at step %d (batch index %d of the training "
                          "stream): update skipped (train.nonfinite=%r)", s, s - 1, setup.nonfinite)
              if setup.nonfinite == "stop":
                raise _stopped(s, ckpt.latest_step())
          pending = []
          dt = time.perf_counter() - t0
          avg = _window_average(host)
          skipped += int(avg["train/nonfinite_steps"])
          avg["train/examples_per_s"] = (step - n0) * bs / max(dt, 1e-9)
          t0, n0 = time.perf_counter(), step
          writer.write(step, avg)
          if "train/loss" in avg:
            bar.set_postfix(loss=f"{avg['train/loss']:.4f}", ex_s=f"{avg['train/examples_per_s']:.0f}")
          final.update(avg)
        evals = {}
        if preempted and step < total and step % eval_every == 0:  # the save must fit the grace period
          log.warning("SIGTERM: evaluation at step %d skipped to save within train.preemption_grace_s", step)
        elif step % eval_every == 0 or step == total:
          for split in setup.task.eval_splits:
            evals.update(evaluate(setup, state, eval_step, split))
          writer.write(step, evals)
          final.update(evals)
          if evals:  # no evaluation split: nothing to print (the bar's postfix shows the loss)
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
          if is_main:
            plot_curves(workdir)
        if save:
          data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
          ckpt.save(step, state, data_state, metrics=evals or None, force=True)
        if preempted:
          ckpt.wait()
          log.warning("SIGTERM: saved step %d, exiting", step)
          break
  finally:  # an exception still finalises checkpoints already written
    bar.close()
    ckpt.close()
    writer.close()
  if step == start and restored is not None:  # nothing left to train: that step's logged metrics
    for row in read_metrics(workdir):
      if row["step"] == step:
        final.update({k: v for k, v in row.items() if k not in ("step", "time")})
  final["step"] = step
  final["num_params"] = setup.num_params
  final["nonfinite_steps"] = skipped
  final["resumed_from"] = start if restored is not None else None
  final["preempted"] = preempted  # agreed: the same on every process
  return final
