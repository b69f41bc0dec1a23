"""The Sort-of-CLEVR VQA task: its model, loss, per-kind accuracy and predictor.

Registered in TASKS as "vqa_sort_of_clevr"; configs name it
"mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr" (importing this module registers it, and
the answer-keeping mirror `mm.sort_of_clevr_flip` among the pp ops). The input pipeline is the
config's pp strings (`input.pp_train`, `input.pp_eval`) over the data set's records, questions
tokenised with the task's tokenizer; `VqaPredictor` answers questions about images with them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import losses, predict
from mmjax.data import pipeline, scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr
from mmjax.data.pp.image import get_image
from mmjax.data.pp.registry import Example, bad, register
from mmjax.metrics.vqa import majority_answers
from mmjax.models import build_model
from mmjax.models.vqa import VQAModel
from mmjax.train.tasks import TASKS


# ---------------------------------------------------------------------------------------------
# Augmentation.
# ---------------------------------------------------------------------------------------------
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
# Serving.
# ---------------------------------------------------------------------------------------------
def answer_probabilities(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Answer probabilities (B, A) of a VQA model on images (B, H, W, 3) and questions (B, L)."""
  logits, _ = model(images, ids, mask)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class VqaPredictor(predict.Predictor):
  """Answers questions about images."""

  request_fields = ("image", "question")

  @property
  def answers(self) -> tuple[str, ...]:
    """The answer vocabulary (index -> string)."""
    return tuple(self.task.answers)

  def vqa_inputs(self, images: Sequence[predict.ImageInput], questions: Sequence[str], *,
                 resize: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw images and questions -> images (N, H, W, 3) float32, question ids and mask (N, L), by
    the config's eval pp string."""
    if isinstance(questions, str):
      raise TypeError("questions: expected a sequence of strings, got one str (use answer() for one question)")
    if len(images) != len(questions):
      raise ValueError(f"images and questions: expected the same number, got {len(images)} and {len(questions)}")
    if not len(questions):
      raise ValueError("questions: expected at least one question")
    image_names = predict.request_names("image", len(images))
    records = [{"image": predict.read_image(im, field=n)} for im, n in zip(images, image_names)]
    for record, q, n in zip(records, questions, predict.request_names("question", len(questions))):
      record["questions"] = predict.check_text(q, n)
    out = self.preprocess(records, resize=resize, image_names=image_names)
    return out["image"], out["question_ids"], out["question_mask"]

  def vqa_probabilities(self, images: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Preprocessed (N, ...) inputs -> answer probabilities (N, A), through the compiled function."""
    return self.run_batches("vqa", answer_probabilities, images, ids, mask)

  def answer_batch(self, images: Sequence[predict.ImageInput], questions: Sequence[str], *,
                   resize: bool = False) -> list[dict[str, Any]]:
    """Answers questions[i] about images[i]; see `answer`."""
    probs = self.vqa_probabilities(*self.vqa_inputs(images, questions, resize=resize))
    return predict.top_classes(probs, self.answers, "answer")

  def answer(self, image: predict.ImageInput, question: str, *, resize: bool = False) -> dict[str, Any]:
    """Answers `question` about `image`.

    Args:
      image: a file path, a PIL image or an (H, W, 3) uint8 RGB array of the training size.
      question: the question text.
      resize: resize an image of another size instead of raising.

    Returns:
      {'answer': the most probable answer, 'probabilities': {answer: p} over the whole answer
      vocabulary, most probable first}.
    """
    return self.answer_batch([image], [question], resize=resize)[0]

  def predict(self, *, image, question, resize: bool = False) -> dict[str, Any]:
    """The command line's request: `answer`."""
    return self.answer(image, question, resize=resize)


# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------
@TASKS.register("vqa_sort_of_clevr")
class SortOfClevrVQA(pipeline.ConfigInput):
  """Sort-of-CLEVR: 20 questions per image, accuracy per kind (relational / non-relational).

  Batches (the config's pp strings make them): image (B, 75, 75, 3) float32, question_ids and
  question_mask (B, 20, L), answer, kind, subtype and color (B, 20) int32: indices into
  `sort_of_clevr.ANSWERS`, `KINDS`, `SUBTYPES` and `scenes.COLORS` (the colour a question names).
  """

  best_metric = "test/accuracy"
  image_shape = (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
  predictor = VqaPredictor

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = self._load_tokenizer()
    self.answers = sort_of_clevr.ANSWERS

  def _load_tokenizer(self):
    """`data.tokenizer`: "minilm" or a tokenizer folder; "" for MiniLM's with the "minilm" text
    encoder (its vocabulary), else the data set's own WordPiece."""
    name = self.config.data.tokenizer or (
        "minilm" if self.config.model.encoders.text.name == "minilm" else None)
    if name is None:
      return sort_of_clevr.load_tokenizer(
          self.config.data.data_dir, config=sort_of_clevr.sized_config(self.config.data.num_images))
    if name == "minilm":
      from mmjax.transfer import minilm  # noqa: PLC0415 (optional dependency)
      return minilm.load_tokenizer()
    return tokenizer_lib.load_tokenizer(name)

  # -- model -----------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> VQAModel:
    """`config.model` as is (`mmjax.models.build_model`), sized by the data."""
    return build_model(self.config.model, rngs=rngs, base=VQAModel,
                       fill={"vocab_size": self.tokenizer.vocab_size}, num_answers=len(self.answers),
                       image_shape=self.image_shape, question_len=self.config.data.max_len)

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
