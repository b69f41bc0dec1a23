"""Task glue for audio-visual digit classification on the embedded AV digits (image + spoken name).

The model is a `MultimodalClassifier` over an 8x8 image encoder and an audio encoder that reads the
padded 1 s waveform and its length (the log-mel front end runs inside the model, so inference takes
raw audio). The loss is the joint loss of the fused head and the auxiliary unimodal heads named in
`model.loss_weights`. Evaluation reports the fused accuracy, each unimodal head's accuracy and the
10x10 confusion matrix of the fused head (rows true, columns predicted), kept in the task's
`last_confusion` after each evaluation for `mmjax.viz.confusion_matrix_figure`.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax.data import pipeline
from mmjax.data.datasets import av_digits
from mmjax.metrics.classification import confusion_matrix
from mmjax.models.classifier import MultimodalClassifier
from mmjax.train.tasks import TASKS

IMAGE_SHAPE = (8, 8, 1)
CLASSES = av_digits.WORDS


class AvDigitsPreprocess:
  """AV digits record -> image (8, 8, 1) float32 in [0, 1], audio (16000,) float32, audio_len, label."""

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    del rng  # Deterministic.
    image = np.asarray(example["image"])
    if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
      raise ValueError(f"field 'image' must be {IMAGE_SHAPE} uint8, got {image.shape} {image.dtype}")
    return {"image": image.astype(np.float32) / 255.0,
            "audio": np.asarray(example["audio"], np.float32),
            "audio_len": np.int32(example["audio_len"]),
            "label": np.int32(example["label"])}


def model_inputs(batch: dict) -> dict:
  """The classifier's inputs from a batch: image (B, 8, 8, 1), audio {x (B, T), lengths (B,)}."""
  return {"image": batch["image"], "audio": {"x": batch["audio"], "lengths": batch["audio_len"]}}


@TASKS.register("av_digits")
class AvDigitsClassification:
  """Digit classification from a handwritten image and a spoken digit name (test voices unseen)."""

  best_metric = "test/accuracy"
  image_shape = IMAGE_SHAPE
  classes = CLASSES

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.last_confusion: np.ndarray | None = None  # (C, C) of the last `summarize`

  # -- model -----------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> MultimodalClassifier:
    m = self.config.model
    examples = {"image": jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32),
                "audio": {"x": jax.ShapeDtypeStruct((1, av_digits.NUM_SAMPLES), jnp.float32),
                          "lengths": jax.ShapeDtypeStruct((1,), jnp.int32)}}
    return MultimodalClassifier(
        encoders={"image": dict(m.image), "audio": dict(m.audio)}, input_examples=examples,
        fusion=m.fusion, fusion_kwargs=dict(m.fusion_kwargs), features=int(m.features),
        num_classes=len(CLASSES), loss_weights=dict(m.loss_weights), head_hidden=m.head_hidden,
        modality_dropout=float(m.modality_dropout), rngs=rngs)

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

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    d = self.config.data
    source = self.source(split)
    mode = (dict(shuffle=True, num_epochs=None, drop_remainder=True) if train else
            dict(shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True))
    return pipeline.make_pipeline(
        source, batch_size=batch_size, preprocess=AvDigitsPreprocess(), seed=int(self.config.seed),
        shard_index=shard_index, shard_count=shard_count, worker_count=d.worker_count if train else 0,
        **mode)
