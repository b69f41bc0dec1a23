"""Serving preprocessing is the training config's: for every task, the Predictor's inputs for a raw
request (a PNG file of a test record's pixels, its question or caption strings, its wav file)
equal the evaluation pipeline's batch row of that record, bit for bit."""

import os

import numpy as np
import soundfile
from PIL import Image

from mmjax.data.datasets import av_digits
from mmjax.train.config import load_config
from mmjax.train.trainer import Setup

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = {"vqa": "mmjax/projects/sort_of_clevr/configs/vqa.py", "caption": "configs/caption_shapes.py",
           "clip": "configs/clip_shapes.py", "av": "configs/av_digits.py"}
ROWS = 4  # test records compared per task: the first eval batch


def _predictor_and_eval_batch(tmp_path_factory, name):
  """The task's Predictor (freshly initialised: preprocessing needs no training) and the first
  eval batch of the test split with the raw records behind its rows (eval reads them in order)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "task_data")  # shared with test_tasks.py
  config = load_config(os.path.join(ROOT, CONFIGS[name]) + ":size=tiny", [f"data.data_dir={data_dir}"])
  setup = Setup(config)
  predictor = setup.task.predictor(setup, setup.init_state())
  batch = next(iter(setup.task.dataset("test", train=False, batch_size=ROWS, shard_index=0, shard_count=1)))
  source = setup.task.source("test")
  return predictor, batch, [source[i] for i in range(ROWS)]


def _png(tmp_path, row, pixels):
  """A PNG file of a record's uint8 pixels, as a user would send the image."""
  path = tmp_path / f"image{row}.png"
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
  return str(path)


def _text(s):
  return s.decode() if isinstance(s, bytes) else str(s)


def _same(got, want):
  """Bit for bit: same dtype, same shape, same values."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
  differ = int(np.sum(got != want))
  assert differ == 0, f"{differ} of {got.size} values differ"


def test_vqa(tmp_path_factory, tmp_path):
  p, batch, records = _predictor_and_eval_batch(tmp_path_factory, "vqa")
  for row, r in enumerate(records):
    questions = [_text(q) for q in r["questions"]]  # (Q,) strings
    images, ids, mask = p.vqa_inputs([_png(tmp_path, row, r["image"])] * len(questions), questions)
    for image in images:
      _same(image, batch["image"][row])
    _same(ids, batch["question_ids"][row])  # (Q, L)
    _same(mask, batch["question_mask"][row])


def test_caption(tmp_path_factory, tmp_path):
  p, batch, records = _predictor_and_eval_batch(tmp_path_factory, "caption")
  pngs = [_png(tmp_path, row, r["image"]) for row, r in enumerate(records)]
  _same(p.image_inputs(pngs), batch["image"])


def test_clip(tmp_path_factory, tmp_path):
  p, batch, records = _predictor_and_eval_batch(tmp_path_factory, "clip")
  pngs = [_png(tmp_path, row, r["image"]) for row, r in enumerate(records)]
  _same(p.image_inputs(pngs), batch["image"])
  for row, r in enumerate(records):
    ids, mask = p.text_inputs([_text(c) for c in r["captions"]])  # (K, L)
    _same(ids, batch["caption_ids"][row])
    _same(mask, batch["caption_mask"][row])


def test_av_digits(tmp_path_factory, tmp_path, requires_espeak):
  p, batch, records = _predictor_and_eval_batch(tmp_path_factory, "av")
  pngs, wavs = [], []
  for row, r in enumerate(records):
    pngs.append(_png(tmp_path, row, r["image"]))
    wavs.append(str(tmp_path / f"audio{row}.wav"))  # the spoken samples, as float32 WAV
    soundfile.write(wavs[-1], r["audio"][:r["audio_len"]], av_digits.SAMPLE_RATE, subtype="FLOAT")
  out = p.inputs(pngs, wavs)
  for key in ("image", "audio", "audio_len"):
    _same(out[key], batch[key])
