"""The task contract between the trainer and a task (model, loss, data, metrics)."""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import jax
import ml_collections
from flax import nnx

from mmjax.registry import Registry

TASKS = Registry("task", modules=("mmjax.tasks.av_digits", "mmjax.tasks.caption", "mmjax.tasks.clip",
                                 "mmjax.tasks.user_data"))


class Task(Protocol):
  """What `mmjax.train.trainer` needs from a task.

  Attributes:
    eval_splits: data splits evaluated at intervals.
    best_metric: the eval metric used to keep the best checkpoint ("test/accuracy").

  Served tasks also have `preprocess(pp_string)` (the parsed `config.input` pp string its
  `dataset` uses), `predictor` (a `mmjax.predict.Predictor` subclass with the task's requests) and
  `image_shape`: `mmjax.predict` preprocesses a request with `config.input.pp_eval`. A task served
  by `AnswerPredictor` may have `answer_probabilities(logits)` (B, A) -> (B, A): the scores its
  loss trains (default: softmax).
  """

  config: ml_collections.ConfigDict
  eval_splits: tuple[str, ...]
  best_metric: str

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The task's model, freshly initialised."""

  def loss_fn(self, model: nnx.Module, batch: dict[str, jax.Array], train: bool) -> tuple[jax.Array, dict]:
    """Scalar loss and a dict of scalar metrics for one global batch."""

  def eval_fn(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums of per-example statistics; examples with batch['valid'] False must count zero.

    Non-scalar outputs are per-example rows (B, ...) that the trainer concatenates over the
    split instead of summing (padding rows included: return batch['valid'] as a row to drop
    them), for metrics over the whole split such as CIDEr-D or retrieval recall@K.
    """

  def summarize(self, sums: dict[str, Any]) -> dict[str, float]:
    """Final metrics from summed statistics (floats) and concatenated rows (numpy arrays)."""

  def dataset(self, split: str, *, train: bool, batch_size: int, shard_index: int,
              shard_count: int) -> Iterable[dict[str, Any]]:
    """Host-local numpy batches; for train, an endless checkpointable iterator."""
