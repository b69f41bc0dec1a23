"""Inference on raw inputs (image files, question strings) from a trained workdir.

  predictor = Predictor.from_workdir("workdirs/vqa")          # best checkpoint, else the latest
  predictor.answer("scene.png", "What shape is the red object?")
  # {'answer': 'circle', 'probabilities': {'circle': 0.97, 'square': 0.02, ...}}

  python -m mmjax.predict --workdir workdirs/vqa --image scene.png --question "..." [--json]

The workdir is what `mmjax.train.trainer.train` writes: `config.json` and Orbax `checkpoints/`.
Only the parameters and model state are restored (not the optimizer state), onto the shardings
the config's mesh gives them, so a checkpoint saved on any mesh loads on any device count.

Each task kind gets one function, compiled ahead of time on first use for a fixed batch
(`batch_size`, by default the number of devices the batch is split over) and fixed question
length (the config's `data.max_len`): requests are padded to that shape, so serving never
retraces or recompiles. Preprocessing matches the training pipeline
(`mmjax.data.pipeline.sort_of_clevr_pipeline`): RGB uint8 pixels scaled to [0, 1], questions
tokenized with `[CLS] ... [SEP]`, truncated and padded to `max_len`.

Extension points: `caption(image)` and `classify(image, wav)` are where captioning and
audio-visual classification tasks will be served, in the same way as `answer`; no such task
exists in `mmjax.tasks` yet, so they raise NotImplementedError.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from mmjax import sharding

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, jax.Array]

# Pixel range of the Sort-of-CLEVR training pipeline (`sort_of_clevr_pipeline`'s default, which
# `SortOfClevrVQA.dataset` uses).
VQA_VALUE_RANGE = (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The workdir.
# ---------------------------------------------------------------------------------------------
def _tuples(x: Any) -> Any:
  """JSON lists back to tuples (configs write sequences as tuples), recursively."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The training config saved in `workdir/config.json`, with JSON lists turned back into tuples."""
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no config.json (looked for {path!r}); "
                            "is it a workdir written by mmjax.train.trainer.train?")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """`workdir/checkpoints`; FileNotFoundError naming it when it does not exist."""
  directory = os.path.join(os.fspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint folder (looked for {directory!r})")
  return directory


def restore_params(setup, workdir: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Restores {'params', 'model_state'} of `step` (default best, else latest) onto `setup`'s shardings.

  Returns the state and the step restored. Raises FileNotFoundError naming what was looked for
  when the workdir has no checkpoint or not the asked step.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from mmjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top

  directory = checkpoint_dir(workdir)
  ckpt = Checkpointer(directory, best_metric=setup.task.best_metric)
  try:
    steps = sorted(ckpt.manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint in {directory!r}")
    if step is None:
      step = ckpt.best_step()
      step = steps[-1] if step is None else step
    elif step not in steps:
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint of step {step} in "
                              f"{directory!r}; available steps: {steps}")
    abstract = {k: setup.abstract_state[k] for k in ("params", "model_state")}
    restore = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
  finally:
    ckpt.close()
  return dict(state), int(step)


# ---------------------------------------------------------------------------------------------
# Raw inputs.
# ---------------------------------------------------------------------------------------------
def load_image(image: ImageInput, size_hw: tuple[int, int], *, resize: bool = False,
               field: str = "image") -> np.ndarray:
  """A path, PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 of size `size_hw`.

  A path or PIL image in another mode (grey, RGBA, palette) is converted to RGB. A size other than
  `size_hw` is an error naming the expected H×W, unless `resize` (bilinear, via PIL).
  """
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{field}: no image file at {path!r}")
    with Image.open(path) as img:
      array = np.asarray(img.convert("RGB"))
  elif isinstance(image, Image.Image):
    array = np.asarray(image.convert("RGB"))
  elif isinstance(image, (np.ndarray, jax.Array)):
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
      raise TypeError(f"{field}: expected an (H, W, 3) uint8 RGB array (pixel values 0..255), "
                      f"got {array.dtype} {array.shape}")
  else:
    raise TypeError(f"{field}: expected a file path, a PIL image or an (H, W, 3) uint8 array, "
                    f"got {type(image).__name__}")
  h, w = size_hw
  if array.shape[:2] != (h, w):
    if not resize:
      raise ValueError(f"{field}: expected {h}×{w} pixels (H×W), got {array.shape[0]}×{array.shape[1]}; "
                       "pass resize=True (--resize) to resize it")
    array = np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))
  return array


def check_question(question: Any, field: str = "question") -> str:
  """A non-empty question string, stripped."""
  if not isinstance(question, str):
    raise TypeError(f"{field}: expected a str, got {type(question).__name__}")
  if not question.strip():
    raise ValueError(f"{field}: expected a non-empty question, got {question!r}")
  return question.strip()


# ---------------------------------------------------------------------------------------------
# The predictor.
# ---------------------------------------------------------------------------------------------
class Predictor:
  """Serves a trained model on raw inputs, with one compiled function per task kind.

  Attributes:
    setup: the `mmjax.train.trainer.Setup` of the training config (mesh, task, shardings).
    config: the training config.
    task: the task object (tokenizer, answer vocabulary, ...).
    state: {'params', 'model_state'} on the setup's shardings.
    step: the checkpoint step served (None when built from a state in memory).
    batch_size: the fixed batch every compiled function runs on.
    kind: "vqa", the kind of task served (None for a model of another kind).

  Args:
    setup: as above.
    state: a train state (extra entries such as the optimizer state are dropped).
    step: the step of `state`, for reference.
    batch_size: fixed batch; default (and required divisor) the number of devices the batch axis
      is split over.
  """

  def __init__(self, setup, state: dict[str, Any], *, step: int | None = None,
               batch_size: int | None = None):
    from mmjax.models.vqa import VQAModel  # pylint: disable=g-import-not-at-top

    self.setup, self.config, self.task = setup, setup.config, setup.task
    self.step = step
    shards = _batch_shards(setup)
    self.batch_size = shards if batch_size is None else int(batch_size)
    if self.batch_size < 1 or self.batch_size % shards:
      raise ValueError(f"batch_size: expected a positive multiple of {shards} (the devices the "
                       f"batch is split over), got {batch_size}")
    self._shardings = {k: setup.state_shardings[k] for k in ("params", "model_state")}
    self.state = jax.device_put({k: state[k] for k in self._shardings}, self._shardings)
    self._input_sharding = setup.batch_sharding(np.zeros((self.batch_size,)))
    self._compiled: dict[str, Any] = {}
    self._model = None
    self.kind = "vqa" if isinstance(self.model, VQAModel) else None

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None, *,
                   batch_size: int | None = None) -> "Predictor":
    """Loads `workdir`'s config and checkpoint `step` (default: best by the task's metric, else latest)."""
    import mmjax.tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
    from mmjax.train.trainer import Setup  # pylint: disable=g-import-not-at-top

    if not os.path.isdir(os.fspath(workdir)):
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} does not exist")
    config = load_workdir_config(workdir)
    checkpoint_dir(workdir)  # fail before building anything
    setup = Setup(config)
    state, step = restore_params(setup, workdir, step)
    return cls(setup, state, step=step, batch_size=batch_size)

  # -- plumbing --------------------------------------------------------------------------------
  @property
  def model(self):
    """A live NNX model of the state (for plots and probes; serving uses the compiled functions)."""
    if self._model is None:
      self._model = self.setup.model(self.state)
    return self._model

  def context(self):
    """The mesh and logical-axis rules the model runs under."""
    return self.setup.context()

  def run(self, name: str, fn: Callable, *inputs: np.ndarray) -> Any:
    """fn(model, *inputs) on up to `batch_size` rows, compiled once per `name`.

    `inputs` are arrays with the same leading size n <= batch_size; they are padded to the fixed
    batch (repeating the last row) and every output is cut back to n rows. The first call of a
    name compiles `fn` ahead of time for these shapes; later calls reuse it, and inputs of
    other shapes or dtypes are an error rather than a recompilation.
    """
    n = len(inputs[0])
    if not 0 < n <= self.batch_size or any(len(x) != n for x in inputs):
      raise ValueError(f"run({name!r}): inputs must share a leading size in 1..{self.batch_size}, "
                       f"got {[np.shape(x) for x in inputs]}")
    inputs = [self._pad(np.asarray(x)) for x in inputs]
    if name not in self._compiled:
      abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                    self.state)
      abstract_in = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._input_sharding) for x in inputs]
      pure = lambda state, *xs: fn(self.setup.model(state), *xs)
      replicated = NamedSharding(self.setup.mesh, P())
      jitted = jax.jit(pure, in_shardings=(self._shardings, *[self._input_sharding] * len(inputs)),
                       out_shardings=replicated)
      with self.context():
        self._compiled[name] = jitted.lower(abstract_state, *abstract_in).compile()
    with self.context():
      placed = [jax.device_put(x, self._input_sharding) for x in inputs]
      out = jax.device_get(self._compiled[name](self.state, *placed))
    return jax.tree.map(lambda y: y[:n], out)

  def _require(self, kind: str, method: str) -> None:
    if self.kind != kind:
      raise ValueError(f"{method}: needs a {kind} task; this workdir's task is {self.config.task!r}")

  def _batches(self, n: int):
    """Slices of at most `batch_size` covering range(n)."""
    return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

  def _pad(self, x: np.ndarray) -> np.ndarray:
    """x (n, ...) padded to the fixed batch by repeating its last row."""
    if len(x) == self.batch_size:
      return x
    return np.concatenate([x, np.repeat(x[-1:], self.batch_size - len(x), axis=0)])

  # -- VQA -------------------------------------------------------------------------------------
  @property
  def answers(self) -> tuple[str, ...]:
    """The answer vocabulary (index -> string)."""
    self._require("vqa", "answers")
    return tuple(self.task.answers)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model's input images."""
    return tuple(self.model.image_shape)

  def vqa_inputs(self, images: Sequence[ImageInput], questions: Sequence[str], *,
                 resize: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw images and questions -> images (N, H, W, 3) float32, question ids and mask (N, L), as in training."""
    from mmjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

    self._require("vqa", "vqa_inputs")
    if isinstance(questions, str):
      raise TypeError("questions: expected a sequence of strings, got one str (use answer() for one question)")
    if len(images) != len(questions):
      raise ValueError(f"images and questions: expected the same number, got {len(images)} and {len(questions)}")
    if not len(questions):
      raise ValueError("questions: expected at least one question")
    h, w, _ = self.image_shape
    pixels = np.stack([load_image(im, (h, w), resize=resize, field=f"images[{i}]" if len(images) > 1 else "image")
                       for i, im in enumerate(images)])
    texts = [check_question(q, f"questions[{i}]" if len(questions) > 1 else "question")
             for i, q in enumerate(questions)]
    ids, mask = tokenizer_lib.encode(self.task.tokenizer, texts, int(self.config.data.max_len))
    low, high = VQA_VALUE_RANGE
    return pixels.astype(np.float32) * ((high - low) / 255.0) + low, ids, mask

  def vqa_probabilities(self, images: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Preprocessed (N, ...) inputs -> answer probabilities (N, A), through the compiled function."""
    self._require("vqa", "vqa_probabilities")
    return np.concatenate([self.run("vqa", _vqa_probs, images[s], ids[s], mask[s])
                           for s in self._batches(len(ids))])

  def answer_batch(self, images: Sequence[ImageInput], questions: Sequence[str], *,
                   resize: bool = False) -> list[dict[str, Any]]:
    """Answers questions[i] about images[i]; see `answer`."""
    probs = self.vqa_probabilities(*self.vqa_inputs(images, questions, resize=resize))
    answers = self.answers
    out = []
    for p in probs:
      order = np.argsort(-p, kind="stable")
      out.append({"answer": answers[order[0]], "probabilities": {answers[i]: float(p[i]) for i in order}})
    return out

  def answer(self, image: ImageInput, question: str, *, resize: bool = False) -> dict[str, Any]:
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

  # -- extension points ------------------------------------------------------------------------
  def caption(self, image: ImageInput) -> str:
    """Extension point: the caption of `image`, once a captioning task exists in `mmjax.tasks`."""
    raise NotImplementedError(
        "caption: no captioning task exists in mmjax.tasks yet (this workdir's task is "
        f"{self.config.task!r}); a captioning task is served here like `answer`")

  def classify(self, image: ImageInput, wav: str | os.PathLike | np.ndarray) -> dict[str, Any]:
    """Extension point: audio-visual class probabilities, once such a task exists in `mmjax.tasks`."""
    raise NotImplementedError(
        "classify: no audio-visual classification task exists in mmjax.tasks yet (this workdir's "
        f"task is {self.config.task!r}); such a task is served here like `answer`")


def _vqa_probs(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Answer probabilities (B, A) of a VQA model."""
  logits, _ = model(images, ids, mask)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _batch_shards(setup) -> int:
  """How many devices the batch axis is split over in `setup`'s mesh."""
  spec = sharding.logical_to_spec(("batch",), setup.rules, setup.mesh)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  return int(np.prod([setup.mesh.shape[a] for a in axes], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmjax.predict --workdir W --image img.png --question "..." [--json]`."""
  parser = argparse.ArgumentParser(prog="python -m mmjax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints/)")
  parser.add_argument("--image", required=True, help="image file")
  parser.add_argument("--question", required=True, help="question about the image")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--resize", action="store_true", help="resize an image of another size")
  parser.add_argument("--top", type=int, default=5, help="how many probabilities to print")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  try:
    predictor = Predictor.from_workdir(args.workdir, args.step)
    out = predictor.answer(args.image, args.question, resize=args.resize)
  except (FileNotFoundError, ValueError, TypeError) as e:
    parser.exit(2, f"error: {e}\n")
  top = dict(list(out["probabilities"].items())[:max(args.top, 1)])
  if args.json:
    print(json.dumps({"answer": out["answer"], "probabilities": top, "step": predictor.step}))
  else:
    print(f"answer: {out['answer']}")
    for name, p in top.items():
      print(f"  {name:>12s}  {p:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
