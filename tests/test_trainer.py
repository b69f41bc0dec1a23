"""Trainer: exact resume, sharded == single-device, frozen groups, per-group learning rates."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.train import optim, trainer
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.optim import path_str
from toy_task import (FAIL_AFTER, FIRST_BATCH, TEST, ToyIterator, ToyTask, assert_states_close, assert_states_equal,
                      leaves, toy_config)


def _state(workdir, config):
  """The latest checkpoint's train state and data state."""
  setup = trainer.Setup(config)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, data = ck.restore(ck.latest_step(), setup.abstract_state)
  ck.close()
  return jax.device_get(state), data


def _logged(workdir, key):
  return [r[key] for r in trainer.read_metrics(workdir) if key in r]


def test_resume_after_crash_is_bitwise_identical(tmp_path):
  cfg = toy_config()
  straight = trainer.train(cfg, str(tmp_path / "a"), progress=False)
  assert straight["resumed_from"] is None
  FAIL_AFTER["n"] = 7  # crashes while fetching batch 8; checkpoint at step 6 exists
  try:
    with pytest.raises(RuntimeError, match="simulated crash"):
      trainer.train(cfg, str(tmp_path / "b"), progress=False)
  finally:
    FAIL_AFTER["n"] = None
  resumed = trainer.train(cfg, str(tmp_path / "b"), progress=False)
  # Resumed, not restarted: from the checkpoint at 6, the data stream at batch index 6 (step 7's).
  assert resumed["resumed_from"] == 6 and FIRST_BATCH[-1] == 6
  sa, da = _state(str(tmp_path / "a"), cfg)
  sb, db = _state(str(tmp_path / "b"), cfg)
  assert_states_equal(sa, sb)
  assert da == db and da["i"] == 12
  assert straight["test/accuracy"] == resumed["test/accuracy"]
  assert straight["train/loss"] == resumed["train/loss"]
  assert os.path.exists(tmp_path / "a" / "curves.png")
  rows = trainer.read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8, 10, 12]


def test_sharded_8_devices_equals_single_device(tmp_path):
  """Data x FSDP x tensor parallel on 8 devices trains as one device does: every step's loss and
  gradient norm (a gradient summed over shards instead of averaged shows here: AdamW and
  clipping would hide its scale in the parameters), then the final state, leaf by leaf."""
  cube = {"data": 2, "fsdp": 2, "tensor": 2}
  runs = {}
  for name, mesh in (("one", None), ("eight", cube)):
    cfg = toy_config(6, mesh)
    cfg.train.log_every = 1
    runs[name] = trainer.train(cfg, str(tmp_path / name), progress=False)
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  assert len(_logged(one, "train/grad_norm")) == 6
  for key in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose(_logged(eight, key), _logged(one, key), rtol=1e-5, err_msg=key)
  assert_states_close(_state(eight, toy_config(6))[0], _state(one, toy_config(6))[0])
  assert runs["one"]["test/accuracy"] == runs["eight"]["test/accuracy"]
  setup = trainer.Setup(toy_config(6, cube))
  assert setup.state_shardings["params"]["enc"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_frozen_group_does_not_change_and_lr_ratios_hold(tmp_path):
  groups = [{"name": "enc", "pattern": "enc/.*", "freeze": True}]
  cfg = toy_config(3, groups=groups)
  init = leaves(trainer.Setup(cfg).init_state()["params"])
  trainer.train(cfg, str(tmp_path / "f"), progress=False)
  trained = leaves(_state(str(tmp_path / "f"), cfg)[0]["params"])
  frozen = [k for k in init if k.startswith("enc/")]
  assert sorted(frozen) == ["enc/bias/value", "enc/kernel/value"] and init.keys() == trained.keys()
  for k in init:  # the frozen group to the bit, every other parameter moved
    if k in frozen:
      np.testing.assert_array_equal(trained[k], init[k], err_msg=k)
    else:
      assert not np.array_equal(trained[k], init[k]), k
  # Per-group learning rates: with SGD-like first Adam steps (|update| = lr), ratios follow lr.
  params = {"enc": {"kernel": jnp.ones((3, 3))}, "head": {"kernel": jnp.ones((3, 3))}}
  tx = optim.make_optimizer({"lr": 1e-2, "groups": [{"name": "enc", "pattern": "enc/.*", "lr": 1e-4}]}, params, 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  upd, _ = tx.update(grads, tx.init(params), params)
  ratio = float(jnp.abs(upd["head"]["kernel"]).mean() / jnp.abs(upd["enc"]["kernel"]).mean())
  np.testing.assert_allclose(ratio, 100.0, rtol=1e-3)


def test_frozen_gradients_are_not_taken_nor_clipped_with():
  """The step stops gradients at frozen leaves: grad_norm (what clipping uses) covers only the
  trainable ones, so |g|^2 with enc frozen + |g|^2 with head frozen = |g|^2 with nothing frozen."""
  norms = {}
  for frozen in ("", "enc", "head"):
    groups = [{"name": frozen, "pattern": f"{frozen}/.*", "freeze": True}] if frozen else []
    setup = trainer.Setup(toy_config(3, groups=groups))
    with setup.context():
      _, metrics = setup.make_train_step()(setup.init_state(), setup.global_batch(next(ToyIterator(8))))
    norms[frozen] = float(metrics["grad_norm"])
  assert 0 < norms["enc"] < norms[""] and 0 < norms["head"] < norms[""]
  np.testing.assert_allclose(norms["enc"] ** 2 + norms["head"] ** 2, norms[""] ** 2, rtol=1e-5)


def test_optimizer_config_errors():
  params = {"a": jnp.ones(2)}
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer({"lr": 1.0, "groups": [{"name": "x", "pattern": "zzz"}]}, params, 5)
  with pytest.raises(ValueError, match="unknown keys"):
    optim.make_optimizer({"lr": 1.0, "groups": [{"name": "x", "pattern": "a", "lrr": 2}]}, params, 5)
  with pytest.raises(ValueError, match="schedule"):
    optim.schedule(1.0, total_steps=5, kind="exp")


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Steps logged after the restored checkpoint by the crashed process are run again: their old
  rows are dropped, so metrics.jsonl holds each step once, with the rerun's values."""
  cfg = toy_config()
  trainer.train(cfg, str(tmp_path / "a"), progress=False)
  FAIL_AFTER["n"] = 4  # step 4 is logged, the checkpoint is at step 3, the crash fetches batch 5
  try:
    with pytest.raises(RuntimeError, match="simulated crash"):
      trainer.train(cfg, str(tmp_path / "b"), progress=False)
  finally:
    FAIL_AFTER["n"] = None
  crashed = trainer.read_metrics(str(tmp_path / "b"))
  assert [r["step"] for r in crashed if "train/loss" in r] == [2, 4]
  resumed = trainer.train(cfg, str(tmp_path / "b"), progress=False)
  assert resumed["resumed_from"] == 3 and FIRST_BATCH[-1] == 3
  rows = {d: trainer.read_metrics(str(tmp_path / d)) for d in "ab"}
  steps = lambda rs: [r["step"] for r in rs if "train/loss" in r]
  assert steps(rows["b"]) == steps(rows["a"]) == [2, 4, 6, 8, 10, 12]
  # Clock readings differ; so does the row at step 4, the mean over the one step run since the
  # restart at 3 (steps 3-4 in the straight run). Every other row is equal.
  timeless = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "train/examples_per_s")}
                         for r in rs if r["step"] != 4]
  assert timeless(rows["b"]) == timeless(rows["a"])


def test_the_host_runs_at_most_one_step_ahead_of_the_device(tmp_path, monkeypatch):
  # Asynchronous dispatch let the loop queue a whole logging window of steps; a SIGTERM (read at
  # the host's step) then waited for all of them: 40 MiniLM steps of 4 s overran the 60 s grace.
  in_flight = []
  make = trainer.Setup.make_train_step

  def counting(self):
    step, outputs = make(self), []

    def wrapped(state, batch):
      in_flight.append(sum(not x.is_ready() for x in outputs))  # earlier steps still computing
      state, metrics = step(state, batch)
      outputs.append(metrics["loss"])
      return state, metrics
    return wrapped

  monkeypatch.setattr(trainer.Setup, "make_train_step", counting)
  config = toy_config(24)
  config.model = {"heavy_matmuls": 40}
  config.train.update(log_every=24, eval_every=24, checkpoint_every=24)
  trainer.train(config, str(tmp_path), progress=False)
  assert len(in_flight) == 24 and max(in_flight) <= 1, in_flight


def test_training_a_finished_workdir_again_returns_its_final_metrics(tmp_path):
  first = trainer.train(toy_config(6), str(tmp_path), progress=False)
  streams = len(FIRST_BATCH)
  again = trainer.train(toy_config(6), str(tmp_path), progress=False)
  assert again["step"] == 6 and again["resumed_from"] == 6 and not again["preempted"]
  assert len(FIRST_BATCH) == streams  # not one batch read
  keys = [k for k in first if k.startswith(("test/", "train/")) and k != "train/examples_per_s"]
  assert "test/accuracy" in keys and {k: again[k] for k in keys} == {k: first[k] for k in keys}
  assert [r["step"] for r in trainer.read_metrics(str(tmp_path))].count(6) == 2  # nothing re-logged


@pytest.mark.parametrize("frozen", ["", "enc"])
def test_optimizer_moments_take_their_parameters_sharding(frozen):
  """Under FSDP each Adam moment is sharded as its parameter (Setup's shardings, which the plans'
  per-chip bytes read), with or without a frozen group (whose moments optax masks out); counts are
  replicated. Zero-initialised moments do not depend on the parameters, so compiling the
  optimizer's init cannot propagate the parameters' shardings to them."""
  groups = [{"name": frozen, "pattern": f"{frozen}/.*", "freeze": True}] if frozen else []
  setup = trainer.Setup(toy_config(3, mesh={"data": 2, "fsdp": 4, "tensor": 1}, groups=groups))
  sh = setup.state_shardings
  params = {k.removeprefix("params/"): v for k, v in leaves_of(sh["params"]).items()}
  fsdp = jax.sharding.PartitionSpec("fsdp", None)
  assert params["enc/kernel/value"].spec == fsdp and params["head/kernel/value"].spec == fsdp
  moments = 0
  for path, s in leaves_of(sh["opt_state"]).items():
    owner = [k for k in params if path.endswith(k)]
    if owner:
      moments += 1
      assert s.spec == params[owner[0]].spec, (path, s.spec)
    else:
      assert s.is_fully_replicated, path
  assert moments == 2 * (4 - 2 * bool(frozen))  # mu and nu of each trainable parameter


def leaves_of(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return {path_str(p): x for p, x in flat}


def test_schedules_count_optimizer_updates_under_grad_accum():
  """With grad_accum=k, the k-th steps' updates follow the schedule of grad_accum=1 sampled every
  k steps (warmup given in updates: steps / k), down to its end: not a schedule stretched k times."""
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.ones((2, 2))}  # constant: each Adam update's magnitude is the learning rate
  steps, lrs = 16, {}
  for accum in (1, 2, 4):
    cfg = {"lr": 1.0, "schedule": "linear", "end_factor": 0.0, "warmup_steps": 4 // accum, "grad_accum": accum}
    tx = optim.make_optimizer(cfg, params, steps)
    opt, p, lrs[accum] = tx.init(params), params, []
    for step in range(steps):
      upd, opt = tx.update(grads, opt, p)
      p = optax.apply_updates(p, upd)
      if step % accum == accum - 1:  # an optimizer update (MultiSteps's others are zero)
        lrs[accum].append(float(jnp.abs(upd["w"]).mean()))
  assert len(lrs[1]) == steps and lrs[1][4] == pytest.approx(1.0, 1e-4) and lrs[1][-1] == pytest.approx(1 / 12, 1e-4)
  for accum in (2, 4):
    np.testing.assert_allclose(lrs[accum], lrs[1][::accum], rtol=1e-4, atol=1e-7, err_msg=f"grad_accum={accum}")
  with pytest.raises(ValueError, match=r"optim.grad_accum=3: expected a positive divisor of train.steps=16"):
    optim.make_optimizer({"lr": 1.0, "grad_accum": 3}, params, 16)


def test_any_eval_batch_size_evaluates_exactly_on_8_devices(monkeypatch):
  """An eval batch of 12 over 8 batch shards is padded to 16 (masked): the metrics, over every
  example once, equal one device's."""
  monkeypatch.setattr(ToyTask, "summarize", lambda self, s: {"accuracy": s["correct"] / s["count"],
                                                             "count": s["count"]})
  out = {}
  for devices in (1, 8):
    cfg = toy_config(4, {"data": devices, "fsdp": 1, "tensor": 1})
    cfg.data.eval_batch_size = 12
    setup = trainer.Setup(cfg)
    out[devices] = trainer.evaluate(setup, setup.init_state(), setup.make_eval_step(), "test")
  assert out[8] == out[1] and out[1]["test/count"] == len(TEST), out


def test_training_config_errors_come_before_training(tmp_path):
  cfg = toy_config(4, {"data": 8, "fsdp": 1, "tensor": 1})
  cfg.data.batch_size = 12
  with pytest.raises(ValueError, match=r"data.batch_size=12 must divide by 8, the number of shards of the batch"):
    trainer.train(cfg, str(tmp_path / "batch"), progress=False)
  for key in ("log_every", "eval_every", "checkpoint_every"):
    cfg = toy_config(4)
    cfg.train[key] = 0
    with pytest.raises(ValueError, match=rf"train.{key}=0: expected a positive whole number of steps"):
      trainer.train(cfg, str(tmp_path / key), progress=False)
    assert not os.path.exists(tmp_path / key / "checkpoints")


def test_the_plan_compiles_the_eval_batch_the_trainer_pads():
  """`mmjax.train.plan` compiles the eval step on the padded batch the trainer feeds (12 -> 16 on
  8 batch shards), and refuses a training batch the shards cannot divide, as `train` does."""
  from mmjax.train.plan import abstract_batch

  cfg = toy_config(4, {"data": 8, "fsdp": 1, "tensor": 1})
  cfg.data.eval_batch_size = 12
  setup = trainer.Setup(cfg)
  assert {v.shape[0] for v in abstract_batch(setup, train=False).values()} == {16}
  cfg.data.batch_size = 12
  with pytest.raises(ValueError, match=r"data.batch_size=12 must divide by 8"):
    abstract_batch(trainer.Setup(cfg), train=True)


def test_sigterm_at_an_eval_step_saves_before_evaluating(tmp_path, monkeypatch):
  """The save must fit train.preemption_grace_s: at a SIGTERM the step's evaluation (possibly a
  long caption search) is skipped, the checkpoint written, and the run stops there."""
  import signal

  from toy_task import ToyIterator

  evaluated = []
  real_evaluate, real_next = trainer.evaluate, ToyIterator.__next__
  monkeypatch.setattr(trainer, "evaluate", lambda s, st, e, split: evaluated.append(split) or real_evaluate(s, st, e, split))

  def next_with_sigterm(self):
    if self.i == 3:  # the signal arrives while step 4, an eval step, trains
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next(self)

  monkeypatch.setattr(ToyIterator, "__next__", next_with_sigterm)
  cfg = toy_config(12)
  cfg.train.update(eval_every=2, checkpoint_every=6)
  final = trainer.train(cfg, str(tmp_path), progress=False)
  assert final["preempted"] and final["step"] == 4
  assert evaluated == ["test"]  # step 2's evaluation only
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
