"""Trainer across processes: SIGKILL + resume is exact; two jax.distributed processes == one."""

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

from mmjax.train import trainer
from mmjax.train.checkpoint import Checkpointer
from toy_task import assert_states_close, assert_states_equal, toy_config

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
  cfg = toy_config(steps, {"data": 1, "fsdp": 1, "tensor": 1})
  setup = trainer.Setup(cfg)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  state, data = ck.restore(step, setup.abstract_state)
  ck.close()
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
  assert sa == sb == steps and da == db and da["i"] == steps
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
  assert sa == sb == steps and da == db
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
