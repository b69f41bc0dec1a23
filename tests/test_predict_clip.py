"""Serving a dual encoder: zero-shot classification and retrieval with a toy CLIP trained here,
the command line printing what the Python API returns, and bad inputs.

The toy data are shapes_captions' scenes (`mmjax.data.scenes`) with one shape each, of a random
colour, larger than shapes_captions' six (whose images all hold every colour, so that colour
names do not tell them apart), captioned by its colour and shape: a small CLIP learns them in a
hundred steps on CPU.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax import predict
from mmjax.data import scenes, tokenizer as tokenizer_lib
from mmjax.tasks.clip import ClipPredictor, ContrastiveTask
from mmjax.train import trainer
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "clip_shapes.py")
SPLITS = {"train": 64, "test": 16, "heldout": 48}  # heldout: zero-shot images never trained on
HALF = 12  # object half-width in pixels (shapes_captions': 5)
STEPS = 120


def one_shape(split: str, index: int) -> dict:
  """A 75x75 scene with one shape of a random colour and its five captions."""
  rng = np.random.default_rng([list(SPLITS).index(split), index])
  color, shape = int(rng.integers(len(scenes.COLORS))), int(rng.integers(len(scenes.SHAPES)))
  x, y = (int(v) for v in rng.integers(HALF, scenes.IMAGE_SIZE - HALF, size=2))
  scene = scenes.Scene(colors=np.array([color]), shapes=np.array([shape]), xs=np.array([x]),
                       ys=np.array([y]), size=HALF)
  c, s = scenes.COLORS[color], scenes.SHAPES[shape]
  a = "an" if c[0] in "aeiou" else "a"
  captions = [f"{a} {c} {s}", f"there is {a} {c} {s} in the image", f"the {s} is {c}", f"{a} {c} shape",
              f"one {s} on a white background"]
  return {"image": scenes.render(scene), "captions": captions, "color": color, "shape": shape}


@TASKS.register("test_one_shape_clip")
class OneShapeCLIP(ContrastiveTask):
  """The toy data through the library's contrastive task (loss, recall@K, `ClipPredictor`)."""

  image_shape = (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)

  def __init__(self, config, workdir=None):
    del workdir
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = tokenizer_lib.train_wordpiece(c for r in self.source("train") for c in r["captions"])

  def source(self, split):
    return [one_shape(split, i) for i in range(SPLITS[split])]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny CLIP config (small CNN, GRU) on the toy data: 120 steps of 32 pairs."""
  config = load_config(CONFIG + ":size=tiny")
  config.task = "test_one_shape_clip"
  config.data.batch_size = 32
  config.optim.lr, config.optim.warmup_steps = 1e-3, 5
  config.train.steps = STEPS
  config.train.eval_every = config.train.checkpoint_every = STEPS
  wd = str(tmp_path_factory.mktemp("clip"))
  trainer.train(config, wd, progress=False)
  return wd


@pytest.fixture(scope="module")
def predictor(workdir):
  return predict.Predictor.from_workdir(workdir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Three training images as PNG files, their first captions, and a text file."""
  folder = tmp_path_factory.mktemp("files")
  paths, captions = [], []
  for i in range(3):
    record = one_shape("train", i)
    paths.append(str(folder / f"train{i}.png"))
    Image.fromarray(record["image"]).save(paths[-1])
    captions.append(record["captions"][0])
  notes = folder / "notes.txt"
  notes.write_text("not an image\n")
  return paths, captions, str(notes)


def test_zero_shot_beats_the_majority_class_on_heldout_images(predictor):
  assert isinstance(predictor, ClipPredictor) and predictor.step == STEPS
  records = [one_shape("heldout", i) for i in range(SPLITS["heldout"])]
  out = predictor.zero_shot([r["image"] for r in records], scenes.COLORS, template="a {} shape")
  assert len(out) == len(records)
  for o in out:
    assert set(o["probabilities"]) == set(scenes.COLORS)
    np.testing.assert_allclose(sum(o["probabilities"].values()), 1.0, atol=1e-5)
    assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
  truth = np.array([r["color"] for r in records])
  accuracy = np.mean([o["label"] == scenes.COLORS[t] for o, t in zip(out, truth)])
  majority = np.bincount(truth).max() / len(truth)  # the baseline: always the most frequent colour
  assert accuracy >= majority + 0.3, (accuracy, majority)


def test_retrieval_finds_the_matching_caption_and_image_of_training_pairs(predictor):
  records = [one_shape("train", i) for i in range(SPLITS["train"])]
  images = [r["image"] for r in records]
  captions = [r["captions"][0] for r in records]  # colour and shape: 12 captions, repeated
  distinct = sorted(set(captions))
  # image -> text over the distinct captions: right when the top caption is the image's own.
  indices, scores = predictor.retrieve(images, distinct, k=3, query="image")
  assert indices.shape == scores.shape == (len(images), 3)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  i2t = np.mean([distinct[i] == c for i, c in zip(indices[:, 0], captions)])
  # text -> image over the images: right when the top image has the query as its caption.
  indices, _ = predictor.retrieve(captions, images, k=1)
  t2i = np.mean([captions[i] == c for i, c in zip(indices[:, 0], captions)])
  same = np.array([[a == b for b in captions] for a in captions])
  chance_i2t, chance_t2i = 1 / len(distinct), same.mean()  # a random pick's hit rate
  assert i2t >= 4 * chance_i2t and t2i >= 4 * chance_t2i, (i2t, chance_i2t, t2i, chance_t2i)
  # A gallery's embeddings retrieve what the gallery itself does.
  gallery = predictor.embed_images(images)
  again, _ = predictor.retrieve(captions, gallery, k=1)
  np.testing.assert_array_equal(again, indices)


def test_cli_prints_what_the_api_returns(workdir, predictor, files, capsys):
  paths, captions, _ = files

  def cli(*args):
    assert predict.main(["--workdir", workdir, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)

  out = cli("--image", paths[0], "--labels", "red,green,blue", "--template", "a {} shape", "--top", "3")
  api = predictor.zero_shot([paths[0]], ["red", "green", "blue"], template="a {} shape")[0]
  assert out["label"] == api["label"] and out["step"] == STEPS
  assert list(out["probabilities"]) == list(api["probabilities"])
  np.testing.assert_allclose(list(out["probabilities"].values()), list(api["probabilities"].values()),
                             rtol=1e-6)
  assert cli("--image", paths[0], "--labels", "red", "green", "blue", "--template",
             "a {} shape")["probabilities"] == out["probabilities"]  # one label per argument too
  flag = ["red, white and blue flag", "green circle"]  # several arguments: commas are the labels' own
  api = predictor.zero_shot([paths[0]], flag, template="a photo of {}")[0]
  assert cli("--image", paths[0], "--labels", *flag)["probabilities"] == api["probabilities"]

  out = cli("--text", captions[1], "--gallery", *paths, "--top_k", "2")
  indices, scores = predictor.retrieve([captions[1]], paths, k=2)
  assert out["query"] == "text" and [r["index"] for r in out["results"]] == indices[0].tolist()
  assert [r["item"] for r in out["results"]] == [paths[i] for i in indices[0]]
  np.testing.assert_allclose([r["score"] for r in out["results"]], scores[0], rtol=1e-6)

  out = cli("--image", paths[2], "--gallery", *captions)
  indices, scores = predictor.retrieve([paths[2]], captions, k=5, query="image")
  assert [r["index"] for r in out["results"]] == indices[0].tolist() and len(indices[0]) == 3
  np.testing.assert_allclose([r["score"] for r in out["results"]], scores[0], rtol=1e-6)

  out = cli("--text", captions[0])
  np.testing.assert_allclose(out["embedding"], predictor.embed_texts([captions[0]])[0], rtol=1e-6)
  out = cli("--image", paths[0], "--text", captions[0])
  cosine = predictor.embed_images([paths[0]])[0] @ predictor.embed_texts([captions[0]])[0]
  np.testing.assert_allclose([out["cosine"], out["logit"]], [cosine, predictor.logit_scale * cosine], rtol=1e-5)

  assert predict.main(["--workdir", workdir, "--image", paths[0], "--labels", "red,blue",
                       "--template", "a {} shape"]) == 0  # the text form
  api = predictor.zero_shot([paths[0]], ["red", "blue"], template="a {} shape")[0]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"label: {api['label']}" and len(lines) == 3
  assert [line.split()[0] for line in lines[1:]] == list(api["probabilities"])


def test_bad_inputs(workdir, predictor, files, capsys):
  paths, captions, notes = files

  def cli_error(*args):
    with pytest.raises(SystemExit) as e:
      predict.main(["--workdir", workdir, *args])
    assert e.value.code == 2
    return capsys.readouterr().err

  err = cli_error("--image", notes, "--labels", "red,blue")
  assert "image:" in err and notes in err and "not an image file" in err and "Traceback" not in err
  assert "--beam: not an option" in cli_error("--image", paths[0], "--beam")
  assert "--labels" in cli_error("--text", "a red circle", "--labels", "red,blue")
  assert "--template" in cli_error("--image", paths[0], "--template", "a {}")
  assert "--gallery" in cli_error("--image", paths[0], "--text", "x", "--gallery", *captions)
  assert "--image or --text" in cli_error()
  with pytest.raises(ValueError, match="template"):
    predictor.zero_shot([paths[0]], ["red", "blue"], template="a photo")
  with pytest.raises(ValueError, match="distinct"):
    predictor.zero_shot([paths[0]], ["red", "red"])
  with pytest.raises(ValueError, match="two or more"):
    predictor.zero_shot([paths[0]], ["red"])
  with pytest.raises(ValueError, match=r"labels\[1\]"):
    predictor.zero_shot([paths[0]], ["red", " "])
  with pytest.raises(TypeError, match="labels"):
    predictor.zero_shot([paths[0]], "red")
  with pytest.raises(ValueError, match=r"gallery: expected image embeddings \(M, 32\)"):
    predictor.retrieve(["a red circle"], np.zeros((3, 7), np.float32))
  with pytest.raises(ValueError, match="query"):
    predictor.retrieve(["a red circle"], paths, query="audio")
  with pytest.raises(ValueError, match="k: expected a positive int"):
    predictor.retrieve(["a red circle"], paths, k=0)
  with pytest.raises(ValueError, match=r"gallery\[1\]: .*not an image file"):
    predictor.retrieve(["a red circle"], [paths[0], notes])
