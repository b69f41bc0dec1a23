"""Real TFDS data sets through the same pp ops, offline: `tfds.testing.mock_data` + `tfds.data_source`.

mnist and clevr work without TensorFlow. coco_captions and spoken_digit are tried too; where
TFDS cannot even build their feature spec without TensorFlow, the test is skipped (one of
ALLOWED_SKIPS in conftest.py) and the skip reason names the TFDS line that needs it.
"""

import traceback

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mmjax.data import pp


def _mock_source(name, num_examples=3):
  """`tfds.data_source(name)` under mock_data, or a skip naming why TFDS needs TensorFlow."""
  try:
    with tfds.testing.mock_data(num_examples=num_examples):
      return tfds.data_source(name, split="train")
  except ModuleNotFoundError as e:
    if e.name != "tensorflow" and "tensorflow" not in str(e):
      raise
    root = e
    while root.__cause__ is not None:
      root = root.__cause__
    frames = [f for f in traceback.extract_tb(root.__traceback__)
              if "tensorflow_datasets" in f.filename and "lazy_imports" not in f.filename]
    where = frames[-1] if frames else None
    at = (f"{where.filename.split('site-packages/')[-1]}:{where.lineno} `{where.line}`"
          if where else "TFDS")
    pytest.skip(f"TFDS cannot build {name!r} without TensorFlow (not installed): {at} needs it")


def test_mnist_through_image_ops():
  src = _mock_source("mnist")
  f = pp.parse("image.decode(channels=3)|image.resize(32)|image.value_range(-1, 1)|"
               "keep('image', 'label')")
  for i in range(len(src)):
    raw = src[i]
    out = f(raw, np.random.default_rng(i))
    grey = raw["image"][..., 0]
    ref = np.asarray(PIL.Image.fromarray(grey).convert("RGB").resize((32, 32), PIL.Image.BILINEAR))
    np.testing.assert_allclose(out["image"], ref / 127.5 - 1.0, atol=1e-6)
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert set(out) == {"image", "label"} and 0 <= int(out["label"]) < 10


def test_clevr_through_image_and_text_ops():
  src = _mock_source("clevr")
  f = pp.parse("flatten|image.decode|image.resize((24, 32))|image.flip_lr(1.0)|"
               "text.normalize(key='question_answer/question')|"
               "text.normalize(key='question_answer/answer')")
  for i in range(len(src)):
    raw = src[i]
    out = f(raw, np.random.default_rng(i))
    ref = np.asarray(PIL.Image.fromarray(raw["image"]).resize((32, 24), PIL.Image.BILINEAR))
    np.testing.assert_array_equal(out["image"], np.fliplr(ref))
    questions = out["question_answer/question"]
    assert len(questions) == len(raw["question_answer"]["question"])
    for q, r in zip(questions, raw["question_answer"]["question"]):
      assert q == " ".join(str(r).lower().split())
    assert out["objects/pixel_coords"].shape[-1] == 3


def test_coco_captions_through_image_and_text_ops():
  src = _mock_source("coco_captions")
  f = pp.parse("flatten|image.decode|image.resize(64)|text.normalize(key='captions/text')")
  out = f(src[0], np.random.default_rng(0))
  assert out["image"].shape == (64, 64, 3) and len(out["captions/text"]) > 0


def test_spoken_digit_through_audio_ops():
  src = _mock_source("spoken_digit")
  f = pp.parse("audio.load(sr=8000)|audio.resample(16000)|audio.pad_or_crop(seconds=1.0)|"
               "audio.log_mel(n_mels=40)")
  out = f(src[0], np.random.default_rng(0))
  assert out["audio"].shape == (16000,) and out["mel"].shape == (101, 40)
