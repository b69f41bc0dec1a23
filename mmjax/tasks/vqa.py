"""Task glue for VQA on Sort-of-CLEVR: data pipeline, model, loss and per-kind accuracy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import losses
from mmjax.data import pipeline, scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr
from mmjax.metrics.vqa import majority_answers
from mmjax.models.vqa import VQAModel
from mmjax.train.tasks import TASKS


@TASKS.register("vqa_sort_of_clevr")
class SortOfClevrVQA:
  """Sort-of-CLEVR: 20 questions per image, accuracy per kind (relational / non-relational)."""

  best_metric = "test/accuracy"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = self._load_tokenizer()
    self.answers = sort_of_clevr.ANSWERS

  def _load_tokenizer(self):
    """`data.tokenizer`: "minilm" or a tokenizer folder; default MiniLM's for the "minilm" text
    encoder (its vocabulary), else the data set's own WordPiece."""
    name = self.config.data.get("tokenizer") or (
        "minilm" if self.config.model.text.get("name") == "minilm" else None)
    if name is None:
      return sort_of_clevr.load_tokenizer(
          self.config.data.data_dir, config=sort_of_clevr.sized_config(self.config.data.num_images))
    if name == "minilm":
      from mmjax.transfer import minilm  # noqa: PLC0415 (optional dependency)
      return minilm.load_tokenizer()
    return tokenizer_lib.load_tokenizer(name)

  # -- model -----------------------------------------------------------------------------------
  def model_kwargs(self) -> dict[str, Any]:
    m = self.config.model
    text = dict(m.text)
    if "vocab_size" in text and not text["vocab_size"]:
      text["vocab_size"] = self.tokenizer.vocab_size
    return dict(vision=dict(m.vision), text=text, fusion=m.fusion,
                fusion_kwargs=dict(m.fusion_kwargs), features=m.features,
                num_answers=len(self.answers), image_shape=(75, 75, 3),
                question_len=self.config.data.max_len, head_hidden=m.head_hidden,
                modality_dropout=m.modality_dropout,
                question_tokens=m.get("question_tokens", "all"),
                unique_questions=m.get("unique_questions", 0),
                dtype=jnp.dtype(m.get("dtype", "float32")))  # compute dtype; parameters stay f32

  def build_model(self, rngs: nnx.Rngs) -> VQAModel:
    return VQAModel(**self.model_kwargs(), rngs=rngs)

  # -- loss and metrics ------------------------------------------------------------------------
  def loss_fn(self, model, batch, train):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"],
                      deterministic=not train)  # (B, Q, A)
    loss, metrics = losses.softmax_cross_entropy(logits, batch["answer"])
    return loss, {"accuracy": metrics["accuracy"]}

  def eval_fn(self, model, batch):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"])
    valid = jnp.broadcast_to(batch["valid"][:, None], batch["answer"].shape)  # (B, Q)
    return _counts((logits.argmax(-1) == batch["answer"]) & valid, valid, batch)

  def summarize(self, sums):
    out = {"accuracy": sums["correct"] / max(sums["count"], 1)}
    names = sort_of_clevr.KINDS + sort_of_clevr.SUBTYPES
    for name in names + tuple(f"non_relational_{c}" for c in scenes.COLORS):
      out[f"accuracy_{name}"] = sums[f"correct_{name}"] / max(sums[f"count_{name}"], 1)
    return out

  def prior_baseline(self, split: str, train_split: str = "train") -> dict[str, float]:
    """The answer prior's metrics on `split`, keyed as `summarize`'s: every question answered with
    the most frequent answer of its subtype in `train_split`: what a model that ignores the image
    can reach (a question's colour and wording carry no more about its answer than its subtype)."""
    train, evaluated = self.question_arrays(train_split), self.question_arrays(split)
    guess = majority_answers(train["answer"], train["subtype"], evaluated["subtype"])  # (N, Q)
    sums = _counts(guess == evaluated["answer"], np.ones(guess.shape, bool), evaluated)
    return {k: float(v) for k, v in self.summarize(sums).items()}

  def question_arrays(self, split: str) -> dict[str, np.ndarray]:
    """answer, kind, subtype and color (the colour a question names) of every question of
    `split`: (images, questions per image) int arrays."""
    source = self.source(split)
    records = [source[i] for i in range(len(source))]
    keys = {"answer": "answers", "kind": "kinds", "subtype": "subtypes", "color": "question_colors"}
    return {k: np.stack([np.asarray(r[v]) for r in records]) for k, v in keys.items()}

  # -- data ------------------------------------------------------------------------------------
  def source(self, split: str):
    """The raw records of `split` (random access; see `sort_of_clevr.load`)."""
    d = self.config.data
    return sort_of_clevr.load(split, d.data_dir, config=sort_of_clevr.sized_config(d.num_images))

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    d = self.config.data
    return pipeline.sort_of_clevr_pipeline(
        split, batch_size, data_dir=d.data_dir, config=sort_of_clevr.sized_config(d.num_images),
        max_len=d.max_len, seed=int(self.config.seed), training=train, shard_index=shard_index,
        shard_count=shard_count, worker_count=d.worker_count if train else 0,
        tokenizer=self.tokenizer).dataset


def _counts(correct, valid, batch) -> dict[str, Any]:
  """correct, valid (B, Q) bool (numpy or jax) -> the correct / count sums `summarize` reads:
  overall, per kind, per subtype and per colour of the non-relational questions."""
  out = {"correct": correct.sum(), "count": valid.sum()}
  for k, name in enumerate(sort_of_clevr.KINDS):
    sel = batch["kind"] == k
    out[f"correct_{name}"] = (correct & sel).sum()
    out[f"count_{name}"] = (valid & sel).sum()
  for s, name in enumerate(sort_of_clevr.SUBTYPES):
    sel = batch["subtype"] == s
    out[f"correct_{name}"] = (correct & sel).sum()
    out[f"count_{name}"] = (valid & sel).sum()
  # Non-relational accuracy per colour the question names: a model learns to find the named
  # object one colour at a time, and these show which colours it has bound.
  non_relational = batch["kind"] == sort_of_clevr.KINDS.index("non_relational")
  for c, name in enumerate(scenes.COLORS):
    sel = non_relational & (batch["color"] == c)
    out[f"correct_non_relational_{name}"] = (correct & sel).sum()
    out[f"count_non_relational_{name}"] = (valid & sel).sum()
  return out
