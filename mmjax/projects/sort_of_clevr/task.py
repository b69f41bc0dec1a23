"""The Sort-of-CLEVR VQA task: its input pipeline, model, loss and per-kind accuracy.

Registered in TASKS as "vqa_sort_of_clevr"; configs name it
"mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr" (importing this module registers it, and
the answer-keeping mirror `mm.sort_of_clevr_flip` among the pp ops).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import losses
from mmjax.data import pipeline, scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr
from mmjax.data.pp.image import get_image
from mmjax.data.pp.registry import Example, bad, register
from mmjax.metrics.vqa import majority_answers
from mmjax.projects.sort_of_clevr.model import UniqueQuestionsVQA
from mmjax.train.tasks import TASKS


# ---------------------------------------------------------------------------------------------
# Input pipeline.
# ---------------------------------------------------------------------------------------------
class SortOfClevrPreprocess:
  """Sort-of-CLEVR record -> VQA example with all 20 questions of the image.

  Output: image (75, 75, 3) float32 in `value_range`; question_ids (20, L) int32 and
  question_mask (20, L) bool (`[CLS] ... [SEP]`, padded to L = `max_len`); answer, kind,
  subtype, color (20,) int32 (indices into `sort_of_clevr.ANSWERS`, `KINDS`, `SUBTYPES` and
  `scenes.COLORS`: the colour each question names).
  Tokenized questions are cached (the data set has few distinct sentences).

  Attributes:
    tokenizer: the tokenizer of the questions.
    max_len: L.
    value_range: (low, high) that pixel values 0 and 255 map to.
  """

  def __init__(self, tokenizer, max_len: int = 32, value_range: tuple[float, float] = (0.0, 1.0)):
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2, got {max_len}")
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.value_range = (float(value_range[0]), float(value_range[1]))
    self._cache: dict[bytes | str, tuple[np.ndarray, np.ndarray]] = {}

  def _encode(self, questions) -> tuple[np.ndarray, np.ndarray]:
    """(Q, L) ids and mask of `questions`, through the cache."""
    missing = [q for q in dict.fromkeys(questions) if q not in self._cache]
    if missing:
      ids, mask = tokenizer_lib.encode(self.tokenizer, missing, self.max_len)
      self._cache.update(zip(missing, zip(ids, mask)))
    rows = [self._cache[q] for q in questions]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    del rng  # Deterministic.
    image = example["image"]
    if isinstance(image, bytes):
      image = scenes.decode_png(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"field 'image' must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    low, high = self.value_range
    ids, mask = self._encode(list(example["questions"]))
    return {
      "image": (image.astype(np.float32) * ((high - low) / 255.0) + low),
      "question_ids": ids,
      "question_mask": mask,
      "answer": np.asarray(example["answers"], np.int32),
      "kind": np.asarray(example["kinds"], np.int32),
      "subtype": np.asarray(example["subtypes"], np.int32),
      "color": np.asarray(example["question_colors"], np.int32),
    }

  def __getstate__(self) -> dict:
    """Pickles without the cache."""
    return {**self.__dict__, "_cache": {}}


class VqaData(NamedTuple):
  """A VQA input pipeline with what a model needs to read it.

  Attributes:
    dataset: the Grain `IterDataset` of batches.
    tokenizer: the question tokenizer.
    answers: the answer vocabulary (index -> string).
  """

  dataset: grain.IterDataset
  tokenizer: Any
  answers: tuple[str, ...]


def sort_of_clevr_pipeline(
  split: str,
  batch_size: int,
  *,
  data_dir: str | None = None,
  config: Any = None,
  max_len: int = 32,
  value_range: tuple[float, float] = (0.0, 1.0),
  seed: int = 0,
  training: bool | None = None,
  tokenizer: Any = None,
  **kwargs: Any,
) -> VqaData:
  """Sort-of-CLEVR batches for VQA (the data set is built on first use).

  Batches: image (B, 75, 75, 3) float32, question_ids (B, 20, L) int32, question_mask
  (B, 20, L) bool, answer / kind / subtype / color (B, 20) int32. With the default L = 32 no
  question of any split is truncated (train/test need 17 tokens, paraphrase 32).

  Args:
    split: 'train', 'test' or 'paraphrase'.
    batch_size: images per batch on this host (each has 20 questions).
    data_dir: data folder (default `$MMJAX_DATA_DIR` or `~/.cache/mmjax/datasets`).
    config: a `SortOfClevrConfig` (e.g. fewer images), default the full data set.
    max_len: L, question length in tokens.
    value_range: pixel range.
    seed: shuffle and preprocess seed.
    training: default `split == 'train'`. Training shuffles, repeats forever and drops the
      last partial batch; evaluation reads each image once in order and zero-pads the last
      batch (with a `valid` (B,) field).
    tokenizer: the question tokenizer (e.g. a pretrained text encoder's); default the data
      set's own WordPiece, trained on the train questions.
    **kwargs: overrides of `mmjax.data.pipeline.make_pipeline` arguments (worker_count,
      shard_index, ...).

  Returns:
    `VqaData(dataset, tokenizer, answers)`.
  """
  source = sort_of_clevr.load(split, data_dir, config=config)
  if tokenizer is None:
    tokenizer = sort_of_clevr.load_tokenizer(data_dir, config=config)
  training = split == "train" if training is None else training
  mode = (dict(shuffle=True, num_epochs=None, drop_remainder=True) if training else
          dict(shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True))
  dataset = pipeline.make_pipeline(
    source,
    batch_size=batch_size,
    preprocess=SortOfClevrPreprocess(tokenizer, max_len, value_range),
    seed=seed,
    **{**mode, **kwargs},
  )
  return VqaData(dataset, tokenizer, sort_of_clevr.ANSWERS)


_FLIP_FIELDS = ("answers", "subtypes", "question_colors", "colors", "xs")


@register("mm.sort_of_clevr_flip")
@dataclasses.dataclass
class SortOfClevrFlip:
  """Mirrors a Sort-of-CLEVR image left-right with probability p, keeping every answer true.

  The mirrored scene has x' = W - 1 - x. Answers of "is the <colour> object on the left?"
  questions are recomputed from x' (yes iff x' < W / 2, the data set's rule; an object on the
  centre column stays "left"); shape, top/bottom, count, closest and furthest answers do not
  change under a mirror. The `xs` metadata is mirrored too, so later ops see the flipped scene.
  Records without the metadata, with an unknown question subtype, or whose stored position
  answers disagree with their own metadata are refused with a `BadExample`.

  Attributes:
    p: probability of flipping.
    key: the (W, W, 3) image field (decoded).
  """

  p: float = 0.5
  key: str = "image"

  @staticmethod
  def _position_answers(xs: np.ndarray, qcolors: np.ndarray, colors: np.ndarray,
                        width: int) -> np.ndarray:
    """Answer of "on the left?" for each question colour, from object centres `xs`."""
    obj = np.argmax(colors[None, :] == qcolors[:, None], axis=1)  # (Q,) object of each question
    return np.where(xs[obj] < width / 2, sort_of_clevr.YES, sort_of_clevr.NO)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    image = get_image(example, self.key)
    if rng.random() >= self.p:
      return example
    missing = [f for f in _FLIP_FIELDS if f not in example]
    if missing:
      raise bad(example, missing[0], f"cannot relabel a flipped Sort-of-CLEVR record without "
                f"its metadata; missing fields {missing}")
    answers, subtypes, qcolors, colors, xs = (np.asarray(example[f]) for f in _FLIP_FIELDS)
    width = image.shape[1]
    if not (answers.shape == subtypes.shape == qcolors.shape and colors.shape == xs.shape):
      raise bad(example, "answers", "answers/subtypes/question_colors or colors/xs disagree in "
                f"length: {answers.shape}, {subtypes.shape}, {qcolors.shape}; {colors.shape}, {xs.shape}")
    unknown = sorted(set(subtypes.tolist()) - set(range(len(sort_of_clevr.SUBTYPES))))
    if unknown:
      raise bad(example, "subtypes", f"unknown question subtypes {unknown}; cannot relabel")
    if not np.isin(qcolors, colors).all():
      raise bad(example, "question_colors", "a question names a colour absent from the scene")
    horizontal = subtypes == sort_of_clevr.SUBTYPES.index("horizontal")
    before = self._position_answers(xs, qcolors, colors, width)
    if (answers[horizontal] != before[horizontal]).any():
      raise bad(example, "answers", "left/right answers disagree with the scene metadata; "
                "refusing to relabel")
    flipped_xs = (width - 1 - xs).astype(xs.dtype)
    after = self._position_answers(flipped_xs, qcolors, colors, width)
    new_answers = np.where(horizontal, after, answers).astype(answers.dtype)
    return {**example, self.key: np.ascontiguousarray(image[:, ::-1]), "answers": new_answers,
            "xs": flipped_xs}


# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------
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

  def build_model(self, rngs: nnx.Rngs) -> UniqueQuestionsVQA:
    return UniqueQuestionsVQA(**self.model_kwargs(), rngs=rngs)

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
    return sort_of_clevr_pipeline(
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
