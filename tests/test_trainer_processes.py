"""Trainer across processes: SIGKILL + resume is exact; two jax.distributed processes == one, also
with unequal eval shards; each process resumes its own data stream."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from mmjax.data.pipeline import make_pipeline
from mmjax.data.pp.registry import SkipExample
from mmjax.train import trainer
from mmjax.train.checkpoint import Checkpointer
from toy_task import TRAIN, assert_states_close, assert_states_equal, toy_config

HERE = os.path.dirname(__file__)


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args, devices=1, slow=0.0, train=None):
  env = _env(devices)
  env["TOY_SLOW_S"] = str(slow)
  env["TOY_TRAIN"] = json.dumps(train or {})
  log = tempfile.TemporaryFile("w+")  # not a pipe: a full one would stall a process and its peer
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "toy_task.py"), *map(str, args)], env=env,
                          stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _finish(proc, timeout=300):
  """Waits for a toy run; its FINAL summary (step, preempted, resumed_from, first_batch)."""
  proc.wait(timeout)
  proc.log.seek(0)
  out = proc.log.read()
  assert proc.returncode == 0, out[-3000:]
  return json.loads(out.rsplit("FINAL ", 1)[1].splitlines()[0])


def _final_state(workdir, steps):
  """The latest step, its train state and its saved data item: every process's iterator state."""
  cfg = toy_config(steps, {"data": 1, "fsdp": 1, "tensor": 1})
  setup = trainer.Setup(cfg)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  state, _ = ck.restore(step, setup.abstract_state, with_data=False)
  ck.close()
  data = json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())["per_process"]
  return step, jax.device_get(state), data


def _logged(workdir, key):
  return [r[key] for r in trainer.read_metrics(workdir) if key in r]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  steps = 16
  straight = _run([tmp_path / "a", steps])
  assert _finish(straight)["resumed_from"] is None
  p = _run([tmp_path / "b", steps], slow=0.3)
  ckdir = tmp_path / "b" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckdir / "6").exists():
    time.sleep(0.05)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  left = {d: sorted(os.listdir(ckdir / d)) for d in os.listdir(ckdir)}  # what the kill left
  assert 6 <= killed_at < steps
  resumed = _finish(_run([tmp_path / "b", steps]))
  # Resumed, not restarted: from the last checkpoint, the data stream at that step's batch index.
  assert resumed["resumed_from"] == killed_at and resumed["first_batch"] == killed_at, (resumed, left)
  sa, a, da = _final_state(tmp_path / "a", steps)
  sb, b, db = _final_state(tmp_path / "b", steps)
  assert sa == sb == steps and da == db and da[0]["i"] == steps
  assert_states_equal(a, b)
  # The resumed run's logged losses after the restart equal the uninterrupted run's.
  la, lb = _logged(tmp_path / "a", "train/loss"), _logged(tmp_path / "b", "train/loss")
  assert la[-3:] == lb[-3:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  """Two jax.distributed processes (each its shard of the data, split by the library's pipeline)
  train as one process on two devices: every step's loss and gradient norm, the final state leaf
  by leaf, the evaluation."""
  steps, train = 4, {"log_every": 1}
  one = _run([tmp_path / "one", steps], devices=2, train=train)
  port = _free_port()
  two = [_run([tmp_path / "two", steps, i, 2, port], devices=1, train=train) for i in range(2)]
  for q in (one, *two):
    _finish(q)
  one, two = tmp_path / "one", tmp_path / "two"
  assert len(_logged(one, "train/grad_norm")) == steps
  for key in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose(_logged(two, key), _logged(one, key), rtol=1e-5, err_msg=key)
  assert_states_close(_final_state(two, steps)[1], _final_state(one, steps)[1])
  assert _logged(one, "test/accuracy") == _logged(two, "test/accuracy")


def _pair(workdir, steps, slow=0.0, train=None, train_1=None):
  """Two jax.distributed processes, one device each, training `workdir` together (`train_1`:
  process 1's train settings where they differ)."""
  port = _free_port()
  return [_run([workdir, steps, i, 2, port], slow=slow, train=train_1 if i and train_1 else train)
          for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  """SIGTERM reaches process 1 only: both processes stop at the same step, save that one
  checkpoint together and exit 0 within the grace; resumed, the run equals the uninterrupted one
  bit for bit (both runs on two processes)."""
  steps, grace = 16, 30
  train = {"checkpoint_every": 5, "preemption_grace_s": grace}
  straight = _pair(tmp_path / "a", steps, train=train)
  cut = _pair(tmp_path / "b", steps, slow=0.3, train=train)
  ckdir = tmp_path / "b" / "checkpoints"
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (ckdir / "5").exists() and all(p.poll() is None for p in cut):
      time.sleep(0.05)
    sent = time.time()
    os.kill(cut[1].pid, signal.SIGTERM)
    for p in cut:  # without an agreed stop, one process waits in a collective for the other
      try:
        p.wait(max(1, sent + grace + 30 - time.time()))
      except subprocess.TimeoutExpired:
        p.log.seek(0)
        raise AssertionError(f"process still running {grace + 30} s after the SIGTERM:\n"
                             + p.log.read()[-3000:]) from None
    took = time.time() - sent
    finals = [_finish(p) for p in cut]
    for p in straight:
      _finish(p)
  finally:
    for p in (*straight, *cut):
      if p.poll() is None:
        p.kill()
  logs = []
  for p in cut:
    p.log.seek(0)
    logs.append(p.log.read())
  assert took < grace, f"exit took {took:.1f} s, more than train.preemption_grace_s={grace}"
  stopped = finals[0]["step"]
  assert finals[0] == finals[1] and finals[0]["preempted"], finals
  assert 5 <= stopped < steps and max(int(d) for d in os.listdir(ckdir) if d.isdigit()) == stopped
  assert "SIGTERM on another process" in logs[0] and "SIGTERM on another process" not in logs[1]
  assert all(f"SIGTERM: saved step {stopped}, exiting" in out for out in logs)
  resumed = [_finish(p) for p in _pair(tmp_path / "b", steps, train=train)]
  assert all(r["resumed_from"] == r["first_batch"] == stopped and not r["preempted"] for r in resumed)
  sa, a, da = _final_state(tmp_path / "a", steps)
  sb, b, db = _final_state(tmp_path / "b", steps)
  assert sa == sb == steps and da == db and len(da) == 2 and [d["i"] for d in da] == [steps, steps]
  assert_states_equal(a, b)


def test_max_minutes_on_process_0_stops_both_processes(tmp_path):
  """Process 0's clock decides train.max_minutes (process 1 here has no budget at all): both stop
  at the same early step, save it and return normally."""
  steps = 16
  two = _pair(tmp_path, steps, slow=0.3, train={"max_minutes": 0.05, "checkpoint_every": 100},
              train_1={"checkpoint_every": 100})
  try:
    finals = [_finish(p, 120) for p in two]  # without agreement process 1 waits for process 0
  finally:
    for p in two:
      if p.poll() is None:
        p.kill()
  stopped = finals[0]["step"]
  assert finals[0] == finals[1] and not finals[0]["preempted"] and stopped < steps, finals
  assert max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == stopped


def _skipping_preprocess(ids):
  """A preprocess that skips the examples whose id is in `ids` (as one that cannot decode them)."""
  def pre(example, rng):
    if int(example["id"]) in ids:
      raise SkipExample(f"id {example['id']}")
    return example
  return pre


def _skipping(workdir, steps, skip, devices=1, pid=None, port=None):
  """This file as a toy run whose preprocess skips examples by id (`skip`: split -> ids; its
  eval splits are the keys other than "train"); alone, or process `pid` of two."""
  env = _env(devices)
  env["TOY_SKIP"] = json.dumps(skip)
  args = [workdir, steps] + ([] if pid is None else [pid, 2, port])
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _finish_all(procs, timeout=150):
  """Every run's FINAL summary; all killed if one fails or does not finish in time."""
  try:
    return [_finish(p, timeout) for p in procs]
  except subprocess.TimeoutExpired:
    stuck = [p for p in procs if p.poll() is None]
    for p in stuck:
      p.log.seek(0)
    raise AssertionError(f"{len(stuck)} run(s) did not finish:\n" + "\n".join(p.log.read()[-2000:] for p in stuck)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_unequal_eval_shards_across_processes_equal_one_process(tmp_path):
  """A preprocess skips examples of process 1's eval shard only: of "test", enough for it to run
  out of batches first; of "odd_skipped", all of them (it has no batch at all). The collective
  eval step runs as often on both processes (without agreement one waits for the other forever)
  and the metrics equal one process's over the same examples."""
  odd = list(range(1, 24, 2))  # unshuffled, process 1 of 2 takes every other record: the odd ids
  skip = {"test": odd[:5], "odd_skipped": odd}
  port = _free_port()
  runs = [_skipping(tmp_path / "one", 2, skip, devices=2)]
  runs += [_skipping(tmp_path / "two", 2, skip, pid=i, port=port) for i in range(2)]
  one, *two = _finish_all(runs)
  assert one["test/count"] == 24 - 5 and one["odd_skipped/count"] == 12
  for final in two:
    assert {k: final[k] for k in one if "/" in k} == {k: one[k] for k in one if "/" in k}, (final, one)


def test_each_process_resumes_its_own_data_stream(tmp_path):
  """Process 1's training stream skips examples, so after some steps its position differs from
  process 0's; resumed from a checkpoint, each process draws the batch its own stream would draw
  next (not process 0's position)."""
  stream = lambda i, skip: iter(make_pipeline(TRAIN, batch_size=4, preprocess=_skipping_preprocess(skip),
                                              seed=0, shard_index=i, shard_count=2))
  skip = [int(i) for i in next(stream(1, ()))["id"][:3]]  # in process 1's first batch
  steps = 3
  port = _free_port()
  _finish_all([_skipping(tmp_path, steps, {"train": skip}, pid=i, port=port) for i in range(2)])
  port = _free_port()
  resumed = _finish_all([_skipping(tmp_path, steps + 2, {"train": skip}, pid=i, port=port) for i in range(2)])
  for i, final in enumerate(resumed):
    assert final["resumed_from"] == steps
    it = stream(i, set(skip))
    want = [next(it) for _ in range(steps + 1)][-1]["id"].tolist()
    assert final["first_ids"] == want, (i, final["first_ids"], want)


if __name__ == "__main__":
  # python test_trainer_processes.py WORKDIR STEPS [PROCESS_ID NUM_PROCESSES PORT]: the toy task,
  # its preprocess skipping the ids TOY_SKIP names ({split: [id, ...]}; eval splits: its keys but
  # "train", each over the toy test set). FINAL: the final metrics and the ids of the first
  # training batch drawn.
  import logging

  workdir, steps = sys.argv[1], int(sys.argv[2])
  if len(sys.argv) > 3:
    pid, n, port = map(int, sys.argv[3:6])
    jax.distributed.initialize(f"localhost:{port}", num_processes=n, process_id=pid)
  import toy_task
  from mmjax.train.tasks import TASKS

  skips = {k: set(v) for k, v in json.loads(os.environ["TOY_SKIP"]).items()}
  first_ids = []

  class Recording:
    """The training stream; notes the ids of its first batch."""

    def __init__(self, ds):
      self.it = iter(ds)

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.it)
      if not first_ids:
        first_ids.append(batch["id"].tolist())
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  @TASKS.register("toy_skipping")
  class Skipping(toy_task.ToyTask):
    eval_splits = tuple(k for k in skips if k != "train") or ("test",)

    def summarize(self, s):
      return {"accuracy": s["correct"] / s["count"], "count": s["count"]}

    def dataset(self, split, *, train, batch_size, shard_index, shard_count):
      pre = _skipping_preprocess(skips.get(split, ()))
      if train:
        return Recording(make_pipeline(toy_task.TRAIN, batch_size=batch_size, preprocess=pre, seed=0,
                                       shard_index=shard_index, shard_count=shard_count))
      return make_pipeline(toy_task.TEST, batch_size=batch_size, preprocess=pre, shuffle=False,
                           num_epochs=1, drop_remainder=False, pad_remainder=True,
                           shard_index=shard_index, shard_count=shard_count)

  cfg = toy_config(steps, {"data": -1, "fsdp": 1, "tensor": 1})
  cfg.task = "toy_skipping"
  cfg.train.update(eval_every=100, checkpoint_every=100)
  logging.basicConfig(level=logging.INFO)
  final = trainer.train(cfg, workdir, progress=False)
  print("FINAL", json.dumps({**{k: final[k] for k in final if "/" in k and not k.startswith("train/")},
                             "resumed_from": final["resumed_from"],
                             "first_ids": first_ids[0] if first_ids else None}), flush=True)
