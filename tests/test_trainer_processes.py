"""Trainer across processes: SIGKILL + resume is exact; two jax.distributed processes == one."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from mmjax.train import trainer
from mmjax.train.checkpoint import Checkpointer
from toy_task import toy_config

HERE = os.path.dirname(__file__)


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args, devices=1, slow=0.0):
  env = _env(devices)
  env["TOY_SLOW_S"] = str(slow)
  return subprocess.Popen([sys.executable, os.path.join(HERE, "toy_task.py"), *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(workdir, steps):
  cfg = toy_config(steps, {"data": 1, "fsdp": 1, "tensor": 1})
  setup = trainer.Setup(cfg)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  state, data = ck.restore(step, setup.abstract_state)
  ck.close()
  return step, jax.device_get(state["params"]), data


def _losses(workdir):
  return [r["train/loss"] for r in trainer.read_metrics(workdir) if "train/loss" in r]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  steps = 16
  straight = _run([tmp_path / "a", steps])
  assert straight.wait(300) == 0, straight.stdout.read()
  p = _run([tmp_path / "b", steps], slow=0.3)
  ckdir = tmp_path / "b" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckdir / "6").exists():
    time.sleep(0.05)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert 6 <= killed_at < steps
  resumed = _run([tmp_path / "b", steps])
  assert resumed.wait(300) == 0, resumed.stdout.read()
  sa, pa, da = _final_params(tmp_path / "a", steps)
  sb, pb, db = _final_params(tmp_path / "b", steps)
  assert sa == sb == steps and da == db == {"i": steps}
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  # The resumed run's logged losses after the restart equal the uninterrupted run's.
  la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  assert la[-3:] == lb[-3:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  steps = 6
  one = _run([tmp_path / "one", steps], devices=2)
  assert one.wait(300) == 0, one.stdout.read()
  port = _free_port()
  procs = [_run([tmp_path / "two", steps, i, 2, port], devices=1) for i in range(2)]
  for q in procs:
    assert q.wait(300) == 0, q.stdout.read()
  np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(tmp_path / "two"), rtol=1e-5)
  acc = lambda w: [r["test/accuracy"] for r in trainer.read_metrics(w) if "test/accuracy" in r]
  assert acc(tmp_path / "one") == acc(tmp_path / "two")
