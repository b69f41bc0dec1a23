"""Inference on raw inputs (image files, question strings, wav files) from a trained workdir.

  predictor = Predictor.from_workdir("workdirs/vqa")          # best checkpoint, else the latest
  predictor.answer("scene.png", "What shape is the red object?")
  # {'answer': 'circle', 'probabilities': {'circle': 0.97, 'square': 0.02, ...}}
  Predictor.from_workdir("workdirs/caption").caption("scene.png")
  # {'caption': 'a red circle in the top left of the image', 'score': -1.9, 'log_prob': -1.9}
  Predictor.from_workdir("workdirs/av").classify("digit.png", "seven.wav")
  # {'class': 'seven', 'label': 7, 'probabilities': {'seven': 0.98, ...}}

  python -m mmjax.predict --workdir workdirs/vqa --image scene.png --question "..." [--json]
  python -m mmjax.predict --workdir workdirs/caption --image scene.png [--beam]
  python -m mmjax.predict --workdir workdirs/av --image digit.png --wav seven.wav

The workdir is what `mmjax.train.trainer.train` writes: `config.json` and Orbax `checkpoints/`.
Only the parameters and model state are restored (not the optimizer state), onto the shardings
the config's mesh gives them, so a checkpoint saved on any mesh loads on any device count.

Each task kind gets one function, compiled ahead of time on first use for a fixed batch
(`batch_size`, by default the number of devices the batch is split over) and fixed question
length (the config's `data.max_len`): requests are padded to that shape, so serving never
retraces or recompiles. VQA preprocessing matches the VQA task's training pipeline: RGB uint8
pixels scaled to [0, 1], questions tokenized with `[CLS] ... [SEP]`, truncated and padded to
`max_len`. Captioning decodes inside the compiled function (greedy or beam search, one
compilation per method). Audio-visual classification prepares a wav as
`mmjax.data.datasets.av_digits` made its records: resampled to 16 kHz, leading and trailing
silence trimmed (40 dB), cropped or zero-padded to 1 s; the log-mel front end runs inside the
model. Calling a method of another task kind is a ValueError.
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

# Pixel range the VQA task's training pipeline maps uint8 pixels 0 and 255 to.
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
               field: str = "image", channels: int = 3) -> np.ndarray:
  """A path, PIL image or (H, W, C) uint8 array -> (H, W, C) uint8 of size `size_hw`.

  C is `channels`: 3 (RGB) or 1 (grey; an (H, W) array is accepted too). A path or PIL image in
  another mode (grey, RGBA, palette, RGB) is converted to RGB or to grey ("L"). A size other than
  `size_hw` is an error naming the expected H×W, unless `resize` (bilinear, via PIL).
  """
  if channels not in (1, 3):
    raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels}")
  mode, kind = ("RGB", "RGB") if channels == 3 else ("L", "grey")
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{field}: no image file at {path!r}")
    with Image.open(path) as img:
      array = np.asarray(img.convert(mode))
  elif isinstance(image, Image.Image):
    array = np.asarray(image.convert(mode))
  elif isinstance(image, (np.ndarray, jax.Array)):
    array = np.asarray(image)
    if channels == 1 and array.ndim == 2:
      array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != channels:
      raise TypeError(f"{field}: expected an (H, W, {channels}) uint8 {kind} array (pixel values "
                      f"0..255), got {array.dtype} {array.shape}")
  else:
    raise TypeError(f"{field}: expected a file path, a PIL image or an (H, W, {channels}) uint8 "
                    f"array, got {type(image).__name__}")
  h, w = size_hw
  if array.shape[:2] != (h, w):
    if not resize:
      raise ValueError(f"{field}: expected {h}×{w} pixels (H×W), got {array.shape[0]}×{array.shape[1]}; "
                       "pass resize=True (--resize) to resize it")
    grey = channels == 1 and array.ndim == 3
    array = np.asarray(Image.fromarray(array[..., 0] if grey else array).resize((w, h), Image.BILINEAR))
  return array.reshape(h, w, channels)


def check_question(question: Any, field: str = "question") -> str:
  """A non-empty question string, stripped."""
  if not isinstance(question, str):
    raise TypeError(f"{field}: expected a str, got {type(question).__name__}")
  if not question.strip():
    raise ValueError(f"{field}: expected a non-empty question, got {question!r}")
  return question.strip()


WavInput = Union[str, os.PathLike, np.ndarray]


def load_wav(wav: WavInput, *, field: str = "wav") -> tuple[np.ndarray, int]:
  """A wav file path or a mono (T,) waveform at 16 kHz -> (16000,) float32 and its spoken samples.

  Prepared as `mmjax.data.datasets.av_digits` prepares its records: resampled to 16 kHz (files
  carry their rate), leading and trailing silence trimmed (frames 40 dB below the loudest), cut
  to 1 s and zero-padded. A missing file is a FileNotFoundError; an empty, unreadable or silent
  one a ValueError naming `field`.
  """
  import soundfile  # pylint: disable=g-import-not-at-top

  from mmjax.data import pp  # pylint: disable=g-import-not-at-top
  from mmjax.data.datasets import av_digits  # pylint: disable=g-import-not-at-top

  rate = av_digits.SAMPLE_RATE
  if isinstance(wav, (str, os.PathLike)):
    path = os.fspath(wav)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{field}: no audio file at {path!r}")
    try:
      wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as e:
      raise ValueError(f"{field}: cannot read audio file {path!r} ({e})") from None
    wave = wave.mean(axis=1)
  elif isinstance(wav, (np.ndarray, jax.Array)):
    wave = np.asarray(wav)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
      raise TypeError(f"{field}: expected a mono (T,) float waveform at {rate} Hz, got "
                      f"{wave.dtype} {wave.shape}")
  else:
    raise TypeError(f"{field}: expected a wav file path or a (T,) float waveform, got {type(wav).__name__}")
  if wave.shape[0] == 0:
    raise ValueError(f"{field}: the audio is empty (zero samples)")
  if not np.all(np.isfinite(wave)):
    raise ValueError(f"{field}: the audio contains NaN or Inf")
  prepare = pp.parse(f"audio.resample({av_digits.SAMPLE_RATE})|audio.trim(top_db={av_digits.TRIM_DB})|"
                     f"audio.pad_or_crop(samples={av_digits.NUM_SAMPLES})")
  out = prepare({"audio": wave.astype(np.float32), "audio_sr": np.int32(rate)}, np.random.default_rng(0))
  length = int(out["audio_len"])
  if length == 0 or not np.any(out["audio"]):
    raise ValueError(f"{field}: the audio is silent (all samples zero)")
  return out["audio"], length


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
    kind: the kind of task served: "vqa", "caption" or "classify" (None for another model).

  Args:
    setup: as above.
    state: a train state (extra entries such as the optimizer state are dropped).
    step: the step of `state`, for reference.
    batch_size: fixed batch; default (and required divisor) the number of devices the batch axis
      is split over.
  """

  def __init__(self, setup, state: dict[str, Any], *, step: int | None = None,
               batch_size: int | None = None):
    from mmjax.models.captioner import ShowAndTell, TransformerCaptioner  # pylint: disable=g-import-not-at-top
    from mmjax.models.classifier import MultimodalClassifier  # pylint: disable=g-import-not-at-top
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
    kinds = ((VQAModel, "vqa"), ((ShowAndTell, TransformerCaptioner), "caption"),
             (MultimodalClassifier, "classify"))
    self.kind = next((kind for cls, kind in kinds if isinstance(self.model, cls)), None)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None, *,
                   batch_size: int | None = None) -> "Predictor":
    """Loads `workdir`'s config and checkpoint `step` (default: best by the task's metric, else latest)."""
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
    """(H, W, C) of the model's input images (the task's, else the model's)."""
    return tuple(getattr(self.task, "image_shape", None) or self.model.image_shape)

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

  # -- captioning ------------------------------------------------------------------------------
  def _images(self, images: Sequence[ImageInput], resize: bool, method: str) -> np.ndarray:
    """Raw images -> (N, H, W, C) float32 in [0, 1], as the training pipelines make them."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or not len(images):
      raise TypeError(f"{method}: images: expected a non-empty sequence of images (use the "
                      "single-image method for one)")
    h, w, c = self.image_shape
    return np.stack([load_image(im, (h, w), resize=resize, channels=c,
                                field=f"images[{i}]" if len(images) > 1 else "image")
                     for i, im in enumerate(images)]).astype(np.float32) / 255.0

  def caption_batch(self, images: Sequence[ImageInput], *, method: str | None = None,
                    resize: bool = False) -> list[dict[str, Any]]:
    """Captions images[i]; see `caption`."""
    from mmjax.models import decoding  # pylint: disable=g-import-not-at-top

    self._require("caption", "caption")
    method = method or self.config.eval.decode
    if method not in decoding.METHODS:
      raise ValueError(f"method: expected one of {decoding.METHODS}, got {method!r}")
    pixels = self._images(images, resize, "caption")
    fn = lambda model, x: tuple(self.task.generate(model, x, method)[:3])  # tokens, scores, log_probs
    parts = [self.run(f"caption_{method}", fn, pixels[s]) for s in self._batches(len(pixels))]
    tokens, scores, log_probs = (np.concatenate(p) for p in zip(*parts))
    return [{"caption": c, "score": float(s), "log_prob": float(lp)}
            for c, s, lp in zip(self.task.detokenize(tokens), scores, log_probs)]

  def caption(self, image: ImageInput, *, method: str | None = None, resize: bool = False) -> dict[str, Any]:
    """Captions `image`.

    Args:
      image: a file path, a PIL image or an (H, W, 3) uint8 RGB array of the training size.
      method: "greedy" or "beam" (the config's `eval.beam_size` and `eval.length_penalty`);
        default the config's `eval.decode`.
      resize: resize an image of another size instead of raising.

    Returns:
      {'caption': the decoded caption, 'score': its length-normalised log-probability (the
      search's ranking score), 'log_prob': its summed token log-probability, EOS included}.
    """
    return self.caption_batch([image], method=method, resize=resize)[0]

  # -- audio-visual classification -------------------------------------------------------------
  @property
  def classes(self) -> tuple[str, ...]:
    """The class names (index -> string)."""
    self._require("classify", "classes")
    return tuple(self.task.classes)

  def classify_batch(self, images: Sequence[ImageInput], wavs: Sequence[WavInput], *,
                     resize: bool = False) -> list[dict[str, Any]]:
    """Classifies (images[i], wavs[i]); see `classify`."""
    self._require("classify", "classify")
    if isinstance(wavs, (str, os.PathLike, np.ndarray)) or len(wavs) != len(images):
      raise ValueError(f"images and wavs: expected sequences of the same length, got {len(images)} "
                       f"images and {'one wav' if isinstance(wavs, (str, os.PathLike, np.ndarray)) else len(wavs)}")
    pixels = self._images(images, resize, "classify")
    audio = [load_wav(w, field=f"wavs[{i}]" if len(wavs) > 1 else "wav") for i, w in enumerate(wavs)]
    waves = np.stack([a for a, _ in audio])
    lengths = np.array([n for _, n in audio], np.int32)
    probs = np.concatenate([self.run("classify", _class_probs, pixels[s], waves[s], lengths[s])
                            for s in self._batches(len(pixels))])
    classes = self.classes
    out = []
    for p in probs:
      order = np.argsort(-p, kind="stable")
      out.append({"class": classes[order[0]], "label": int(order[0]),
                  "probabilities": {classes[i]: float(p[i]) for i in order}})
    return out

  def classify(self, image: ImageInput, wav: WavInput, *, resize: bool = False) -> dict[str, Any]:
    """Classifies an image with its audio (AV digits: a handwritten digit and its spoken name).

    Args:
      image: a file path, a PIL image or an (H, W) / (H, W, 1) uint8 grey array of the training
        size (8×8 for AV digits; colour images are converted to grey).
      wav: a wav file path, or a mono (T,) float waveform at 16 kHz (see `load_wav`).
      resize: resize an image of another size instead of raising.

    Returns:
      {'class': the most probable class name, 'label': its index, 'probabilities': {name: p}
      over every class, most probable first}.
    """
    return self.classify_batch([image], [wav], resize=resize)[0]


def _vqa_probs(model, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Answer probabilities (B, A) of a VQA model."""
  logits, _ = model(images, ids, mask)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _class_probs(model, images: jax.Array, audio: jax.Array, lengths: jax.Array) -> jax.Array:
  """Class probabilities (B, C) of an image + audio classifier."""
  logits, _ = model({"image": images, "audio": {"x": audio, "lengths": lengths}})
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
  """`python -m mmjax.predict --workdir W --image img.png [--question "..." | --wav a.wav] [--json]`."""
  parser = argparse.ArgumentParser(prog="python -m mmjax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints/)")
  parser.add_argument("--image", required=True, help="image file")
  parser.add_argument("--question", default=None, help="question about the image (VQA)")
  parser.add_argument("--wav", default=None, help="audio file (audio-visual classification)")
  parser.add_argument("--beam", action="store_true", help="caption with beam search (default: the config's)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--resize", action="store_true", help="resize an image of another size")
  parser.add_argument("--top", type=int, default=5, help="how many probabilities to print")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  try:
    predictor = Predictor.from_workdir(args.workdir, args.step)
    needs = {"vqa": ("question", "--question"), "classify": ("wav", "--wav")}.get(predictor.kind)
    if needs and getattr(args, needs[0]) is None:
      raise ValueError(f"{needs[1]} is required for this workdir's task {predictor.config.task!r}")
    if predictor.kind == "caption":
      out = predictor.caption(args.image, method="beam" if args.beam else None, resize=args.resize)
    elif predictor.kind == "classify":
      out = predictor.classify(args.image, args.wav, resize=args.resize)
    else:
      out = predictor.answer(args.image, args.question, resize=args.resize)
  except (FileNotFoundError, ValueError, TypeError) as e:
    parser.exit(2, f"error: {e}\n")
  if predictor.kind == "caption":
    if args.json:
      print(json.dumps({**out, "step": predictor.step}))
    else:
      print(f"caption: {out['caption']}  (score {out['score']:.3f})")
    return 0
  key = "class" if predictor.kind == "classify" else "answer"
  top = dict(list(out["probabilities"].items())[:max(args.top, 1)])
  if args.json:
    print(json.dumps({key: out[key], "probabilities": top, "step": predictor.step}))
  else:
    print(f"{key}: {out[key]}")
    for name, p in top.items():
      print(f"  {name:>12s}  {p:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
