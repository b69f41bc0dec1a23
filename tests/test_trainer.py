"""Trainer: exact resume, sharded == single-device, frozen groups, per-group learning rates."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mmjax.train import optim, trainer
from toy_task import FAIL_AFTER, toy_config


def _params(workdir, config):
  setup = trainer.Setup(config)
  from mmjax.train.checkpoint import Checkpointer
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, data = ck.restore(ck.latest_step(), setup.abstract_state)
  ck.close()
  return jax.device_get(state["params"]), data


def test_resume_after_crash_is_bitwise_identical(tmp_path):
  cfg = toy_config()
  straight = trainer.train(cfg, str(tmp_path / "a"), progress=False)
  FAIL_AFTER["n"] = 7  # crashes while fetching batch 8; checkpoint at step 6 exists
  try:
    with pytest.raises(RuntimeError, match="simulated crash"):
      trainer.train(cfg, str(tmp_path / "b"), progress=False)
  finally:
    FAIL_AFTER["n"] = None
  resumed = trainer.train(cfg, str(tmp_path / "b"), progress=False)
  pa, da = _params(str(tmp_path / "a"), cfg)
  pb, db = _params(str(tmp_path / "b"), cfg)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  assert da == db == {"i": 12}
  assert straight["test/accuracy"] == resumed["test/accuracy"]
  assert straight["train/loss"] == resumed["train/loss"]
  assert os.path.exists(tmp_path / "a" / "curves.png")
  rows = trainer.read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8, 10, 12]


def test_sharded_8_devices_equals_single_device(tmp_path):
  one = trainer.train(toy_config(6), str(tmp_path / "one"), progress=False)
  eight = trainer.train(toy_config(6, {"data": 2, "fsdp": 2, "tensor": 2}), str(tmp_path / "eight"),
                        progress=False)
  l1 = [r["train/loss"] for r in trainer.read_metrics(str(tmp_path / "one")) if "train/loss" in r]
  l8 = [r["train/loss"] for r in trainer.read_metrics(str(tmp_path / "eight")) if "train/loss" in r]
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  assert one["test/accuracy"] == eight["test/accuracy"]
  setup = trainer.Setup(toy_config(6, {"data": 2, "fsdp": 2, "tensor": 2}))
  assert setup.state_shardings["params"]["enc"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_frozen_group_does_not_change_and_lr_ratios_hold(tmp_path):
  groups = [{"name": "enc", "pattern": "enc/.*", "freeze": True}]
  cfg = toy_config(3, groups=groups)
  setup = trainer.Setup(cfg)
  s0 = jax.device_get(setup.init_state())
  trainer.train(cfg, str(tmp_path / "f"), progress=False)
  p, _ = _params(str(tmp_path / "f"), cfg)
  np.testing.assert_array_equal(p["enc"]["kernel"], s0["params"]["enc"]["kernel"])
  assert not np.array_equal(p["head"]["kernel"], s0["params"]["head"]["kernel"])
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
  from toy_task import ToyIterator
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
  trainer.train(cfg, str(tmp_path / "b"), progress=False)
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
  again = trainer.train(toy_config(6), str(tmp_path), progress=False)
  assert again["step"] == 6 and not again["preempted"]
  keys = [k for k in first if k.startswith(("test/", "train/")) and k != "train/examples_per_s"]
  assert "test/accuracy" in keys and {k: again[k] for k in keys} == {k: first[k] for k in keys}
  assert [r["step"] for r in trainer.read_metrics(str(tmp_path))].count(6) == 2  # nothing re-logged
