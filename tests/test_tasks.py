"""Captioning, CLIP and AV-digits tasks: tiny configs train through the trainer (loss goes down),
eval metrics are in range and agree with an independent computation, and predict round-trips."""

import os

import numpy as np
import pytest
import soundfile

from mmjax import predict
from mmjax.data.datasets import av_digits
from mmjax.metrics.caption import CaptionMetrics, simple_tokenize
from mmjax.tasks.av_digits import AvDigitsPredictor
from mmjax.tasks.caption import CaptionPredictor
from mmjax.train import trainer
from mmjax.train.config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _train(tmp_path_factory, config_name, steps, overrides=()):
  """Trains configs/<config_name>.py:size=tiny for `steps` steps (one eval at the end)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "task_data")
  config = load_config(os.path.join(CONFIGS, f"{config_name}.py:size=tiny"),
                       [f"data.data_dir={data_dir}", *overrides])
  config.train.steps = config.train.eval_every = config.train.checkpoint_every = steps
  config.train.log_every = 1
  workdir = str(tmp_path_factory.mktemp(config_name))
  final = trainer.train(config, workdir, progress=False)
  losses = [r["train/loss"] for r in trainer.read_metrics(workdir) if "train/loss" in r]
  return workdir, final, losses


def _decreases(losses):
  assert len(losses) >= 6 and np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


# ------------------------------------------------------------------------------------- caption
@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
  return _train(tmp_path_factory, "caption_shapes", 8)


def test_caption_trains_and_eval_matches_predictor(caption_run):
  workdir, final, losses = caption_run
  _decreases(losses)
  for k in ("bleu_1", "bleu_4", "rouge_l"):
    assert 0.0 <= final[f"test/{k}"] <= 1.0
  assert final["test/cider"] >= 0.0 and np.isfinite(final["test/nll"])
  p = predict.Predictor.from_workdir(workdir)
  assert isinstance(p, CaptionPredictor) and p.step == 8
  source = p.task.source("test")  # from config.data.data_dir: the test's own folder, not the cache
  records = sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])
  out = p.caption_batch([r["image"] for r in records])
  train = p.task.source("train")
  words = {w for i in range(len(train)) for c in train[i]["captions"] for w in c.decode().split()}
  for o in out:
    assert o["caption"] and set(o["caption"].split()) <= words
    assert o["score"] <= 0.0
  # The trainer's eval loop (decoded rows concatenated over padded batches) scores exactly the
  # predictor's captions of the same checkpoint.
  acc = CaptionMetrics()
  acc.update([simple_tokenize(o["caption"]) for o in out],
             [[simple_tokenize(c.decode()) for c in r["captions"]] for r in records])
  m = acc.compute()
  np.testing.assert_allclose([m["cider_d"], m["bleu_4"], m["rouge_l"]],
                             [final["test/cider"], final["test/bleu_4"], final["test/rouge_l"]], rtol=1e-9)
  beam = p.caption(records[0]["image"], method="beam")
  assert beam["caption"] and set(beam["caption"].split()) <= words
  with pytest.raises(ValueError, match="75×75"):
    p.caption(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(FileNotFoundError, match="no image file"):
    p.caption(os.path.join(workdir, "missing.png"))
  with pytest.raises(AttributeError, match="classify"):  # each task serves its own functions
    p.classify(records[0]["image"], np.zeros(100, np.float32))


# ---------------------------------------------------------------------------------------- clip
@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  return _train(tmp_path_factory, "clip_shapes", 8)


def test_clip_trains_and_reports_recall(clip_run):
  _, final, losses = clip_run
  # A model blind to images or captions has a contrastive loss >= ln(batch); the tiny run only
  # comes down to that bound (30 steps: 2.775, ln 16 = 2.773), so only the decrease is checked.
  _decreases(losses)
  for d in ("i2t", "t2i"):
    r1, r5 = final[f"test/{d}_r@1"], final[f"test/{d}_r@5"]
    assert 0.0 <= r1 <= r5 <= 1.0
  np.testing.assert_allclose(final["test/rsum"], sum(final[f"test/{d}_r@{k}"] for d in ("i2t", "t2i")
                                                     for k in (1, 5)))


def test_clip_summarize_ranks_the_whole_split(clip_run):
  """Rows as the eval loop concatenates them: padding rows are dropped, recall is exact."""
  workdir, _, _ = clip_run
  task = predict.Predictor.from_workdir(workdir).task
  n, k, e = 6, 5, 8
  images = np.eye(e)[:n]  # orthonormal image embeddings
  texts = np.repeat(images[:, None], k, axis=1)  # every caption on its own image
  texts[1, :] = images[2]  # image 1's captions all look like image 2
  pad = np.full((2, e), 9.0)  # padding rows that would win every ranking
  sums = {"image_emb": np.concatenate([images, pad]),
          "text_emb": np.concatenate([texts, np.repeat(pad[:, None], k, 1)]),
          "valid": np.array([True] * n + [False] * 2), "loss": 3.0, "count": 6.0}
  out = task.summarize(sums)
  # Image 1 scores 0 with every caption: 25 other captions tie with its own, so it misses at 1
  # and 5 (ties count against the ground truth); image 2 ties with image 1's five captions, which
  # look like its own, and misses too. Image 1's captions point to image 2 and tie with four.
  assert out["i2t_r@1"] == out["i2t_r@5"] == pytest.approx(4 / 6)
  assert out["t2i_r@1"] == out["t2i_r@5"] == pytest.approx(25 / 30)
  assert out["loss"] == 0.5


def test_clip_predictor_embeds_as_the_model_does_on_the_eval_batch(clip_run):
  workdir, _, _ = clip_run
  p = predict.Predictor.from_workdir(workdir)
  batch = next(iter(p.task.dataset("test", train=False, batch_size=4, shard_index=0, shard_count=1)))
  source = p.task.source("test")  # evaluation reads records in order
  records = [source[i] for i in range(4)]
  images = p.embed_images([r["image"] for r in records])
  texts = p.embed_texts([r["captions"][0].decode() for r in records])
  both = lambda model, x, ids, mask: (model.embed("image", x)[0], model.embed("text", (ids, mask))[0])
  ref_images, ref_texts = p.run("both", both, batch["image"], batch["caption_ids"][:, 0],
                                batch["caption_mask"][:, 0])
  np.testing.assert_allclose(images, ref_images, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(texts, ref_texts, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------- av digits
@pytest.fixture(scope="module")
def av_run(tmp_path_factory, requires_espeak):
  return _train(tmp_path_factory, "av_digits", 30)


def test_av_digits_trains_and_classifies(av_run, tmp_path):
  workdir, final, losses = av_run
  _decreases(losses)
  for k in ("accuracy", "accuracy_image", "accuracy_audio"):
    assert 0.0 <= final[f"test/{k}"] <= 1.0
  p = predict.Predictor.from_workdir(workdir)
  assert isinstance(p, AvDigitsPredictor) and p.classes == av_digits.WORDS
  # Beats every constant answer on the test split (the most a model blind to both inputs gets;
  # the train split's majority class is one of them): measured 0.41 against 6 of 32 (10 steps: 0.19)
  source = p.task.source("test")
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert final["test/accuracy"] > np.bincount(labels).max() / len(labels), final
  rows = {"prediction": np.array([1, 2, 2, 7, 0]), "label": np.array([1, 2, 3, 7, 9]),
          "prediction_audio": np.array([1, 0, 3, 7, 0]), "valid": np.array([1, 1, 1, 1, 0], bool)}
  assert p.task.summarize(rows) == {"accuracy": 0.75, "accuracy_audio": 0.75}
  cm = p.task.last_confusion
  assert cm.shape == (10, 10) and cm.sum() == 4 and cm[3, 2] == 1 and cm[7, 7] == 1 and cm[9].sum() == 0
  record = source[0]
  audio = record["audio"][:record["audio_len"]]
  path = tmp_path / "digit.wav"
  soundfile.write(path, audio, av_digits.SAMPLE_RATE, subtype="FLOAT")
  out = p.classify(record["image"], str(path))
  assert out["class"] in av_digits.WORDS and out["class"] == av_digits.WORDS[out["label"]]
  np.testing.assert_allclose(sum(out["probabilities"].values()), 1.0, atol=1e-5)
  again = p.classify(record["image"][..., 0], audio)  # (H, W) image and a waveform array
  np.testing.assert_allclose(again["probabilities"][out["class"]], out["probabilities"][out["class"]], rtol=1e-5)
  with pytest.raises(ValueError, match="wav: the audio is empty"):
    p.classify(record["image"], np.zeros(0, np.float32))
  with pytest.raises(ValueError, match="wav: the audio is silent"):
    p.classify(record["image"], np.zeros(800, np.float32))
  with pytest.raises(FileNotFoundError, match="no audio file"):
    p.classify(record["image"], str(tmp_path / "missing.wav"))
  with pytest.raises(ValueError, match="8×8"):
    p.classify(np.zeros((16, 16), np.uint8), audio)
  with pytest.raises(AttributeError, match="caption"):
    p.caption(record["image"])
