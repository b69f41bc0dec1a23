"""Multi-host start and the stop decisions every process takes at the same step.

  start("auto")   # before any other JAX call: jax.distributed.initialize() where JAX finds a cluster

Cluster detection is JAX's own (the environments `jax.distributed.initialize()` reads with no
arguments): Cloud TPU VMs through the metadata server, GKE TPU pods, SLURM, Open MPI and
Kubernetes; mpi4py only when asked for. An explicit coordinator (`coordinator_address`, or the
JAX_COORDINATOR_ADDRESS variable) with `num_processes` and `process_id` works anywhere.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("mmjax.train")

MODES = ("auto", "true", "false")


class StartError(RuntimeError):
  """The distributed runtime was asked for but there is nothing to connect to."""


def cluster_env() -> type | None:
  """The cluster environment JAX's auto-detection would use here (None outside a known cluster)."""
  from jax._src import clusters  # JAX keeps its detection private; this is the list it walks
  return next((env for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if not env.opt_in_only_method and env.is_env_present()), None)


def start(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, timeout_s: int = 300) -> str:
  """Starts the JAX distributed runtime as `mode` asks; returns (and logs) a line saying which.

  "auto": when JAX's detection finds a cluster of more than one process, or a coordinator is given;
  one process otherwise. "true": always (an error when there is nothing to connect to). "false":
  never. Call it before anything touches a JAX backend.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {', '.join(MODES)}")
  if jax.distributed.is_initialized():
    return _say(f"distributed: already initialized, process {jax.process_index()} of {jax.process_count()}")
  if mode == "false":
    return _say("distributed: off (--distributed=false): one process")
  given = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  env = cluster_env()
  if env is None and not given:
    if mode == "true":
      raise StartError(
          "--distributed=true, but JAX's cluster detection found no cluster (it reads the Cloud TPU VM "
          "metadata server, GKE TPU, SLURM, Open MPI and Kubernetes environments) and no coordinator "
          "is given: pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or set "
          "JAX_COORDINATOR_ADDRESS), or leave --distributed at auto to train in one process")
    return _say("distributed: no cluster found by JAX's detection: one process")
  from jax._src import clusters
  coordinator, n, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      given, num_processes, process_id, None, None, timeout_s)
  if n is None or pid is None:
    raise StartError(f"coordinator {given!r} given outside a cluster JAX detects: also pass "
                     f"--num_processes (got {n}) and --process_id (got {pid})")
  where = f"{env.__name__} cluster" if env is not None else "explicit coordinator"
  if mode == "auto" and n == 1:  # e.g. a single-host TPU VM: nothing to connect
    return _say(f"distributed: {where} of one process: one process")
  jax.distributed.initialize(coordinator, n, pid, local_ids, initialization_timeout=timeout_s)
  return _say(f"distributed: process {pid} of {n} ({where}, coordinator {coordinator})")


def _say(line: str) -> str:
  log.info("%s", line)
  return line


class StopVote:
  """Stop decisions every process takes at the same step: any process's SIGTERM, process 0's clock.

  `cast()` before a step, `result(vote)` after it: with several processes the vote is a tiny
  all-reduce dispatched ahead of the step, so reading it waits only for the previous step (as the
  loop does anyway); one process reads its own flags, with no collective.
  """

  def __init__(self, preempted: Callable[[], bool], out_of_time: Callable[[], bool]):
    self.preempted, self.out_of_time = preempted, out_of_time
    self.multi = jax.process_count() > 1
    if self.multi:
      mesh = Mesh(np.array(jax.devices()), ("p",))
      self._sharding = NamedSharding(mesh, P("p"))
      self._reduce = jax.jit(lambda v: v.max(0), out_shardings=NamedSharding(mesh, P()))

  def cast(self) -> Any:
    """This process's vote, (preempted, out of time) (the clock counts on process 0 only)."""
    if not self.multi:
      return None
    row = [self.preempted(), jax.process_index() == 0 and self.out_of_time()]
    local = np.tile(np.array(row, np.int32), (jax.local_device_count(), 1))  # (local devices, 2)
    votes = jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(), 2))
    return self._reduce(votes)

  def result(self, vote: Any) -> tuple[bool, bool]:
    """(preempted, out_of_time), equal on every process."""
    if not self.multi:
      return self.preempted(), self.out_of_time()
    agreed = np.asarray(vote.addressable_data(0))  # (2,), replicated
    return bool(agreed[0]), bool(agreed[1])
