"""Tasks without data, to plan real-scale models from batch shapes alone (`mmjax.train.plan`).

Each has the task contract's model, loss and metrics (`mmjax.train.tasks.Task`) and
`abstract_batch(split, batch_size)`, the shapes and dtypes of one global batch of `split` (the hook
`mmjax.train.plan` reads instead of drawing a real batch); `dataset` raises: they compile, they do
not train. A config names them as "mmjax.train.plan_tasks:<name>":
"plan_image_classification" (a vision encoder and its classification head, e.g. ViT-B/16 on
ImageNet-sized inputs), "plan_vqa" (`VQAModel`, e.g. LXMERT's BERT + ViT streams and
cross-modality layers, with VQA v2's soft-score loss) and "plan_clip" (a CLIP `DualEncoder`).

Config: `model` as every task's (`mmjax.models.build_model`: name, encoders, the constructor's
arguments; plan_image_classification builds `model.encoders.image` alone); `data.batch_size`,
`data.eval_batch_size`, `data.image_shape` (H, W, C), and `data.num_classes` / `data.num_answers` /
`data.max_len` where the task needs them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmjax import losses
from mmjax.models import build_model
from mmjax.models.base import build_encoder
from mmjax.models.dual_encoder import DualEncoder
from mmjax.models.vqa import VQAModel
from mmjax.train.tasks import TASKS

S = jax.ShapeDtypeStruct


class _ShapesOnly:
  """What the shape-only tasks share: config, splits, no data."""

  best_metric = "eval/accuracy"
  eval_splits = ("eval",)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.image_shape = tuple(int(s) for s in config.data.image_shape)

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    raise NotImplementedError(f"task {self.config.task!r} has shapes only (see mmjax.train.plan_tasks): "
                              "plan it with `python -m mmjax.train.plan`, it has no data to train on")

  def summarize(self, sums: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": sums["correct"] / max(sums["count"], 1)}


def _counts(correct: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  return {"correct": (correct & valid).sum(), "count": valid.sum()}


@TASKS.register("plan_image_classification")
class ImageClassification(_ShapesOnly):
  """`model.encoders.image`: an encoder spec with a classification head, e.g. {"name": "vit",
  "variant": "B/16", "num_classes": 1000}; `model.dtype` its compute dtype (parameters stay f32);
  `data.num_classes` its classes."""

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    m = self.config.model
    return build_encoder(m.encoders.image.to_dict(), rngs=rngs, dtype=jnp.dtype(m.dtype))

  def loss_fn(self, model, batch, train):
    logits = model.classify(batch["image"], deterministic=not train)  # (B, C)
    loss, metrics = losses.softmax_cross_entropy(logits, batch["label"])
    return loss, {"accuracy": metrics["accuracy"]}

  def eval_fn(self, model, batch):
    return _counts(model.classify(batch["image"]).argmax(-1) == batch["label"], batch["valid"])

  def abstract_batch(self, split: str, batch_size: int) -> dict[str, S]:
    return {"image": S((batch_size, *self.image_shape), jnp.float32),  # (B, H, W, C)
            "label": S((batch_size,), jnp.int32)}


@TASKS.register("plan_vqa")
class VisualQuestionAnswering(_ShapesOnly):
  """A `VQAModel` (`model.name` "vqa") sized by `data`: one question of `data.max_len` tokens per
  image, `data.num_answers` answers scored softly (VQA v2's targets, LXMERT's loss)."""

  def build_model(self, rngs: nnx.Rngs) -> VQAModel:
    d = self.config.data
    return build_model(self.config.model, rngs=rngs, base=VQAModel, num_answers=int(d.num_answers),
                       image_shape=self.image_shape, question_len=int(d.max_len))

  def loss_fn(self, model, batch, train):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"],
                      deterministic=not train)  # (B, A)
    loss, _ = losses.soft_score_bce(logits, batch["answer_scores"])
    return loss, {}

  def eval_fn(self, model, batch):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"])
    best = jnp.take_along_axis(batch["answer_scores"], logits.argmax(-1)[:, None], axis=-1)[:, 0]
    return _counts(best > 0, batch["valid"])

  def abstract_batch(self, split: str, batch_size: int) -> dict[str, S]:
    d = self.config.data
    length = int(d.max_len)
    return {"image": S((batch_size, *self.image_shape), jnp.float32),  # (B, H, W, C)
            "question_ids": S((batch_size, length), jnp.int32),
            "question_mask": S((batch_size, length), jnp.bool_),
            "answer_scores": S((batch_size, int(d.num_answers)), jnp.float32)}  # (B, A) in [0, 1]


@TASKS.register("plan_clip")
class ContrastiveImageText(_ShapesOnly):
  """A `DualEncoder` (`model.name` "dual_encoder") with towers `model.encoders.image` and
  `model.encoders.text` (e.g. "vit" and "clip_text"); captions of `data.max_len` tokens."""

  def build_model(self, rngs: nnx.Rngs) -> DualEncoder:
    length = int(self.config.data.max_len)
    examples = {"image": S((1, *self.image_shape), jnp.float32),
                "text": (S((1, length), jnp.int32), S((1, length), jnp.bool_))}
    return build_model(self.config.model, rngs=rngs, base=DualEncoder, input_examples=examples)

  def _embed(self, model, batch, train):
    return model({"image": batch["image"], "text": (batch["caption_ids"], batch["caption_mask"])},
                 deterministic=not train)[0]

  def loss_fn(self, model, batch, train):
    loss, metrics = model.loss(self._embed(model, batch, train))
    return loss, {k: v for k, v in metrics.items() if k != "loss"}

  def eval_fn(self, model, batch):
    emb = self._embed(model, batch, False)
    best = (emb["image"] @ emb["text"].T).argmax(-1)  # image -> text retrieval within the batch
    return _counts(best == jnp.arange(best.shape[0]), batch["valid"])

  def abstract_batch(self, split: str, batch_size: int) -> dict[str, S]:
    length = int(self.config.data.max_len)
    return {"image": S((batch_size, *self.image_shape), jnp.float32),
            "caption_ids": S((batch_size, length), jnp.int32),
            "caption_mask": S((batch_size, length), jnp.bool_)}
