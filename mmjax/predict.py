"""Inference on raw inputs (image files, question strings, wav files) from a trained workdir.

  predictor = Predictor.from_workdir("workdirs/vqa")          # best checkpoint, else the latest
  predictor.answer("scene.png", "What shape is the red object?")
  # {'answer': 'circle', 'probabilities': {'circle': 0.97, 'square': 0.02, ...}}
  Predictor.from_workdir("workdirs/caption").caption("scene.png")
  # {'caption': 'a red circle in the top left of the image', 'score': -1.9, 'log_prob': -1.9}
  Predictor.from_workdir("workdirs/av").classify("digit.png", "seven.wav")
  # {'class': 'seven', 'label': 7, 'probabilities': {'seven': 0.98, ...}}
  clip = Predictor.from_workdir("workdirs/clip")                # a dual encoder (CLIP, SigLIP)
  clip.zero_shot(["scene.png"], ["circle", "square"], template="a {}")
  # [{'label': 'circle', 'probabilities': {'circle': 0.91, 'square': 0.09}}]
  clip.retrieve(["a red circle"], ["a.png", "b.png", "c.png"], k=2)  # text -> image
  # (indices (1, 2), scores (1, 2)): the best images first, by cosine similarity

  python -m mmjax.predict --workdir workdirs/vqa --image scene.png --question "..." [--json]
  python -m mmjax.predict --workdir workdirs/caption --image scene.png [--beam]
  python -m mmjax.predict --workdir workdirs/av --image digit.png --wav seven.wav
  python -m mmjax.predict --workdir workdirs/clip --image scene.png --labels "circle,square"
  python -m mmjax.predict --workdir workdirs/clip --text "a red circle" --gallery a.png b.png --top_k 1
  python -m mmjax.predict --workdir workdirs/clip --image scene.png --gallery "a red circle" "two squares"

The workdir is what `mmjax.train.trainer.train` writes: `config.json` and Orbax `checkpoints/`,
in a local folder or a bucket (`--workdir gs://bucket/run`; image and wav paths may be bucket URLs
too). The model is served data parallel over this machine's devices whatever mesh trained it
(`from_workdir(..., mesh=...)` picks another), so a checkpoint saved on any mesh loads on any
device count. The checkpoint is restored as the trainer restores it, checked against the
checksums saved with it: a damaged step asked for is an error; by default the newest step that
reads is served instead, with a warning. Only the parameters and model state are kept.

Each task owns its predict functions: its `predictor` attribute names the `Predictor` subclass
that `from_workdir` builds (`answer` for VQA, `caption`, `classify`, `zero_shot` and `retrieve`
for a dual encoder, ...). What they share is here, with two predictors any task can name:
`AnswerPredictor` (a VQA model over `task.answers`) and `ClassifyPredictor` (a classifier over
`task.classes` of any of image, audio and text). On the command line each predictor takes the
flags of its `request_fields` and `request_options`; another flag is an error naming it.

A request is read into the form of a record of the task's data set (an image file's bytes
or a uint8 array, the question string, a wav path or waveform) and preprocessed by the training
config's eval pp string `config.input.pp_eval` (with `mmjax.data.pp.Preprocess.partial`, which
skips the label ops a request has no fields for): the very ops that made the evaluation batches,
so serving preprocessing equals training preprocessing by construction. Each model function is
compiled ahead of time on first use for a fixed batch (`batch_size`, by default the number of
devices the batch is split over): requests are padded to that shape, so serving never retraces
or recompiles.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence, Union

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from mmjax import io_paths, sharding
from mmjax.data import manifest

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, jax.Array]
WavInput = Union[str, os.PathLike, np.ndarray, jax.Array]
_PIL_MODES = ("L", "RGB", "RGBA")  # PIL modes whose arrays image.decode takes as they are


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


# Encoder keys of `config.model` before the schema of `model.name` + `model.encoders`.
_OLD_ENCODER_KEYS = ("vision", "text", "image", "audio", "encoder", "decoder")


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The training config saved in `workdir/config.json`, with JSON lists turned back into tuples.

  A config.json of the older model layout (an encoder spec per key, `model.vision`, `model.text`,
  and no `model.name`) is a ValueError saying so: its checkpoint's parameter paths differ too.
  """
  path = io_paths.as_path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no config.json (looked for "
                            f"{os.fspath(path)!r}); is it a workdir written by mmjax.train.trainer.train?")
  config = _tuples(json.loads(path.read_text()))
  model = config.get("model") if isinstance(config, dict) else None
  if isinstance(model, dict) and "name" not in model:
    old = [k for k in _OLD_ENCODER_KEYS if isinstance(model.get(k), dict) and "name" in model[k]]
    if old:
      raise ValueError(
          f"workdir {os.fspath(workdir)!r}: config.json has the older mmjax model layout "
          f"({', '.join(f'model.{k}' for k in old)}: one encoder spec per key, no model.name), and "
          "its checkpoint the older parameter paths. This mmjax reads model.name (a registered "
          "model) and model.encoders (modality -> encoder spec {'name': ..., **kwargs}), see "
          "docs/configs.md: retrain with a current config (configs/*.py), or serve the workdir "
          "with the mmjax version that wrote it.")
  return ml_collections.ConfigDict(config)


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """`workdir/checkpoints`; FileNotFoundError naming it when it does not exist."""
  directory = io_paths.as_path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint folder (looked for "
                            f"{os.fspath(directory)!r})")
  return os.fspath(directory)


def workdir_setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  mesh: dict[str, int] | jax.sharding.Mesh | None = None):
  """The trainer's `Setup` of a workdir's config, its task reading what the data decided
  (tokenizer, answer vocabulary, classes) from `workdir` where the task keeps them there.

  `mesh`: {axis: size} as `config.mesh` takes it (one size may be -1; the config's other axes
  are 1), or a `Mesh`; default: data parallel over every device, whatever mesh trained the model
  (it may need more devices than this machine has).
  """
  from mmjax.train.trainer import Setup  # pylint: disable=g-import-not-at-top

  if config.get("model_init"):  # the checkpoint holds the trained weights: the init's files may be gone
    config = ml_collections.ConfigDict(config.to_dict())
    config.model_init = None
  if mesh is None:
    mesh = {"data": -1}
  if isinstance(mesh, dict):  # the training mesh's axes (the sharding rules name them): 1 unless given
    mesh = sharding.make_mesh({**{axis: 1 for axis in config.get("mesh", {})}, **mesh})
  return Setup(config, mesh=mesh, workdir=workdir)


def restore_params(setup, workdir: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Restores {'params', 'model_state'} of `step` (default best, else latest) onto `setup`'s shardings.

  The trainer's checked restore (`Checkpointer.restore`): a step that is incomplete, unreadable or
  does not match its saved checksums is a `CorruptCheckpointError` naming it when asked for;
  without `step`, it is skipped with a warning for the newest step that restores (the workdir is
  left as it is). Returns the state and the step restored. Raises FileNotFoundError naming what
  was looked for when the workdir has no checkpoint or not the asked step.
  """
  from mmjax.train.checkpoint import Checkpointer, CorruptCheckpointError  # pylint: disable=g-import-not-at-top

  directory = checkpoint_dir(workdir)
  ckpt = Checkpointer(directory, best_metric=setup.task.best_metric)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint in {directory!r}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no checkpoint of step {step} in "
                              f"{directory!r}; available steps: {steps}")
    best = ckpt.best_step()
    tries = [step] if step is not None else list(dict.fromkeys([steps[-1] if best is None else best,
                                                                *reversed(steps)]))
    keep = {k: setup.abstract_state[k] for k in ("params", "model_state")}
    failures = []
    for s in tries:
      try:
        state, _ = ckpt.restore(s, keep, with_data=False, partial=True)
      except CorruptCheckpointError as e:
        if step is not None:
          raise
        log.warning("%s; trying another checkpoint", e)
        failures.append(e)
        continue
      if failures:
        log.warning("serving checkpoint step %d instead of the unreadable step(s) %s", s,
                    tries[:len(failures)])
      return dict(state), int(s)  # the partial restore read `keep`'s entries only
    raise CorruptCheckpointError(f"no checkpoint in {directory} can be restored:\n" +
                                 "\n".join(str(e) for e in failures)) from failures[0]
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Raw inputs, read into the form of a record's field (preprocessing is the config's pp string).
# ---------------------------------------------------------------------------------------------
def read_image(image: ImageInput, *, field: str = "image", channels: int = 3) -> bytes | np.ndarray:
  """A path, PIL image or uint8 array -> an image field as records hold it (file bytes or array).

  C is `channels`: 3 (RGB) or 1 (grey; an (H, W) array is accepted too); the pp string's
  `image.decode` converts a file's or PIL image's mode. A missing file is a FileNotFoundError, a
  file that does not decode whole (`manifest.check_media`) a ValueError, anything but a path, a PIL
  image or an (H, W, C) uint8 array a TypeError, each naming `field`.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels}")
  if isinstance(image, (str, os.PathLike)):
    path = io_paths.as_path(image)
    if not path.is_file():
      raise FileNotFoundError(f"{field}: no image file at {os.fspath(image)!r}")
    data = path.read_bytes()
    manifest.check_media("image", image, field, data)  # named here, not deep in the pp ops
    return data
  if isinstance(image, Image.Image):
    return np.asarray(image if image.mode in _PIL_MODES else image.convert("RGBA"))
  if isinstance(image, (np.ndarray, jax.Array)):
    array = np.asarray(image)
    if channels == 1 and array.ndim == 2:
      array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != channels:
      kind = "RGB" if channels == 3 else "grey"
      raise TypeError(f"{field}: expected an (H, W, {channels}) uint8 {kind} array (pixel values "
                      f"0..255), got {array.dtype} {array.shape}")
    return array
  raise TypeError(f"{field}: expected a file path, a PIL image or an (H, W, {channels}) uint8 "
                  f"array, got {type(image).__name__}")


def check_text(text: Any, field: str = "question") -> str:
  """`text` itself if it is a non-blank str (a question, a caption); else a TypeError or
  ValueError naming `field`."""
  if not isinstance(text, str):
    raise TypeError(f"{field}: expected a str, got {type(text).__name__}")
  if not text.strip():
    raise ValueError(f"{field}: expected a non-empty text, got {text!r}")
  return text


def read_wav(wav: WavInput, *, field: str = "wav", sr: int = 16000) -> str | bytes:
  """A wav file path or a mono (T,) float waveform at `sr` Hz -> an audio field for the pp
  string's `audio.load` (a bucket URL's file is read here, as bytes).

  A file carries its own sample rate; a waveform becomes the bytes of a float WAV file of rate
  `sr` (default 16 kHz), so that `audio.load` reads its rate as a file's for any pp string.
  A missing file is a FileNotFoundError; a file that is not audio or has no samples
  (`manifest.check_media`), or a waveform that is empty or holds NaN or Inf, a ValueError; a
  waveform that is not mono float a TypeError; each naming `field`.
  """
  if isinstance(wav, (str, os.PathLike)):
    path = io_paths.as_path(wav)
    if not path.is_file():
      raise FileNotFoundError(f"{field}: no audio file at {os.fspath(wav)!r}")
    data = path.read_bytes() if io_paths.is_url(path) else None
    manifest.check_media("audio", wav, field, data)  # named here, not deep in the pp ops
    return data if data is not None else os.fspath(wav)
  if isinstance(wav, (np.ndarray, jax.Array)):
    wave = np.asarray(wav)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
      raise TypeError(f"{field}: expected a mono (T,) float waveform, got {wave.dtype} {wave.shape}")
    if wave.shape[0] == 0:
      raise ValueError(f"{field}: the audio is empty (zero samples)")
    if not np.all(np.isfinite(wave)):
      raise ValueError(f"{field}: the audio contains NaN or Inf")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
      raise ValueError(f"sr: expected the waveform's sample rate in Hz (a positive int), got {sr!r}")
    import soundfile  # pylint: disable=g-import-not-at-top

    buffer = io.BytesIO()  # FLOAT: the samples as they are, unclipped
    soundfile.write(buffer, wave.astype(np.float32), int(sr), format="WAV", subtype="FLOAT")
    return buffer.getvalue()
  raise TypeError(f"{field}: expected a wav file path or a (T,) float waveform, got {type(wav).__name__}")


def request_names(name: str, n: int) -> list[str]:
  """How errors name the `name` field of n requests: "image" for one, "images[i]" for several."""
  return [name] if n == 1 else [f"{name}s[{i}]" for i in range(n)]


def check_batch(items: Any, what: str, method: str) -> list:
  """`items` as a non-empty list (one bare request is a TypeError naming `method` and `what`)."""
  if isinstance(items, (str, bytes, os.PathLike, Image.Image, np.ndarray, jax.Array)) or not len(items):
    raise TypeError(f"{method}: {what}: expected a non-empty sequence (use the single-request "
                    "method for one)")
  return list(items)


def top_classes(probs: np.ndarray, names: Sequence[str], key: str) -> list[dict[str, Any]]:
  """Probability rows (N, K) -> [{key: the best name, 'probabilities': {name: p}, best first}]."""
  out = []
  for p in probs:
    order = np.argsort(-p, kind="stable")
    out.append({key: names[order[0]], "probabilities": {names[i]: float(p[i]) for i in order}})
  return out


# ---------------------------------------------------------------------------------------------
# The predictor.
# ---------------------------------------------------------------------------------------------
class Predictor:
  """Serves a trained model on raw inputs: reads requests, preprocesses, runs compiled functions.

  A task's subclass (its `predictor` attribute) adds the task's predict functions.

  Attributes:
    setup: the `mmjax.train.trainer.Setup` of the training config (mesh, task, shardings).
    config: the training config.
    task: the task object (tokenizer, answer vocabulary, ...).
    state: {'params', 'model_state'} on the setup's shardings.
    step: the checkpoint step served (None when built from a state in memory).
    batch_size: the fixed batch every compiled function runs on.
    request_fields: the command line's flags one request needs (e.g. image and question).
    request_options: the other command-line flags `predict` takes (e.g. resize, beam).

  Args:
    setup: as above.
    state: a train state (extra entries such as the optimizer state are dropped).
    step: the step of `state`, for reference.
    batch_size: fixed batch; default (and required divisor) the number of devices the batch axis
      is split over.
  """

  request_fields: tuple[str, ...] = ()
  request_options: tuple[str, ...] = ("resize",)

  def __init__(self, setup, state: dict[str, Any], *, step: int | None = None,
               batch_size: int | None = None):
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
    self._preprocess: dict[bool, Any] = {}
    self._model = None

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None, *,
                   batch_size: int | None = None,
                   mesh: dict[str, int] | jax.sharding.Mesh | None = None) -> "Predictor":
    """Loads `workdir`'s config and checkpoint `step` (default: best by the task's metric, else
    latest), served by the task's `predictor` class (this class for a task without one, e.g.
    `ClassifyPredictor.from_workdir(w)`) on `mesh` ({axis: size} as `config.mesh`, e.g.
    {"data": 4, "fsdp": 2}, or a `Mesh`; default: data parallel over every device)."""
    if not io_paths.as_path(workdir).is_dir():
      raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} does not exist")
    config = load_workdir_config(workdir)
    checkpoint_dir(workdir)  # fail before building anything
    setup = workdir_setup(config, workdir, mesh)
    served = getattr(setup.task, "predictor", None) or cls
    if not issubclass(served, cls):
      raise TypeError(f"{cls.__name__}.from_workdir: the workdir's task {config.task!r} is served by "
                      f"{served.__name__}")
    state, step = restore_params(setup, workdir, step)
    return served(setup, state, step=step, batch_size=batch_size)

  # -- plumbing --------------------------------------------------------------------------------
  @property
  def model(self):
    """A live NNX model of the state (for plots and probes; serving uses the compiled functions)."""
    if self._model is None:
      self._model = self.setup.model(self.state)
    return self._model

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model's input images (the task's)."""
    return tuple(self.task.image_shape)

  def context(self):
    """The mesh and logical-axis rules the model runs under."""
    return self.setup.context()

  def preprocess(self, records: Sequence[dict[str, Any]], *, resize: bool = False,
                 image_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Requests in record form -> their preprocessed fields, stacked over requests.

    Each request goes through the config's eval pp string (`config.input.pp_eval`, parsed by the
    task) with `Preprocess.partial`: the ops that made the evaluation batches, less those of the
    fields a request lacks (labels). An "image" whose size is not the model's is a ValueError
    naming `image_names[i]`, unless `resize`: then `image.resize` to the model's size runs right
    after `image.decode`.
    """
    fn = self._eval_preprocess(resize)
    rng = np.random.default_rng(0)  # evaluation ops draw nothing
    names = image_names or request_names("image", len(records))
    outs = []
    for name, record in zip(names, records):
      out = fn.partial(record, rng)
      if "image" in out and tuple(np.shape(out["image"])[:2]) != self.image_shape[:2]:
        (h, w), got = self.image_shape[:2], np.shape(out["image"])
        raise ValueError(f"{name}: expected {h}×{w} pixels (H×W), got {got[0]}×{got[1]}; pass "
                         "resize=True (--resize) to resize it")
      outs.append(out)
    return {k: np.stack([np.asarray(o[k]) for o in outs]) for k in outs[0] if all(k in o for o in outs)}

  def _eval_preprocess(self, resize: bool):
    """The task's parse of the eval pp string, with `image.resize` after `image.decode` if `resize`."""
    from mmjax.data.pp import registry  # pylint: disable=g-import-not-at-top

    if resize and getattr(self.task, "image_shape", None) is None:
      raise ValueError(f"resize: this workdir's model takes no images (the task {self.config.task!r}); "
                       "there is nothing to resize")
    if resize not in self._preprocess:
      specs = registry.split_ops(self.config.input.pp_eval)
      if resize:
        at = next((i + 1 for i, s in enumerate(specs) if s.startswith("image.decode")), 0)
        specs.insert(at, "image.resize(({}, {}))".format(*self.image_shape[:2]))
      self._preprocess[resize] = self.task.preprocess("|".join(specs))
    return self._preprocess[resize]

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

  def run_batches(self, name: str, fn: Callable, *inputs: np.ndarray) -> Any:
    """`run` over any number of rows, `batch_size` at a time, outputs concatenated."""
    n = len(inputs[0])
    parts = [self.run(name, fn, *(x[i:i + self.batch_size] for x in inputs))
             for i in range(0, n, self.batch_size)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def _pad(self, x: np.ndarray) -> np.ndarray:
    """x (n, ...) padded to the fixed batch by repeating its last row."""
    if len(x) == self.batch_size:
      return x
    return np.concatenate([x, np.repeat(x[-1:], self.batch_size - len(x), axis=0)])

  def predict(self, **request: Any) -> dict[str, Any]:
    """One command-line request (`request_fields`, `resize`, ...) -> a JSON-able result."""
    raise NotImplementedError(f"the task {self.config.task!r} serves no command-line requests")


class AnswerPredictor(Predictor):
  """Answers questions about images with a VQA model (`model(images, ids, mask)` -> answer logits)
  over the task's answer vocabulary `task.answers`.

  A request is the record {"image": ..., <question field>: the question}, the field being the
  task's `question_field` ("question" when it has none), whose eval pp string makes image,
  question_ids and question_mask. The reported probabilities are the task's
  `answer_probabilities(logits)` (B, A) -> (B, A) where it has one (a task trained with a
  per-answer sigmoid loss gives sigmoids), else the softmax a softmax cross-entropy trains.
  """

  request_fields = ("image", "question")

  @property
  def answers(self) -> tuple[str, ...]:
    """The answer vocabulary (index -> string)."""
    return tuple(self.task.answers)

  def answer_batch(self, images: Sequence[ImageInput], questions: Sequence[str], *,
                   resize: bool = False) -> list[dict[str, Any]]:
    """Answers questions[i] about images[i]; see `answer`."""
    images = check_batch(images, "images", "answer_batch")
    questions = check_batch(questions, "questions", "answer_batch")
    if len(images) != len(questions):
      raise ValueError(f"images and questions: expected the same number, got {len(images)} and "
                       f"{len(questions)}")
    key = getattr(self.task, "question_field", "question")
    image_names = request_names("image", len(images))
    question_names = request_names("question", len(questions))
    records = [{"image": read_image(im, field=i, channels=self.image_shape[-1]), key: check_text(q, n)}
               for im, q, i, n in zip(images, questions, image_names, question_names)]
    x = self.preprocess(records, resize=resize, image_names=image_names)

    to_probabilities = getattr(self.task, "answer_probabilities", None) or (
        lambda logits: jax.nn.softmax(logits.astype(np.float32), axis=-1))

    def probabilities(model, images, ids, mask):
      logits, _ = model(images, ids, mask)  # (B, A)
      return to_probabilities(logits)

    probs = self.run_batches("answer", probabilities, x["image"], x["question_ids"], x["question_mask"])
    return top_classes(probs, self.answers, "answer")

  def answer(self, image: ImageInput, question: str, *, resize: bool = False) -> dict[str, Any]:
    """Answers `question` about `image` (a file path, PIL image or (H, W, C) uint8 array).

    Returns {'answer': the most probable answer, 'probabilities': {answer: p} over the answer
    vocabulary (the task's `answer_probabilities` of the logits, else their softmax), most
    probable first}.
    """
    return self.answer_batch([image], [question], resize=resize)[0]

  def predict(self, *, image, question, resize: bool = False) -> dict[str, Any]:
    """The command line's request: `answer`."""
    return self.answer(image, question, resize=bool(resize))


class ClassifyPredictor(Predictor):
  """Classifies requests of the task's modalities (`task.modalities`, some of image, audio and
  text) with its classifier over `task.classes`; the task's `model_inputs(batch)` makes the
  model's inputs from the eval pp string's output, as in evaluation.

  A request is the record {"image": ..., "audio": ..., "text": ...} of the modalities; the
  command line's flags are --image, --wav and --text.
  """

  FLAGS = {"image": "image", "audio": "wav", "text": "text"}  # modality -> command-line flag

  @property
  def request_fields(self) -> tuple[str, ...]:
    return tuple(self.FLAGS[m] for m in self.task.modalities)

  @property
  def request_options(self) -> tuple[str, ...]:
    return ("resize",) if "image" in self.task.modalities else ()  # nothing to resize without images

  @property
  def classes(self) -> tuple[str, ...]:
    """The class names (index -> string)."""
    return tuple(self.task.classes)

  def classify_batch(self, *, images: Sequence[ImageInput] | None = None,
                     wavs: Sequence[WavInput] | None = None, texts: Sequence[str] | None = None,
                     resize: bool = False, sr: int = 16000) -> list[dict[str, Any]]:
    """Classifies request i of the given sequences (one per modality of the task); see `classify`."""
    given = {"image": images, "audio": wavs, "text": texts}
    args = {"image": "images", "audio": "wavs", "text": "texts"}
    expected = [args[m] for m in self.task.modalities]
    got = [args[m] for m, v in given.items() if v is not None]
    if sorted(got) != sorted(expected):
      raise TypeError(f"classify_batch: the task classifies {'+'.join(self.task.modalities)}: "
                      f"expected {expected}, got {got}")
    seqs = {m: check_batch(given[m], args[m], "classify_batch") for m in self.task.modalities}
    n = len(next(iter(seqs.values())))
    if any(len(v) != n for v in seqs.values()):
      raise ValueError(f"{' and '.join(args[m] for m in seqs)}: expected the same number, got "
                       f"{[len(v) for v in seqs.values()]}")
    names = {m: request_names(self.FLAGS[m], n) for m in seqs}
    read = {"image": lambda x, f: read_image(x, field=f, channels=self.image_shape[-1]),
            "audio": lambda x, f: read_wav(x, field=f, sr=sr), "text": check_text}
    records = [{m: read[m](seqs[m][i], names[m][i]) for m in seqs} for i in range(n)]
    x = self.preprocess(records, resize=resize, image_names=names.get("image"))
    keys = sorted(x)

    def probabilities(model, *arrays):
      logits, _ = model(self.task.model_inputs(dict(zip(keys, arrays))))
      return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    probs = self.run_batches("classify", probabilities, *(x[k] for k in keys))
    return [{"class": o["class"], "label": self.classes.index(o["class"]),
             "probabilities": o["probabilities"]} for o in top_classes(probs, self.classes, "class")]

  def classify(self, *, image: ImageInput | None = None, wav: WavInput | None = None,
               text: str | None = None, resize: bool = False, sr: int = 16000) -> dict[str, Any]:
    """Classifies one request: the task's modalities among `image` (a file path, PIL image or
    uint8 array), `wav` (an audio file, which carries its sample rate, or a mono (T,) float
    waveform at `sr` Hz, 16 kHz by default) and `text`. `resize` (a task with images only)
    resizes an image of another size instead of raising.

    Returns {'class': the most probable class name, 'label': its index, 'probabilities':
    {name: p} over every class, most probable first}.
    """
    wrap = lambda v: None if v is None else [v]
    return self.classify_batch(images=wrap(image), wavs=wrap(wav), texts=wrap(text), resize=resize,
                               sr=sr)[0]

  def predict(self, *, image=None, wav=None, text=None, resize: bool = False) -> dict[str, Any]:
    """The command line's request: `classify`."""
    return self.classify(image=image, wav=wav, text=text, resize=bool(resize))


def _batch_shards(setup) -> int:
  """How many devices the batch axis is split over in `setup`'s mesh."""
  spec = sharding.logical_to_spec(("batch",), setup.rules, setup.mesh)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  return int(np.prod([setup.mesh.shape[a] for a in axes], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
# The request flags: a task's predictor takes those of its `request_fields` and `request_options`.
REQUEST_FLAGS = {
    "image": dict(help="image file"),
    "question": dict(help="question about the image (VQA)"),
    "wav": dict(help="audio file (WAV, FLAC or OGG; its header gives the sample rate)"),
    "text": dict(help="a text (dual encoder: to embed, or to retrieve --gallery images for)"),
    "labels": dict(nargs="+", help="zero-shot class names for --image (dual encoder): one per "
                   'argument ("red, white and blue flag" "green circle"), or comma-separated in a '
                   'single argument ("circle,square")'),
    "template": dict(help='zero-shot prompt with {} for the label (default "a photo of {}")'),
    "gallery": dict(nargs="+", help="retrieval gallery (dual encoder): image files for a --text "
                    "query, texts for an --image query"),
    "top_k": dict(type=int, help="how many gallery items to retrieve (default 5)"),
    "beam": dict(action="store_true", help="caption with beam search (default: the config's)"),
    "resize": dict(action="store_true", help="resize an image of another size (tasks with images)"),
}


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmjax.predict --workdir W --image img.png [--question "..." | --wav a.wav | ...]`."""
  parser = argparse.ArgumentParser(
      prog="python -m mmjax.predict", description=__doc__.split("\n")[0],
      epilog="Each task takes its own request flags: VQA --image --question; captioning --image "
             "[--beam]; audio-visual classification --image --wav; a dual encoder (CLIP, SigLIP) "
             "--image --labels (zero-shot), --text or --image with --gallery (retrieval), or "
             "--image / --text alone (embedding).")
  parser.add_argument("--workdir", required=True,
                      help="training workdir (config.json + checkpoints/): a folder or a bucket URL")
  for name, kwargs in REQUEST_FLAGS.items():
    parser.add_argument(f"--{name}", default=None, **kwargs)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--top", type=int, default=5, help="how many probabilities to print")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  given = {f: getattr(args, f) for f in REQUEST_FLAGS if getattr(args, f) is not None}
  if len(given.get("labels", ())) == 1:  # "circle,square"; several arguments are a label each
    given["labels"] = [x.strip() for x in given["labels"][0].split(",")]
  # The class the tasks subclass: under `python -m`, this module's own classes are __main__'s.
  from mmjax.predict import Predictor as served  # pylint: disable=g-import-not-at-top,import-self
  try:
    predictor = served.from_workdir(args.workdir, args.step)
    task = f"this workdir's task {predictor.config.task!r}"
    if type(predictor).predict is served.predict:
      raise NotImplementedError(f"{task} serves no command-line requests (its task class names no "
                                "`predictor`)")
    takes = predictor.request_fields + predictor.request_options
    unknown = [f for f in given if f not in takes]
    if unknown:
      raise ValueError(f"--{unknown[0]}: not an option of {task} (served by "
                       f"{type(predictor).__name__}, which takes "
                       f"{', '.join('--' + f for f in takes) or 'no flags'})")
    missing = [f for f in predictor.request_fields if f not in given]
    if missing:
      raise ValueError(f"--{missing[0]} is required for {task}")
    out = predictor.predict(**given)
  except (FileNotFoundError, ValueError, TypeError, NotImplementedError) as e:
    parser.exit(2, f"error: {e}\n")
  if "probabilities" in out:
    out = {**out, "probabilities": dict(list(out["probabilities"].items())[:max(args.top, 1)])}
  if args.json:
    print(json.dumps({**out, "step": predictor.step}))
    return 0
  for key, value in out.items():
    if key == "probabilities":
      for name, p in value.items():
        print(f"  {name:>12s}  {p:.4f}")
    elif key == "results":  # retrieval: rank, gallery index, score, item
      for r in value:
        print(f"  #{r['rank']}  [{r['index']}]  {r['score']:.4f}  {r['item']}")
    elif isinstance(value, list):
      print(f"{key}: {json.dumps(value)}")
    else:
      print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
