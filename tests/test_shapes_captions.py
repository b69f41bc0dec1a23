"""Shapes captions: every caption is true of its scene (checked by parsers written here)."""

import re

import numpy as np
import pytest

from mmjax.data import scenes
from mmjax.data.datasets import shapes_captions as sc

NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
OBJ = r"(red|green|blue|orange|gray|yellow) (square|circle)"
NUM_IMAGES = 300
TINY = dict(train=10, test=4)


def objects(rec):
  """{(colour name, shape name): (x, y)} of a record."""
  return {(scenes.COLORS[c], ("square", "circle")[s]): (int(x), int(y))
          for c, s, x, y in zip(rec["colors"], rec["shapes"], rec["xs"], rec["ys"])}


def where(a, b):
  """Where a lies relative to b, on the axis of their larger offset (ties: horizontal)."""
  dx, dy = a[0] - b[0], a[1] - b[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def nearest(objs, name):
  me = objs[name]
  return min((n for n in objs if n != name),
             key=lambda n: (objs[n][0] - me[0]) ** 2 + (objs[n][1] - me[1]) ** 2)


def check_caption(caption, kind, objs):
  """Asserts that `caption`, of kind `kind`, is true of the scene `objs`."""
  named = [(c, s) for c, s in re.findall(OBJ, caption)]
  assert all(n in objs for n in named), caption  # every "<colour> <shape>" exists
  assert not re.search(r"\ba (orange)\b|\ban (red|green|blue|gray|yellow)\b", caption), caption
  if kind == "count":
    m = re.fullmatch(r"(?:(\w+) shapes: |a white image with )?(\w+) squares? and (\w+) circles?"
                     r"(?: on a white background)?", caption)
    assert m, caption
    squares = sum(s == "square" for _, s in objs)
    assert (NUMBERS[m[2]], NUMBERS[m[3]]) == (squares, 6 - squares), caption
    assert m[1] is None or NUMBERS[m[1]] == 6
  elif kind == "position":
    m = re.search(r"\b(top|bottom) (left|right)\b", caption)
    assert m and len(named) == 1, caption
    x, y = objs[named[0]]
    assert m[1] == ("top" if y < 37.5 else "bottom") and m[2] == ("left" if x < 37.5 else "right")
  elif kind == "relation":
    m = re.fullmatch(rf"(?:there is |the )?(?:an? )?{OBJ} (?:is )?(to the left of|to the right of|"
                     rf"above|below) (?:an?|the) {OBJ}", caption)
    assert m, caption
    a, rel, b = (m[1], m[2]), m[3], (m[4], m[5])
    assert a != b and where(objs[a], objs[b]) == rel, caption
  else:
    for pattern, anchor, other in ((rf"the {OBJ} is closest to the {OBJ}", 0, 1),
                                   (rf"the {OBJ} is the nearest shape to the {OBJ}", 1, 0),
                                   (rf"the shape nearest to the {OBJ} is an? {OBJ}", 0, 1)):
      if re.fullmatch(pattern, caption):
        assert nearest(objs, named[anchor]) == named[other], caption
        break
    else:
      pytest.fail(f"unparsed closest caption: {caption}")


@pytest.fixture(scope="module")
def records():
  return [sc.generate_example("train", i) for i in range(NUM_IMAGES)]


def test_every_caption_is_true_of_its_scene(records):
  used = set()
  relations = set()
  for rec in records:
    objs = objects(rec)
    assert len(objs) == 6 and len(rec["captions"]) == sc.CAPTIONS_PER_IMAGE >= 3
    for caption, kind in zip(rec["captions"], sc.CAPTION_KINDS):
      assert caption == caption.lower() and caption.strip() == caption
      check_caption(caption, kind, objs)
      used.add(re.sub(OBJ, "X", caption))
      relations.update(re.findall(r"to the left of|to the right of|above|below", caption))
  assert relations == {"to the left of", "to the right of", "above", "below"}
  # Several templates per kind are in use.
  assert all(len(ts) >= 3 for ts in sc.TEMPLATES.values())
  assert len(used) > 30


def test_captions_deterministic_by_seed(records):
  again = sc.generate_example("train", 5)
  assert again["captions"] == records[5]["captions"] and again["image"] == records[5]["image"]
  assert sc.generate_example("test", 5)["image"] != records[5]["image"]
  with pytest.raises(ValueError, match="split"):
    sc.generate_example("paraphrase", 0)


def test_tfds_build_and_tokenizer(tmp_path):
  import tensorflow_datasets as tfds

  config = sc.ShapesCaptionsConfig(name="tiny", num_images=tuple(TINY.items()))
  tok = sc.load_tokenizer(tmp_path, config=config)
  for split, n in TINY.items():
    source = tfds.data_source(
      "shapes_captions", split=split, data_dir=str(tmp_path), download=False,
      builder_kwargs=dict(config=config, file_format="array_record"),
    )
    assert len(source) == n
    for i in range(n):
      rec = source[i]
      want = sc.generate_example(split, rec["index"])
      assert np.array_equal(rec["image"], scenes.decode_png(want["image"]))
      assert [c.decode() for c in rec["captions"]] == want["captions"]
      for k in ("colors", "shapes", "xs", "ys"):
        assert np.array_equal(rec[k], want[k])
  # The vocabulary holds the train captions' words, and nothing from the test split alone.
  def words(split):
    return {w for i in range(TINY[split])
            for c in sc.generate_example(split, i)["captions"] for w in re.findall(r"[a-z]+", c)}

  train_words, test_words = words("train"), words("test")
  vocab = tok.get_vocab()
  assert train_words <= set(vocab)
  assert not [w for w in test_words - train_words if len(w) > 1 and w in vocab]
