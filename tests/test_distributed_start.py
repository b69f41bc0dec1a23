"""Multi-host start: JAX's own cluster detection decides, `--distributed` forces either way.

A fake Cloud TPU VM answers JAX's metadata-server lookups (no TPU, no network): the start must
connect with what the metadata says, as on a real pod slice.
"""

import os
import subprocess
import sys

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from mmjax.train import distributed

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
# What JAX's detection reads (SLURM, Open MPI, Kubernetes, GKE TPU, multi-slice, a coordinator).
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES",
                "MEGASCALE_SLICE_ID", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT")


@pytest.fixture
def calls(monkeypatch):
  """No cluster around; jax.distributed.initialize records its arguments instead of connecting."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  seen = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: seen.append((a, k)))
  return seen


def fake_tpu_vm(monkeypatch, worker, endpoints, tpu_env=""):
  """This process on a Cloud TPU VM whose metadata server says `worker` of `endpoints`."""
  metadata = {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints, "tpu-env": tpu_env}
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(clusters.cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # set by JAX where it found no TPU chip
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


def test_no_cluster_is_one_process(calls):
  assert distributed.cluster_env() is None
  assert "one process" in distributed.start("auto")
  assert "one process" in distributed.start("false")
  assert calls == []


@pytest.mark.parametrize("endpoints", ["10.130.0.5,10.130.0.6",  # hostnames (here IPs)
                                       "w-0:0:10.130.0.5,w-1:1:10.130.0.6"])  # name:id:ip triples
def test_fake_tpu_vm_pod_starts_from_the_metadata_server(calls, monkeypatch, endpoints):
  fake_tpu_vm(monkeypatch, 1, endpoints, "ACCELERATOR_TYPE: 'v4-16'\nZONE: 'us-central2-b'\n")
  assert distributed.cluster_env() is cloud_tpu_cluster.GceTpuCluster
  line = distributed.start("auto")
  # JAX's TPU coordinator port; worker 0's address; this host is worker 1 of 2.
  assert calls == [(("10.130.0.5:8482", 2, 1, None), {"initialization_timeout": 300})]
  assert "process 1 of 2" in line and "GceTpuCluster" in line


def test_fake_multislice_numbers_processes_across_slices(calls, monkeypatch):
  tpu_env = ("MEGASCALE_COORDINATOR_ADDRESS: '10.8.0.2:8080'\nMEGASCALE_NUM_SLICES: '2'\n"
             "MEGASCALE_SLICE_ID: '1'\n")
  fake_tpu_vm(monkeypatch, 0, "10.9.0.3,10.9.0.4", tpu_env)
  distributed.start("auto")
  assert calls == [(("10.8.0.2:8482", 4, 2, None), {"initialization_timeout": 300})]


def test_one_host_tpu_vm_needs_no_runtime_unless_forced(calls, monkeypatch):
  fake_tpu_vm(monkeypatch, 0, "10.130.0.5")
  assert "of one process" in distributed.start("auto") and calls == []
  distributed.start("true")
  assert calls == [(("10.130.0.5:8482", 1, 0, None), {"initialization_timeout": 300})]


def test_slurm_job_starts_too(calls, monkeypatch):
  for k, v in dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[07-08]", SLURM_NTASKS="2",
                   SLURM_PROCID="1", SLURM_LOCALID="0").items():
    monkeypatch.setenv(k, v)
  distributed.start("auto")
  (args, _), = calls
  assert args[0].startswith("node07:") and args[1:] == (2, 1, [0])


def test_forced_without_a_cluster_is_a_clear_error(calls):
  with pytest.raises(distributed.StartError, match="--distributed=true, but JAX's cluster detection found no"):
    distributed.start("true")
  with pytest.raises(distributed.StartError, match="also pass --num_processes"):
    distributed.start("auto", coordinator_address="10.0.0.1:1234")
  with pytest.raises(ValueError, match="expected one of auto, true, false"):
    distributed.start("yes")
  distributed.start("auto", coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
  assert calls == [(("10.0.0.1:1234", 2, 0, None), {"initialization_timeout": 300})]


def _train_py(tmp_path, *flags):
  """train.py on the toy task (2 steps) in a clean environment: no cluster variables."""
  (tmp_path / "toy.py").write_text("from toy_task import toy_config\n\n\ndef get_config():\n"
                                   "  return toy_config(2)\n")
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  env.update(PYTHONPATH=HERE + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={tmp_path / 'toy.py'}",
                         f"--workdir={tmp_path / 'run'}", *flags], env=env, capture_output=True, text=True,
                        timeout=300)


def test_train_py_without_a_cluster_trains_in_one_process(tmp_path):
  run = _train_py(tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "distributed: no cluster found by JAX's detection: one process" in run.stderr
  assert '"step": 2' in run.stdout


def test_train_py_forced_without_a_cluster_says_why(tmp_path):
  run = _train_py(tmp_path, "--distributed=true")
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert "train.py: --distributed=true, but JAX's cluster detection found no cluster" in run.stderr
  assert not (tmp_path / "run").exists()
