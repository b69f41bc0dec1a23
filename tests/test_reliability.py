"""Faults: kills during a save, corrupted checkpoints, SIGTERM, NaN/Inf, disk full; other meshes; bf16."""

import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.datasets import sort_of_clevr
from mmjax.projects.sort_of_clevr.task import SortOfClevrVQA
from mmjax.train import trainer
from mmjax.train.checkpoint import CheckpointSaveError, Checkpointer, CorruptCheckpointError
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS
from toy_task import FIRST_BATCH, NAN_AT, TEST, ToyIterator, assert_states_equal, stack, toy_config

HERE = os.path.dirname(__file__)
ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def _toy(args, *, slow=0.0, env=None):
  """tests/toy_task.py WORKDIR STEPS in a 1-device subprocess (mesh data=-1, a checkpoint per step)."""
  e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TOY_SLOW_S=str(slow),
           PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
  return subprocess.Popen([sys.executable, os.path.join(HERE, "toy_task.py"), *map(str, args)], env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f"condition not reached; toy run said:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.05)


def _restore(workdir, config, step=None):
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, data = ck.restore(ck.latest_step() if step is None else step, trainer.Setup(config).abstract_state)
  finally:
    ck.close()
  return jax.device_get(state), data


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in trainer.read_metrics(workdir) if "train/loss" in r}


# ---------------------------------------------------------------------------------------------
# Kills and preemption (subprocesses).
# ---------------------------------------------------------------------------------------------
def test_sigkill_during_a_save_resumes_from_the_last_complete_step(tmp_path, caplog):
  wd, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
  p = _toy([wd, 8], env={"TOY_FINALIZE_SLEEP_S": "1.5"})  # each save stays unrenamed for 1.5 s
  partial = lambda: [n for n in os.listdir(ckdir) if ".orbax-checkpoint-tmp" in n] if ckdir.exists() else []
  complete = lambda: sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if ckdir.exists() else []
  _wait_for(lambda: complete() and partial(), p)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  left, last = partial(), complete()[-1]
  assert left and all(int(n.split(".")[0]) > last for n in left)  # the save in flight when killed
  with caplog.at_level(logging.INFO):
    final = trainer.train(toy_config(8, ONE), str(wd), progress=False)
  assert final["step"] == 8 and not partial()
  assert final["resumed_from"] == last and FIRST_BATCH[-1] == last  # the data stream resumed too
  assert f"resumed from step {last}" in caplog.text
  assert "partial checkpoint left by an interrupted save" in caplog.text
  assert "the last complete step is restored instead" in caplog.text


def test_sigterm_saves_exits_zero_within_grace_and_resume_continues_the_curve(tmp_path):
  steps, grace = 16, 30
  straight = trainer.train(toy_config(steps, ONE), str(tmp_path / "a"), progress=False)
  wd = tmp_path / "b"
  p = _toy([wd, steps], slow=0.25, env={"TOY_TRAIN": f'{{"preemption_grace_s": {grace}, "checkpoint_every": 5}}'})
  _wait_for(lambda: (wd / "checkpoints" / "5").exists(), p)
  sent = time.time()
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=grace + 30)[0]
  took = time.time() - sent
  assert p.returncode == 0, out[-3000:]
  assert took < grace, f"exit took {took:.1f} s, more than train.preemption_grace_s={grace}"
  assert '"preempted": true' in out and "SIGTERM: saved step" in out
  killed_at = max(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())
  assert 5 <= killed_at < steps  # saved at the step boundary after the signal, not only every 5 steps
  resumed = trainer.train(toy_config(steps, ONE), str(wd), progress=False)
  assert not resumed["preempted"] and resumed["step"] == steps
  assert resumed["resumed_from"] == killed_at and FIRST_BATCH[-1] == killed_at  # not from step 0
  pa, da = _restore(tmp_path / "a", toy_config(steps, ONE))
  pb, db = _restore(wd, toy_config(steps, ONE))
  # The first part ran in a 1-device process, the rest here (8 host devices, a 1-device mesh):
  # XLA's CPU reductions may differ in the last bit across the two, hence the tolerance.
  # (Bitwise resume within one device count is tested in test_trainer_processes.py.)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, pa["params"], pb["params"])
  assert da == db and da["i"] == steps
  la, lb = _losses(tmp_path / "a"), _losses(wd)
  after = [s for s in la if s > killed_at + 2]  # whole logging windows after the restart
  assert after
  close([la[s] for s in after], [lb[s] for s in after])
  close(straight["train/loss"], resumed["train/loss"])


# ---------------------------------------------------------------------------------------------
# Corrupted checkpoints and full disks (in process).
# ---------------------------------------------------------------------------------------------
def _biggest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """A toy run of 6 steps with checkpoints at 3 and 6, and its final parameters."""
  wd = tmp_path_factory.mktemp("six")
  trainer.train(toy_config(6, ONE), str(wd), progress=False)
  return wd


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_step(six_steps, tmp_path, caplog):
  good, _ = _restore(six_steps, toy_config(6, ONE), 3)
  for how in ("garble", "truncate"):
    wd = tmp_path / how
    os.system(f"cp -r {six_steps} {wd}")
    path = _biggest_file(wd / "checkpoints" / "6")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      if how == "garble":  # flip every bit of 8 bytes in the middle: arrays still "read"
        f.seek(size // 2)
        chunk = f.read(8)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
      else:
        f.truncate(size // 2)
    ck = Checkpointer(str(wd / "checkpoints"))
    abstract = trainer.Setup(toy_config(6, ONE)).abstract_state
    with pytest.raises(CorruptCheckpointError, match="checkpoint step 6 .*(corrupted|cannot be read)"):
      ck.restore(6, abstract)
    with pytest.raises(CorruptCheckpointError, match="checkpoint step 6 .*(corrupted|cannot be read)"):
      ck.restore(6, {"params": abstract["params"]}, partial=True)  # serving reads the parameters only
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      step, state, data = ck.restore_latest(trainer.Setup(toy_config(6, ONE)).abstract_state)
    ck.close()
    assert step == 3 and data["i"] == 3
    jax.tree.map(np.testing.assert_array_equal, good["params"], jax.device_get(state["params"]))
    assert "checkpoint step 6" in caplog.text and "restored checkpoint step 3 instead" in caplog.text
    assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6.corrupt"]
  # Training resumes from step 3 and saves step 6 again, equal to the undamaged run's.
  final = trainer.train(toy_config(6, ONE), str(wd), progress=False)
  assert final["resumed_from"] == 3 and FIRST_BATCH[-1] == 3
  a, _ = _restore(six_steps, toy_config(6, ONE), 6)
  b, _ = _restore(wd, toy_config(6, ONE), 6)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])


def _removal_order(path, folders_first):
  """A folder's files and subfolders in the order a depth-first deletion removes them, itself last."""
  names, out = sorted(os.listdir(path)), []
  if folders_first:  # a stable sort: subfolders, then files, each in name order
    names.sort(key=lambda n: not os.path.isdir(os.path.join(path, n)))
  for name in names:
    p = os.path.join(path, name)
    out += _removal_order(p, folders_first) if os.path.isdir(p) else [p]
  return out + [path]


def test_interrupted_deletion_of_the_latest_step_falls_back_to_a_complete_step(six_steps, tmp_path, caplog):
  """Orbax deletes a step in place, file by file (best-keeping can delete the step it just saved):
  a kill at any point of that deletion must not resume from the step's remains (its state
  without its data iterator state or checksums). Every prefix of the deletion of step 6, in two
  orders (the items first; Orbax's step metadata first): the newest step that restores is
  complete, bit for bit the state saved at that step, with the data state of that step."""
  abstract = trainer.Setup(toy_config(6, ONE)).abstract_state
  good = {s: _restore(six_steps, toy_config(6, ONE), s)[0] for s in (3, 6)}
  for folders_first in (True, False):
    order = _removal_order(six_steps / "checkpoints" / "6", folders_first)
    order = [os.path.relpath(p, six_steps) for p in order]
    for k in range(len(order) + 1):
      wd = tmp_path / f"{folders_first}-{k}"
      shutil.copytree(six_steps / "checkpoints", wd / "checkpoints")
      for rel in order[:k]:  # the deletion, killed after k removals
        (os.rmdir if os.path.isdir(wd / rel) else os.unlink)(wd / rel)
      ck = Checkpointer(str(wd / "checkpoints"))
      try:
        step, state, data = ck.restore_latest(abstract)
      finally:
        ck.close()
      assert data is not None and data["i"] == step, (order[:k], step, data)
      assert_states_equal(good[step], state)
      if k and not folders_first:  # without its step metadata, step 6 is never taken again
        assert step == 3, order[:k]
  # The trainer, killed while the step's data and integrity items were gone and its state intact.
  wd = tmp_path / "train"
  shutil.copytree(six_steps, wd)
  for item in ("data", "integrity"):
    shutil.rmtree(wd / "checkpoints" / "6" / item)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    final = trainer.train(toy_config(6, ONE), str(wd), progress=False)
  assert final["resumed_from"] == 3 and FIRST_BATCH[-1] == 3
  assert "checkpoint step 6" in caplog.text and "is incomplete: item(s) data, integrity missing" in caplog.text
  assert "restored checkpoint step 3 instead" in caplog.text
  assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6", "6.corrupt"]  # step 6 trained and saved again


def test_no_restorable_checkpoint_is_an_error_listing_each_step(six_steps, tmp_path):
  other = toy_config(6, ONE)
  other.optim.groups = [{"name": "enc", "pattern": "enc/.*", "freeze": True}]  # another opt_state tree
  with pytest.raises(CorruptCheckpointError, match="(?s)no checkpoint .* can be restored.*step 6.*step 3"):
    trainer.train(other, str(six_steps), progress=False)
  assert sorted(os.listdir(six_steps / "checkpoints")) == ["3", "6"]  # nothing moved aside


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_step(six_steps, tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  wd = tmp_path / "full"
  os.system(f"cp -r {six_steps} {wd}")

  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  with monkeypatch.context() as m:
    m.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint step 9 .*No space left on device.*"
                                                  r"last complete checkpoint \(step 6\) is intact"):
      trainer.train(toy_config(9, ONE), str(wd), progress=False)
  assert FIRST_BATCH[-1] == 6  # resumed from step 6 before the save of step 9 failed
  ck = Checkpointer(str(wd / "checkpoints"), cleanup=True)
  assert ck.all_steps() == [3, 6] and ".orbax-checkpoint-tmp" not in " ".join(os.listdir(wd / "checkpoints"))
  ck.close()
  a, _ = _restore(six_steps, toy_config(6, ONE), 6)
  b, _ = _restore(wd, toy_config(6, ONE), 6)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradients.
# ---------------------------------------------------------------------------------------------
def test_nonfinite_step_leaves_the_state_unchanged():
  setup = trainer.Setup(toy_config(4, ONE))
  step = setup.make_train_step()
  it = ToyIterator(8)
  with setup.context():
    state = step(setup.init_state(), setup.global_batch(next(it)))[0]
    before = jax.device_get(state)
    bad = next(it)
    bad["x"][3, 5] = np.inf
    after, metrics = step(state, setup.global_batch(bad))
    after = jax.device_get(after)
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(after["step"]) == int(before["step"]) + 1
  for k in ("params", "model_state", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, before[k], after[k])


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_policy(policy, tmp_path, caplog):
  cfg = toy_config(8, ONE)
  cfg.train.nonfinite = policy
  NAN_AT.add(4)  # batch index 4 is step 5
  try:
    with caplog.at_level(logging.WARNING):
      if policy == "skip":
        final = trainer.train(cfg, str(tmp_path), progress=False)
      else:
        with pytest.raises(FloatingPointError, match=r"step 5 \(batch index 4.*last good checkpoint is step 3"):
          trainer.train(cfg, str(tmp_path), progress=False)
  finally:
    NAN_AT.clear()
  if policy == "skip":
    assert final["nonfinite_steps"] == 1 and final["step"] == 8
    assert "step 5 (batch index 4 of the training stream): update skipped" in caplog.text
    rows = {r["step"]: r for r in trainer.read_metrics(str(tmp_path)) if "train/nonfinite_steps" in r}
    assert [rows[s]["train/nonfinite_steps"] for s in (2, 4, 6, 8)] == [0, 0, 1, 0]
    assert all(np.isfinite(r["train/loss"]) for r in rows.values())
    state, _ = _restore(str(tmp_path), cfg)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  else:
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]


def test_nonfinite_policy_is_validated():
  cfg = toy_config(2, ONE)
  cfg.train.nonfinite = "ignore"
  with pytest.raises(ValueError, match="train.nonfinite"):
    trainer.Setup(cfg)


# ---------------------------------------------------------------------------------------------
# Another mesh; bf16 compute on f32 master weights.
# ---------------------------------------------------------------------------------------------
def test_restore_onto_a_different_mesh(tmp_path):
  cube = {"data": 2, "fsdp": 2, "tensor": 2}
  trainer.train(toy_config(3, cube), str(tmp_path), progress=False)
  want, _ = _restore(str(tmp_path), toy_config(3, cube))
  for mesh in ({"data": 8, "fsdp": 1, "tensor": 1}, ONE):
    setup = trainer.Setup(toy_config(3, mesh))
    ck = Checkpointer(str(tmp_path / "checkpoints"))
    state, _ = ck.restore(3, setup.abstract_state)
    ck.close()
    assert state["params"]["enc"]["kernel"].sharding.mesh.devices.size == setup.mesh.devices.size
    jax.tree.map(np.testing.assert_array_equal, want, jax.device_get(state))
  final = trainer.train(toy_config(5, {"data": 8, "fsdp": 1, "tensor": 1}), str(tmp_path), progress=False)
  assert final["step"] == 5 and final["resumed_from"] == 3 and FIRST_BATCH[-1] == 3


class ToyVQAIterator:
  """The same synthetic Sort-of-CLEVR-shaped batch every step (to memorise)."""

  def __init__(self, batch_size, max_len, vocab):
    rng = np.random.default_rng(0)
    self.batch = {"image": rng.uniform(size=(batch_size, 75, 75, 3)).astype(np.float32),
                  "question_ids": rng.integers(1, vocab, (batch_size, 2, max_len)).astype(np.int32),
                  "question_mask": np.ones((batch_size, 2, max_len), bool),
                  "answer": rng.integers(0, len(sort_of_clevr.ANSWERS), (batch_size, 2)).astype(np.int32)}
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    return dict(self.batch)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


@TASKS.register("vqa_synthetic_for_tests")
class SyntheticVQA(SortOfClevrVQA):
  """The Sort-of-CLEVR VQA task's model and loss on a synthetic batch (no data set to build)."""

  eval_splits = ()

  def __init__(self, config):
    self.config = config
    self.tokenizer = types.SimpleNamespace(vocab_size=40)
    self.answers = sort_of_clevr.ANSWERS

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    return ToyVQAIterator(batch_size, self.config.data.max_len, self.tokenizer.vocab_size)


def test_bf16_compute_keeps_f32_master_weights(tmp_path):
  # The VQA task passes config model.dtype to its model: parameters f32, activations bf16
  # (checked abstractly: compiling the VQA model's train step costs ~30 s of CPU).
  cfg = load_config(os.path.join(HERE, "..", "mmjax/projects/sort_of_clevr/configs/vqa.py:size=tiny"),
                    ["model.dtype=bfloat16"])
  cfg.task, cfg.mesh = "vqa_synthetic_for_tests", ONE
  setup = trainer.Setup(cfg)
  assert {a.dtype for a in jax.tree.leaves(setup.abstract_state["params"])} == {jnp.dtype(jnp.float32)}
  batch = next(setup.task.dataset("train", train=True, batch_size=2, shard_index=0, shard_count=1))
  logits, aux = jax.eval_shape(lambda s: setup.model(s)(batch["image"], batch["question_ids"], batch["question_mask"]),
                               setup.abstract_state)
  assert logits.dtype == aux["image_pooled"].dtype == aux["text_pooled"].dtype == jnp.bfloat16
  # Training in bf16 on f32 master weights (the toy task reads model.dtype too): the loss falls.
  toy = toy_config(24, ONE)
  toy.model = {"dtype": "bfloat16"}
  toy_setup = trainer.Setup(toy)
  held_out = stack(TEST)
  held_out_loss = lambda state: float(toy_setup.task.loss_fn(toy_setup.model(state), held_out, False)[0])
  before = held_out_loss(jax.device_get(toy_setup.init_state()))
  trainer.train(toy, str(tmp_path), progress=False)
  assert all(np.isfinite(list(_losses(str(tmp_path)).values())))
  state, _ = _restore(str(tmp_path), toy)
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype(np.float32)}
  assert toy_setup.model(state)(jnp.ones((2, 8)), False).dtype == jnp.bfloat16
  assert held_out_loss(state) < 0.8 * before


@pytest.mark.parametrize("scores, kept", [
    ((0.9, 0.8, 0.7), [1, 2, 3]),  # the step just saved scored lower: still kept (resume never goes back)
    ((0.9, 0.8, None, 0.7, None, 0.6, None), [1, 6, 7]),  # steps saved without metrics do not pile up
    ((0.5, 0.6, 0.4, 0.3), [2, 3, 4]),
])
def test_keeps_the_last_steps_and_the_best(tmp_path, scores, kept):
  ck = Checkpointer(str(tmp_path / "checkpoints"), keep=2, best_metric="acc", async_save=False)
  for step, score in enumerate(scores, 1):
    ck.save(step, {"x": np.full(3, step, np.float32)}, metrics=None if score is None else {"acc": score})
  assert ck.all_steps() == kept
  assert ck.best_step() == 1 + int(np.argmax([-1 if s is None else s for s in scores]))


def test_a_partial_restore_checks_what_it_reads(tmp_path):
  """Serving restores the parameters without the optimizer state (`partial`): the checksums of
  what it reads are checked, those of what it leaves are not."""
  import json

  import jax.numpy as jnp

  state = {"params": {"w": jnp.arange(4.0)}, "opt": {"m": jnp.ones(4)}}
  ck = Checkpointer(str(tmp_path))
  ck.save(1, state)
  ck.wait()
  abstract = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                     state["params"])}
  meta = tmp_path / "1" / "integrity" / "metadata"
  saved = json.loads(meta.read_text())
  for entry, readable in (("opt/m", True), ("params/w", False)):
    meta.write_text(json.dumps({**saved, "checksums": {**saved["checksums"], entry: 7}}))
    if readable:
      got, _ = ck.restore(1, abstract, with_data=False, partial=True)
      assert sorted(got) == ["params"]
      np.testing.assert_array_equal(got["params"]["w"], np.arange(4.0))
    else:
      with pytest.raises(CorruptCheckpointError, match=r"step 1 .* corrupted: 1 array\(s\) .*\(params/w\)"):
        ck.restore(1, abstract, with_data=False, partial=True)
  ck.close()


def test_data_states_are_per_process_and_another_process_count_starts_afresh(tmp_path, caplog):
  """The data item holds every process's iterator state and a process restores its own; one with
  the states of another number of processes restores the train state, the data streams start
  afresh (a warning); a bare state (checkpoints before per-process states) is one process's."""
  import json

  state = {"x": jnp.arange(3.0)}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  ck = Checkpointer(str(tmp_path))
  ck.save(1, state, {"i": 5})
  ck.wait()
  meta = tmp_path / "1" / "data" / "metadata"
  assert json.loads(meta.read_text()) == {"per_process": [{"i": 5}]}
  assert ck.restore(1, abstract)[1] == {"i": 5}
  meta.write_text(json.dumps({"i": 5}))
  assert ck.restore(1, abstract)[1] == {"i": 5}
  meta.write_text(json.dumps({"per_process": [{"i": 5}, {"i": 4}]}))
  with caplog.at_level(logging.WARNING):
    got, data = ck.restore(1, abstract)
  assert data is None and "data iterator states of 2 process(es), this run has 1" in caplog.text
  np.testing.assert_array_equal(got["x"], np.arange(3.0))
  ck.close()
