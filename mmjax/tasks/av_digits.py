"""Task glue for audio-visual digit classification on the embedded AV digits (image + spoken name).

The input pipeline is the config's pp strings (`input.pp_train`, `input.pp_eval`). The model is a
`MultimodalClassifier` over an 8x8 image encoder and an audio encoder that reads the padded 1 s
waveform and its length (the log-mel front end runs inside the model, so inference takes raw
audio); `AvDigitsPredictor` serves it on an image and a wav. The loss is the joint loss of the
fused head and the auxiliary unimodal heads named in `model.loss_weights`. Evaluation reports the
fused accuracy, each unimodal head's accuracy and the 10x10 confusion matrix of the fused head
(rows true, columns predicted), kept in the task's `last_confusion` after each evaluation for
`mmjax.viz.confusion_matrix_figure`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import predict
from mmjax.data import pipeline
from mmjax.data.datasets import av_digits
from mmjax.metrics.classification import confusion_matrix
from mmjax.models import build_model
from mmjax.models.classifier import MultimodalClassifier
from mmjax.train.tasks import TASKS

IMAGE_SHAPE = (8, 8, 1)
CLASSES = av_digits.WORDS


def model_inputs(batch: dict) -> dict:
  """The classifier's inputs from a batch: image (B, 8, 8, 1), audio {x (B, T), lengths (B,)}."""
  return {"image": batch["image"], "audio": {"x": batch["audio"], "lengths": batch["audio_len"]}}


def class_probabilities(model, images: jax.Array, audio: jax.Array, lengths: jax.Array) -> jax.Array:
  """Class probabilities (B, C) of the classifier on images (B, 8, 8, 1) and audio (B, T), (B,)."""
  logits, _ = model(model_inputs({"image": images, "audio": audio, "audio_len": lengths}))
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class AvDigitsPredictor(predict.Predictor):
  """Classifies an image with its audio (a handwritten digit and its spoken name)."""

  request_fields = ("image", "wav")

  @property
  def classes(self) -> tuple[str, ...]:
    """The class names (index -> string)."""
    return tuple(self.task.classes)

  def inputs(self, images: Sequence[predict.ImageInput], wavs: Sequence[predict.WavInput], *,
             resize: bool = False) -> dict[str, np.ndarray]:
    """Raw images and wavs -> image (N, 8, 8, 1), audio (N, T) and audio_len (N,), by the eval pp."""
    images = predict.check_batch(images, "images", "classify")
    single = isinstance(wavs, (str, os.PathLike, np.ndarray))
    if single or len(wavs) != len(images):
      raise ValueError(f"images and wavs: expected sequences of the same length, got {len(images)} "
                       f"images and {'one wav' if single else len(wavs)}")
    image_names, wav_names = (predict.request_names(n, len(images)) for n in ("image", "wav"))
    channels = self.image_shape[-1]
    records = [{"image": predict.read_image(im, field=i, channels=channels),
                "audio": predict.read_wav(w, field=a)}
               for im, w, i, a in zip(images, wavs, image_names, wav_names)]
    out = self.preprocess(records, resize=resize, image_names=image_names)
    for name, audio, length in zip(wav_names, out["audio"], out["audio_len"]):
      if int(length) == 0 or not np.any(audio):
        raise ValueError(f"{name}: the audio is silent (all samples zero)")
      if not np.all(np.isfinite(audio)):
        raise ValueError(f"{name}: the audio contains NaN or Inf")
    return {k: out[k] for k in ("image", "audio", "audio_len")}

  def classify_batch(self, images: Sequence[predict.ImageInput], wavs: Sequence[predict.WavInput], *,
                     resize: bool = False) -> list[dict[str, Any]]:
    """Classifies (images[i], wavs[i]); see `classify`."""
    x = self.inputs(images, wavs, resize=resize)
    probs = self.run_batches("classify", class_probabilities, x["image"], x["audio"], x["audio_len"])
    out = predict.top_classes(probs, self.classes, "class")
    return [{"class": o["class"], "label": self.classes.index(o["class"]),
             "probabilities": o["probabilities"]} for o in out]

  def classify(self, image: predict.ImageInput, wav: predict.WavInput, *,
               resize: bool = False) -> dict[str, Any]:
    """Classifies an image with its audio.

    Args:
      image: a file path, a PIL image or an (H, W) / (H, W, 1) uint8 grey array of the training
        size (8×8; colour images are converted to grey).
      wav: a wav file path, or a mono (T,) float waveform at 16 kHz, prepared by the config's eval
        pp string as the data set prepared its records (resampled, silence trimmed, 1 s).
      resize: resize an image of another size instead of raising.

    Returns:
      {'class': the most probable class name, 'label': its index, 'probabilities': {name: p}
      over every class, most probable first}.
    """
    return self.classify_batch([image], [wav], resize=resize)[0]

  def predict(self, *, image, wav, resize: bool = False) -> dict[str, Any]:
    """The command line's request: `classify`."""
    return self.classify(image, wav, resize=resize)


@TASKS.register("av_digits")
class AvDigitsClassification(pipeline.ConfigInput):
  """Digit classification from a handwritten image and a spoken digit name (test voices unseen)."""

  best_metric = "test/accuracy"
  image_shape = IMAGE_SHAPE
  classes = CLASSES
  predictor = AvDigitsPredictor

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.last_confusion: np.ndarray | None = None  # (C, C) of the last `summarize`

  # -- model -----------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> MultimodalClassifier:
    """`config.model` as is (`mmjax.models.build_model`); example inputs and classes from the data."""
    examples = {"image": jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32),
                "audio": {"x": jax.ShapeDtypeStruct((1, av_digits.NUM_SAMPLES), jnp.float32),
                          "lengths": jax.ShapeDtypeStruct((1,), jnp.int32)}}
    return build_model(self.config.model, rngs=rngs, base=MultimodalClassifier,
                       input_examples=examples, num_classes=len(CLASSES))

  # -- loss and metrics ------------------------------------------------------------------------
  def loss_fn(self, model, batch, train):
    logits, aux = model(model_inputs(batch), deterministic=not train)
    loss, metrics = model.loss(logits, aux, batch["label"])
    return loss, {k: v for k, v in metrics.items() if k == "accuracy" or k.endswith("/loss")}

  def eval_fn(self, model, batch):
    logits, aux = model(model_inputs(batch))
    valid = batch["valid"]
    out = {"prediction": logits.argmax(-1), "label": batch["label"], "valid": valid}
    for name, unimodal in aux["unimodal_logits"].items():
      out[f"prediction_{name}"] = unimodal.argmax(-1)
    return out

  def summarize(self, sums):
    valid = np.asarray(sums["valid"], bool)
    labels = sums["label"][valid]
    out = {"accuracy": float(np.mean(sums["prediction"][valid] == labels)) if len(labels) else 0.0}
    for key in sorted(sums):
      if key.startswith("prediction_"):
        out[f"accuracy_{key[len('prediction_'):]}"] = float(np.mean(sums[key][valid] == labels)) if len(labels) else 0.0
    self.last_confusion = np.asarray(confusion_matrix(sums["prediction"][valid], labels, len(CLASSES)))
    return out

  # -- data ------------------------------------------------------------------------------------
  def builder_config(self) -> av_digits.AvDigitsConfig | None:
    """The data set's builder config: None (the full set) or a subset named by its settings."""
    subset = self.config.data.subset
    if not subset:
      return None
    kwargs = {k: tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
              if isinstance(v, (list, tuple)) else v for k, v in dict(subset).items()}
    digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return av_digits.AvDigitsConfig(name=f"subset_{digest}", **kwargs)

  def source(self, split: str):
    """The raw records of `split` (random access; see `av_digits.load`)."""
    return av_digits.load(split, self.config.data.data_dir, config=self.builder_config())
