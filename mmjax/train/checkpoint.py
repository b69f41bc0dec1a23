"""Orbax checkpoints of the train state plus the data iterator state, with resume and best-keeping.

Faults are handled so that a run never loses more than one checkpoint interval:

- An interrupted save (SIGKILL, power loss) leaves only an Orbax temporary folder
  (`<step>.orbax-checkpoint-tmp-*`); steps are published by an atomic rename, so such a folder
  is never listed as a step. On Google Cloud Storage, which has no rename, Orbax writes the step
  folder in place and publishes it by a final `commit_success.txt`: a step folder without it
  is the leftover there. The trainer's Checkpointer removes these leftovers with a warning.
- Orbax deletes old steps in place, file by file (best-keeping may delete a step right after
  saving it), so an interrupted deletion leaves a listed step without some of its items. A step
  counts only when complete: finalized for Orbax, with every item its step metadata records
  (the data iterator state, the checksums); an incomplete step is handled as a corrupted one.
- Every checkpoint carries a checksum of each array (`integrity` item). A checkpoint that fails
  to read or whose arrays do not match their checksums (truncated or garbled files) raises
  `CorruptCheckpointError` naming the step; `restore_latest` then falls back to the newest step
  that restores, and moves the bad ones aside to `<step>.corrupt` (so the run can save that step
  again; on a bucket the move copies the step's objects). If every step fails (typically a
  config that no longer matches the checkpoints), nothing is moved and the error lists each
  step's reason.
- A failed write (disk full, permissions) raises `CheckpointSaveError` naming the step and the
  last complete step, which is left intact.

The data item holds every process's iterator state (`{"per_process": [state of process 0, ...]}`,
gathered and written by process 0); each process restores its own. Restored by another number of
processes, the data streams start afresh (with a warning): a shard's position means nothing to
another split of the data.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmjax import io_paths

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
PER_PROCESS = "per_process"  # the data item's key: the list of every process's iterator state


class CorruptCheckpointError(ValueError):
  """A checkpoint step that cannot be restored: unreadable files or array checksum mismatches."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...); earlier steps are intact."""


class Checkpointer:
  """Wraps `ocp.CheckpointManager`: async saves, keep the last N (and the best by a metric).

  Args:
    directory: where step folders go (created): a local path or a bucket URL (`gs://...`).
    keep: how many recent checkpoints to keep.
    best_metric: if set (e.g. "eval/accuracy"), checkpoints carrying the best value of this
      metric are kept too; `best_mode` is "max" or "min".
    async_save: write in a background thread (the arrays are copied to host first).
    cleanup: remove temporary folders of interrupted saves (with a warning). Only the process
      that owns the directory (the trainer) should set it: a reader such as the predictor would
      otherwise delete a save in flight.
  """

  def __init__(self, directory: io_paths.PathLike, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True, cleanup: bool = False):
    self.directory = io_paths.as_path(directory)
    self.best_metric = best_metric
    if cleanup and jax.process_index() == 0:
      self._remove_partial_saves()
    # The last `keep` steps (resume never goes back), plus the best one by the metric. Orbax's
    # own best-keeping keeps the `keep` best instead (deleting the step just saved when it scored
    # lower) and every step saved without metrics (so they pile up).
    policies = ocp.checkpoint_managers
    preserve = policies.LatestN(n=keep)
    if best_metric:
      best = policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                            keep_checkpoints_without_metrics=False)
      preserve = policies.AnyPreservationPolicy([preserve, best])
    opts = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        create=True,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,  # for best_step()
        best_mode=best_mode,
        preservation_policy=preserve,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=opts)
    self._in_flight: int | None = None

  def _remove_partial_saves(self) -> None:
    if not self.directory.is_dir():
      return
    # Orbax's rule for the kind of storage: a temporary name here, a missing commit file on GCS
    # (there, of step folders only: not `<step>.corrupt` nor a folder someone else put here).
    partial = sorted(n for n in ocp.step.tmp_checkpoints(self.directory)
                     if n.split(".")[0].isdigit() and not n.endswith(CORRUPT_SUFFIX))
    for name in partial:
      path = self.directory / name
      log.warning("removing %s: a partial checkpoint left by an interrupted save (the last "
                  "complete step is restored instead)", path)
      # Writers of a failed save in this process may still be finishing: they can make rmtree
      # fail, or recreate files after it, so it is done again until the folder stays gone.
      for attempt in range(10):
        try:
          path.rmtree()
        except OSError:  # gone already, or a writer is still in it
          pass
        time.sleep(0.05 * (attempt + 1))
        if not path.exists():
          break
      else:
        log.warning("could not remove %s; it is ignored (never listed as a step)", path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # -- saving ----------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_state: dict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `step` (finished in the background); raises CheckpointSaveError on failure.

    `data_state`: this process's data iterator state (JSON); with several processes every one
    passes its own (or every one None).
    """
    args = {"state": ocp.args.StandardSave(state),
            "integrity": ocp.args.JsonSave({"step": int(step), "checksums": checksums(state)})}
    if data_state is not None:  # JsonSave writes on process 0 only: it gets every process's state
      args["data"] = ocp.args.JsonSave({PER_PROCESS: _gather_json(data_state)})
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    self._check(self._finish_previous)
    self._in_flight = int(step)
    return self._check(lambda: self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                                                 force=force))

  def _finish_previous(self) -> None:
    """Waits for the save in flight; its failure is reported under its own step."""
    if self._in_flight is not None:
      self.manager.wait_until_finished()
      self._in_flight = None

  def _check(self, fn):
    """Runs fn; an error of the save in flight becomes a CheckpointSaveError naming its step."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      if step is None:
        raise
      cause = e
      while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
      self.manager.reload()
      complete = [s for s in self.all_steps() if s != step]
      raise CheckpointSaveError(
          f"saving checkpoint step {step} to {self.directory} failed: {type(cause).__name__}: {cause}. "
          f"The last complete checkpoint (step {complete[-1] if complete else None}) is intact."
      ) from e

  def wait(self) -> None:
    self._check(self.manager.wait_until_finished)
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  # -- restoring -------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state: Any, with_data: bool = True,
              partial: bool = False) -> tuple[Any, dict | None]:
    """Restores `step` onto `abstract_state` (ShapeDtypeStructs with shardings: any mesh works).

    `partial`: `abstract_state` names only some of the saved state's entries (serving reads the
    parameters, not the optimizer state); the others are not read.

    Returns (state, this process's data iterator state or None).

    Raises CorruptCheckpointError naming the step when it is incomplete, its files cannot be read
    or its arrays do not match the checksums saved with them.
    """
    items = self._saved_items(step)
    has_data = with_data and "data" in items
    has_integrity = "integrity" in items
    args = {}
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    if has_integrity:
      args["integrity"] = ocp.args.JsonRestore()
    try:
      if partial:  # the manager's handler for "state" restores whole trees only: read it directly
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
          state = reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
              item=abstract_state, partial_restore=True, restore_args=restore_args))
        out = dict(self.manager.restore(step, args=ocp.args.Composite(**args))) if args else {}
      else:
        out = dict(self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), **args)))
        state = out["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: "
                                   f"{type(e).__name__}: {e}") from e
    if has_integrity:
      want, got = out["integrity"]["checksums"], checksums(state)
      bad = sorted(k for k in (got if partial else want) if got.get(k) != want.get(k))
      if bad:
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupted: {len(bad)} array(s) do not "
            f"match their saved checksums ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    return state, (self._own_data_state(step, out["data"]) if has_data else None)

  def _own_data_state(self, step: int, saved: Any) -> Any:
    """This process's iterator state from a saved data item; None (a warning) when saved by
    another number of processes."""
    states = saved[PER_PROCESS] if isinstance(saved, dict) and PER_PROCESS in saved else [saved]  # older: one
    if len(states) != jax.process_count():
      log.warning("checkpoint step %d in %s holds the data iterator states of %d process(es), this run "
                  "has %d: the data streams start afresh (from the first batch of their new shards)",
                  step, self.directory, len(states), jax.process_count())
      return None
    return states[jax.process_index()]

  def _saved_items(self, step: int) -> set[str]:
    """The items `step` was saved with; CorruptCheckpointError if the step is not complete."""
    path = self.directory / str(step)
    where = f"checkpoint step {step} in {self.directory}"
    if not ocp.step.is_checkpoint_finalized(path):
      raise CorruptCheckpointError(f"{where} is not a finalized checkpoint")
    try:  # Orbax's record of the items, written before the step is published
      items = set(ocp.metadata.get_step_metadata(path).item_handlers or ())
    except (ValueError, OSError) as e:  # missing or unreadable
      raise CorruptCheckpointError(f"{where} is incomplete: its step metadata cannot be read "
                                   f"({type(e).__name__}: {e})") from e
    missing = sorted(n for n in items | {"state"}
                     if not ocp.step.is_checkpoint_finalized(path / n))
    if missing:
      raise CorruptCheckpointError(f"{where} is incomplete: item(s) {', '.join(missing)} missing "
                                   "(its deletion or save was interrupted)")
    return items

  def restore_latest(self, abstract_state: Any, with_data: bool = True) -> tuple[int, Any, dict | None] | None:
    """(step, state, data) of the newest complete step that restores; None without checkpoints.

    Incomplete or corrupted newer steps are logged, skipped and moved aside to `<step>.corrupt`;
    if no step restores, CorruptCheckpointError lists every step's reason and nothing is moved.
    """
    failures: list[tuple[int, CorruptCheckpointError]] = []
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, abstract_state, with_data)
      except CorruptCheckpointError as e:
        log.warning("%s; trying the previous checkpoint", e)
        failures.append((step, e))
        continue
      if failures:
        self._move_aside([s for s, _ in failures])
        log.warning("restored checkpoint step %d instead of the incomplete or corrupted newer step(s) %s",
                    step, [s for s, _ in failures])
      return step, state, data
    if failures:
      raise CorruptCheckpointError(f"no checkpoint in {self.directory} can be restored:\n" +
                                   "\n".join(str(e) for _, e in failures)) from failures[0][1]
    return None

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
        if dst.exists():
          dst.rmtree()
        src.rename(dst)
        log.warning("moved the incomplete or corrupted checkpoint %s aside to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("mmjax_checkpoint_move_aside")
    self.manager.reload()


def _gather_json(obj: Any) -> list[Any]:
  """`obj` (JSON-serialisable) of every process, in process order; collective across processes."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))  # (processes, 1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)  # (processes, longest)
  return [json.loads(bytes(row[:n])) for row, n in zip(np.asarray(rows), np.asarray(sizes)[:, 0])]


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete or abstract pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# ---------------------------------------------------------------------------------------------
# Checksums: a position-weighted sum of each array's bits, modulo 2**32, computed where the
# arrays live (one small jitted reduction per save and restore; only scalars reach the host).
# ---------------------------------------------------------------------------------------------
def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as a flat uint32 vector."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = jnp.dtype(x.dtype).itemsize
  if width >= 4:  # 8-byte types become (..., 2) uint32
    x = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    x = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[width]).astype(jnp.uint32)
  return x.reshape(-1)


@jax.jit
def _checksum_tree(tree: Any) -> Any:
  def one(x):
    bits = _bits(x)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32) ^ jnp.uint32(bits.size)
  return jax.tree.map(one, tree)


def checksums(state: Any) -> dict[str, int]:
  """{'params/enc/kernel': checksum, ...} of every array in `state`."""
  sums = jax.device_get(_checksum_tree(state))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): int(np.asarray(v))
          for path, v in jax.tree_util.tree_leaves_with_path(sums)}
