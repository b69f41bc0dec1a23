"""Orbax checkpoints of the train state plus the data iterator state, with resume and best-keeping."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Wraps `ocp.CheckpointManager`: async saves, keep the last N (and the best by a metric).

  Args:
    directory: where step folders go (created).
    keep: how many recent checkpoints to keep.
    best_metric: if set (e.g. "eval/accuracy"), checkpoints carrying the best value of this
      metric are kept too; `best_mode` is "max" or "min".
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    return self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, with_data: bool = True) -> tuple[Any, dict | None]:
    """Restores onto `abstract_state` (ShapeDtypeStructs with shardings: any mesh works)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = with_data and os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      args["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], (out["data"] if has_data else None)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete or abstract pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
